"""What every method with top-k routers over LoRA experts shares (methods.md §3.1–§3.2): the router and
balance-loss fields MixLoRA defines (:class:`RoutedLoraConfig`), the weighted balance and z-losses over the
routing records of the sites that routed (:func:`balance_losses`), and the adapter base that reports them
(:class:`RoutedLoraAdapter`). MixLoRA and MoR's ``per_linear`` host build on it; no method is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import Adapter, AdapterModule, require, routed_modules
from .experts import check_expert_compute
from .lora import LoraConfig
from .routing import load_balance_loss, router_z_loss

AUX_REDUCTIONS = ("pooled", "per_layer")


@dataclass(kw_only=True)
class RoutedLoraConfig(LoraConfig):
    """LoRA experts behind a top-k router: the router and balance-loss fields MixLoRA defines (§3.1–§3.2),
    shared with every host that routes the same way (MoR's ``per_linear``)."""

    num_experts: int = 8
    top_k: int = 2
    router_init_std: float = 0.02
    jitter_noise: float = 0.0
    # Code default and best ablation, reproducing Table 1; the paper text says 1e-2 (methods.md §3.2).
    router_aux_loss_coef: float = 1e-3
    aux_loss_reduction: str = "pooled"  # "pooled": all layers' router outputs at once (MoE-PEFT); "per_layer"
    router_z_loss_coef: float = 0.0
    # "grouped": only the top-k experts' LoRA factors are computed (experts.py); "dense": every expert, masked.
    # Grouped is the faster for MixLoRA's FFN at all three benchmark shapes (README "Speed")
    expert_compute: str = "grouped"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_compute(self.expert_compute)
        require(isinstance(self.num_experts, int) and self.num_experts >= 1,
                f"num_experts ({self.num_experts}) must be a positive integer")
        require(isinstance(self.top_k, int) and self.top_k >= 1, f"top_k ({self.top_k}) must be a positive integer")
        require(self.top_k <= self.num_experts, f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        require(self.router_init_std >= 0, f"router_init_std ({self.router_init_std}) must be >= 0")
        require(0.0 <= self.jitter_noise < 1.0, f"jitter_noise ({self.jitter_noise}) must be in [0, 1)")
        require(self.router_aux_loss_coef >= 0, f"router_aux_loss_coef ({self.router_aux_loss_coef}) must be >= 0")
        require(self.aux_loss_reduction in AUX_REDUCTIONS,
                f"aux_loss_reduction ({self.aux_loss_reduction!r}) must be one of {AUX_REDUCTIONS}")
        require(self.router_z_loss_coef >= 0, f"router_z_loss_coef ({self.router_z_loss_coef}) must be >= 0")



def balance_losses(sites: list[AdapterModule], config: RoutedLoraConfig) -> dict[str, Tensor]:
    """The weighted balance (and z-) losses over the routing records of ``sites`` (methods.md §3.2).

    The loss reads what each router actually produced (``probs`` and ``selected`` of its record), so a
    router whose distribution is not ``softmax(logits)`` (MoR) is balanced on its combined ``p``.
    """
    if not sites:
        return {}
    routings = [site.routing for site in sites]
    masks = [site.context.flat_token_mask(site.routing.probs.shape[0]) for site in sites]
    losses = {}
    if config.router_aux_loss_coef > 0:
        balance = load_balance_loss([r.logits for r in routings], config.top_k, masks, config.aux_loss_reduction,
                                    probs=[r.probs for r in routings], selected=[r.selected for r in routings])
        losses["load_balance"] = config.router_aux_loss_coef * balance
    if config.router_z_loss_coef > 0:
        z = torch.stack([router_z_loss(r.logits, m) for r, m in zip(routings, masks, strict=True)]).mean()
        losses["router_z"] = config.router_z_loss_coef * z
    return losses


class RoutedLoraAdapter(Adapter):
    """A method whose routing sites are top-k routers with :class:`RoutedLoraConfig`'s balance-loss fields
    (MixLoRA, MoR's ``per_linear`` host): one aux-loss implementation over the sites that routed."""

    def aux_losses(self, model: nn.Module) -> dict[str, Tensor]:
        return balance_losses([module for _, module in routed_modules(model)], self.config)
