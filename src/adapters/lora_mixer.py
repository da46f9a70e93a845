"""LoRA-Mixer (Li et al., HUST; arXiv 2507.00029; ICLR 2026) — implements methods.md §5.1, §5.2 and §5.6.

No code is public (the official repository holds a README only) and the paper leaves the router form, the
expert rank, the loss coefficients and the fusion rule undefined, so this is a ``reconstruction``: every
unreported detail below is a flag with methods.md's default.

LoRA experts sit on the attention projections q, k, v, o (``ComposedLinear``, composition.py):

    y = W x + Σ_e w_e(x) · s_e B_e A_e dropout(x),      p(x) = router(x) ∈ Δ^E   (Eq. 4; PEFT's A/B naming)

    stage hard  (training, experts trained in the run):  w = one-hot of the example's task (domain routing)
    stage soft  (training):                             w = p                  (dense soft fusion)
    inference   (eval mode):                            w = top-K of p, renormalised to sum 1

Routing specialisation loss per routing site, averaged over the sites (§5.2, Eq. 3 and 5):

    L_RSL = α Σ_i p̄_i f̄_i + rsl_entropy_sign · λ · E_x[H(p(x))],   H(p) = −Σ_i p_i log p_i

with ``p̄_i`` the mean routing probability and ``f̄_i`` the load of expert i over the unmasked tokens, and
the expert-preservation loss (Eq. 11) ``L_preserve = β Σ_{i∈C} ||θ_i − θ_i^(0)||²`` summed over all wrapped
projections, ``θ_i = (A_i, B_i)`` and ``θ_i^(0)`` their values when the soft stage is first entered. The
anchors ``θ_i^(0)`` are persistent buffers of the adapter state (:class:`ExpertAnchors`, with a flag saying
whether they were captured), so a run resumed from a checkpoint keeps them instead of re-capturing drifted
experts.

Flags (methods.md's [R] table):

* ``router_scope`` — ``per_projection`` (a router per wrapped projection, default) or ``per_layer`` (one per
  decoder layer, reading ``q_proj``'s input — the normalised layer input — and shared by k, v, o).
  Routers come from :meth:`~.base.Adapter.make_router` (a linear map initialised ``N(0, router_init_std)``,
  0.02 as MixLoRA's), so a router method such as MoR replaces them; only ``probabilities(x)`` is used.
* ``top_k`` = 3 and ``top_k_renormalize`` (on): sparse fusion at inference; the renormalisation is ours.
* ``rsl_entropy_sign`` = +1 minimises the per-token entropy (sharper routing, as the paper's text says);
  −1 is Eq. 5 as printed, which maximises it. Every report should state the sign.
* ``rsl_load`` — ``argmax`` (``f̄_i`` = share of tokens whose argmax is i, Eq. 3) or ``topk_score``
  (``f̄_i`` = mean renormalised top-K weight of i, the §3.3 wording). Either way ``f̄`` is a load statistic
  without gradient, as in Switch-style balance losses; the gradient flows through ``p̄`` and ``H``.
* ``rsl_alpha`` / ``rsl_lambda`` / ``preserve_beta`` = 0.01 / 0.01 / 1e-3 (unreported; α counted once).
* ``preserve_experts`` (C) empty by default. It needs ``train_experts_in_soft_stage`` (default off: the soft
  stage trains the routers only, "experts frozen or mostly frozen"), otherwise ``θ_i`` cannot move.
* Plug-in mode is ``experts.source=load`` (frozen external LoRAs, routers only). Experts trained in the run
  use ``experts.r / lora_alpha / lora_dropout`` = 16 / 32 / 0.05 (MixLoRA's, so budgets compare); loaded
  LoRAs keep their own rank and scale.
* Stages share the run's data mixture; the paper's soft stage used a separate 2k–4k routing set.

Compute flags (composition.py): with ``expert_compute: grouped`` stage ``hard`` and inference compute only
the selected experts' B (the task's expert; the top-K); the dense soft stage mixes every expert either way.
``dense`` (default: with 3 experts the benchmark measured no difference beyond its noise) is the masked
reference. ``lora_dropout_sharing: per_input`` lets q, k and v draw one
dropout mask.

Not mergeable: the routing weights depend on the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchContext, register, require
from .composition import HARD, SOFT, ComposedAdapter, ComposedConfig, ComposedLinear, composed_layers, site_key
from .experts import LoraExperts
from .routing import Routing, entropy, masked_mean, scatter_weights, top_k_weights

ROUTER_SCOPES = {"per_projection": "matrix", "per_layer": "layer"}
RSL_LOADS = ("argmax", "topk_score")


@dataclass(kw_only=True)
class LoraMixerConfig(ComposedConfig):
    """LoRA-Mixer's router and loss flags (methods.md §5.1–§5.2, §5.6) on top of the ``experts`` block."""

    router_scope: str = "per_projection"
    router_init_std: float = 0.02
    top_k: int = 3  # experts fused per token at inference
    top_k_renormalize: bool = True
    rsl_alpha: float = 0.01
    rsl_lambda: float = 0.01
    rsl_entropy_sign: int = 1  # +1: minimise the routing entropy (text); -1: Eq. 5 as printed
    rsl_load: str = "argmax"
    preserve_beta: float = 1e-3
    preserve_experts: list[int] = field(default_factory=list)
    train_experts_in_soft_stage: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.router_scope in ROUTER_SCOPES,
                f"router_scope ({self.router_scope!r}) must be one of {sorted(ROUTER_SCOPES)}")
        require(self.router_init_std >= 0, f"router_init_std ({self.router_init_std}) must be >= 0")
        require(isinstance(self.top_k, int) and 1 <= self.top_k <= self.experts.count,
                f"top_k ({self.top_k}) must be an integer in [1, number of experts ({self.experts.count})]")
        for name in ("rsl_alpha", "rsl_lambda", "preserve_beta"):
            require(getattr(self, name) >= 0, f"{name} ({getattr(self, name)}) must be >= 0")
        require(self.rsl_entropy_sign in (1, -1), f"rsl_entropy_sign ({self.rsl_entropy_sign}) must be +1 or -1")
        require(self.rsl_load in RSL_LOADS, f"rsl_load ({self.rsl_load!r}) must be one of {RSL_LOADS}")
        self.preserve_experts = self.require_expert_ids("preserve_experts", self.preserve_experts)
        require(not self.preserve_experts or self.train_experts_in_soft_stage,
                f"preserve_experts ({self.preserve_experts}) needs train_experts_in_soft_stage: frozen experts "
                "cannot drift")


def rsl_loss(probs: Tensor, mask: Tensor | None, config: LoraMixerConfig) -> Tensor:
    """L_RSL of one routing site (§5.2) for its routing distribution ``probs`` [T, E]."""
    num_experts = probs.shape[-1]
    if config.rsl_load == "argmax":
        load = F.one_hot(probs.argmax(dim=-1), num_experts).to(probs.dtype)
    else:
        load = scatter_weights(*top_k_weights(probs, config.top_k), num_experts)
    balance = (masked_mean(probs, mask) * masked_mean(load.detach(), mask)).sum()
    return config.rsl_alpha * balance + config.rsl_entropy_sign * config.rsl_lambda * masked_mean(entropy(probs), mask)


class ExpertAnchors(nn.Module):
    """``θ_i^(0)`` of the preserved experts of one projection (Eq. 11), as persistent buffers.

    Created zero at injection, so that every checkpoint of the run has the same keys, and captured once, on
    the first entry into the soft stage; ``captured`` travels with them, so re-entering the stage after a
    resume keeps the anchors of the original entry."""

    def __init__(self, experts: LoraExperts, preserved: list[int]) -> None:
        super().__init__()
        self.preserved = preserved
        self.register_buffer("lora_A", torch.zeros_like(experts.lora_A[preserved], requires_grad=False))
        self.register_buffer("lora_B", torch.zeros_like(experts.lora_B[preserved], requires_grad=False))
        self.register_buffer("captured", torch.zeros((), dtype=torch.bool, device=experts.lora_A.device))

    def capture(self, experts: LoraExperts) -> None:
        """Take the experts' current values, unless the anchors hold a capture already (``torch.where``
        rather than an ``if``: no host synchronisation, and meta-device skeletons pass too)."""
        with torch.no_grad():
            self.lora_A.copy_(torch.where(self.captured, self.lora_A, experts.lora_A[self.preserved]))
            self.lora_B.copy_(torch.where(self.captured, self.lora_B, experts.lora_B[self.preserved]))
            self.captured.fill_(True)

    def drift(self, experts: LoraExperts) -> Tensor:
        """``Σ_{i∈C} ||θ_i − θ_i^(0)||²`` of this projection."""
        return (((experts.lora_A[self.preserved] - self.lora_A) ** 2).sum()
                + ((experts.lora_B[self.preserved] - self.lora_B) ** 2).sum())


class MixerRouter(nn.Module):
    """A routing site: dense ``p`` in training, renormalised top-K of ``p`` at inference (§5.1)."""

    def __init__(self, router: nn.Module, top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.router, self.top_k, self.renormalize = router, top_k, renormalize

    @property
    def sparse(self) -> bool:
        """Zero weights outside ``Routing.selected``: at inference (top-K), not in the dense soft stage."""
        return not self.training

    def forward(self, x: Tensor, h: Tensor, experts: LoraExperts, context: BatchContext) -> tuple[Tensor, Routing]:
        probs, logits = self.router.probabilities(x.reshape(-1, x.shape[-1]))
        if self.training:
            weights, selected = probs, probs.argmax(dim=-1, keepdim=True)
        else:
            kept, selected = top_k_weights(probs, self.top_k, self.renormalize)
            weights = scatter_weights(kept, selected, probs.shape[-1])
        return weights.reshape(*x.shape[:-1], -1), Routing(probs, selected, logits)


@register
class LoraMixer(ComposedAdapter):
    name = "lora_mixer"
    config_class = LoraMixerConfig
    merge_refusal = "its token routers mix the LoRA experts with input-dependent weights"
    config: LoraMixerConfig

    def site_of(self, module: str) -> str:
        return site_key(module, ROUTER_SCOPES[self.config.router_scope])

    def make_site(self, linear: nn.Linear, experts: LoraExperts) -> MixerRouter:
        router = self.make_router(linear.in_features, experts.num_experts, self.config.top_k,
                                  self.config.router_init_std)
        return MixerRouter(router, self.config.top_k, self.config.top_k_renormalize)

    def experts_train_in(self, stage: str) -> bool:
        return stage == HARD or (stage == SOFT and self.config.train_experts_in_soft_stage)

    def inject(self, model: nn.Module) -> None:
        super().inject(model)
        if self.config.preserve_experts:
            for _, layer in composed_layers(model):
                layer.anchors = ExpertAnchors(layer.experts, self.config.preserve_experts)
            self.enter_stage(model, self.stages[0])  # again, now with anchors: loaded experts start soft

    def enter_stage(self, model: nn.Module, stage: str) -> None:
        super().enter_stage(model, stage)
        if stage == SOFT:
            for layer, anchors in anchored_layers(model):
                anchors.capture(layer.experts)

    def aux_losses(self, model: nn.Module) -> dict[str, Tensor]:
        losses = {}
        records = self.soft_routing(model)
        if records:
            losses["rsl"] = torch.stack([rsl_loss(routing.probs, mask, self.config)
                                         for routing, mask in records]).mean()
        drift = [anchors.drift(layer.experts) for layer, anchors in anchored_layers(model) if layer.stage == SOFT]
        if drift:
            losses["preserve"] = self.config.preserve_beta * torch.stack(drift).sum()
        return losses


def anchored_layers(model: nn.Module) -> list[tuple[ComposedLinear, ExpertAnchors]]:
    """The wrapped projections that carry preservation anchors, with them."""
    return [(layer, layer.anchors) for _, layer in composed_layers(model)
            if isinstance(getattr(layer, "anchors", None), ExpertAnchors)]
