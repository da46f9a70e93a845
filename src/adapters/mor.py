"""MoR-recon: Mixture of Routers (Zhang et al., arXiv 2503.23362) — implements methods.md §4.2.

Fidelity ``reconstruction``: only the abstracts are public (methods.md §4.1), so every equation below is
our design, with each open choice a flag. MoR is a router, not a host: it replaces the router of every
routing site of a routed host method, and leaves the host's experts, top-k dispatch and losses as they are.

    s_j = W_j x  (j = 1..M, W_j ∈ R^{E×d}),    ω = softmax(W_main x)  (W_main ∈ R^{M×d}, the same token state)
    combine="prob"  (default):  p = Σ_j ω_j softmax(s_j)
    combine="logit":            p = softmax(Σ_j ω_j s_j)
    w̃ = renormalised top-k of p   (the host's dispatch, unchanged)

All W_j and W_main are initialised ``N(0, σ)`` with the host's router σ, and computed in fp32 in one
matmul, autocast off (as every router). With M = 1, ω ≡ 1 and MoR is exactly the host's router. The host's
balance loss is applied to the combined ``p`` (and the selection made from it); ``sub_router_balance`` adds
a balance loss per sub-router, ``E · Σ F P`` of ``softmax(s_j)`` with its own top-k, masked and reduced over
the sites as the host's loss is (``aux_loss_reduction``), averaged over j. The ``s_j`` of a forward travel in
its routing records (``Routing.sub_logits``), so the loss sees exactly the sites that routed; the lora_mixer
host builds its own records without them, and refuses ``sub_router_balance``.

Flags (methods.md §4.2 table): ``host`` = ``mixlora`` (default: ``adapter=mor`` alone is MixLoRA with MoR
routers) | ``lora_mixer`` | ``per_linear``; ``host_config`` (overrides of the host's config, validated by
the host's config class and completed with its defaults); ``num_routers`` M = 4 (a guess: no source gives
it); ``combine`` = ``prob``; ``sub_router_balance`` = off, with ``sub_router_balance_coef`` = 1e-3
(MixLoRA's coefficient) when on. Stages, trainable parameters and losses are the host's; a lora_mixer
host's routers act in its soft stage and at inference (its hard stage routes by task). Labels carry the
host (``mor/mixlora [reconstruction]``) so that runs on different hosts are never pooled.

Routing logits: for ``"logit"`` they are the combined logits; for ``"prob"`` there are none, and the router
reports ``log p`` instead — the logits whose softmax is ``p``, so any host that re-derives probabilities
from logits still sees the combined distribution. A z-loss on them would be identically 0, so a host
z-loss with ``combine="prob"`` is refused.

``per_linear`` host (MoLA-style, Gao et al. arXiv 2402.08562, as MoE-PEFT implements it; not a registered
method of its own): every adapted linear gets E LoRA experts and its own top-k router,
``y = W0 x + Σ_{e ∈ top-k} w̃_e s B_e A_e x``, with MixLoRA's router, balance-loss and ``expert_compute``
fields: ``grouped`` computes only the selected experts' B, ``dense`` (this host's default: the benchmark
measured grouped no faster on one linear map of rank 8, and with a higher peak memory) all experts at once,
masked (``LoraExperts``). Defaults [R]: all seven projections, 8 experts, top-2, r = 8,
α = 16 (MoLA's rank), balance coefficient 1e-3 (MoE-PEFT's MoLA keeps it off). Its plain baseline is
``adapter=mor adapter.host=per_linear adapter.num_routers=1``.

Not mergeable: routing is input-dependent, as in every host.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    LLAMA_PROJECTIONS,
    Adapter,
    AdapterConfig,
    AdapterConfigError,
    AdapterLayer,
    get_adapter_class,
    register,
    require,
    routed_modules,
)
from .routed import RoutedLoraAdapter, RoutedLoraConfig
from .routing import Routing, TopKRouter, apply_jitter, full_precision, load_balance_loss

HOSTS = ("mixlora", "lora_mixer", "per_linear")
COMBINES = ("prob", "logit")
PASSED_TO_HOST = ("layers_to_transform", "expert_compute", "lora_dropout_sharing", "aux_loss_scope")


# ---------------------------------------------------------------------------------------------- the router


class MixtureOfRouters(TopKRouter):
    """M sub-routers and a main router that weights them (methods.md §4.2); top-k as in the host.

    ``weight`` stacks the rows of all routers, ``[M·E + M, d]``: sub-router j is rows ``j·E … j·E + E − 1``,
    the main router the last M rows, so that one fp32 matmul scores them all.
    """

    def __init__(self, d_in: int, num_experts: int, top_k: int, init_std: float, num_routers: int,
                 combine: str) -> None:
        super().__init__(d_in, num_routers * (num_experts + 1), top_k, init_std)  # all rows, N(0, σ)
        self.num_experts, self.num_routers, self.combine = num_experts, num_routers, combine

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sub-router logits [..., M, E] and main-router logits [..., M], fp32 (autocast off)."""
        raw = super().logits(x)
        split = self.num_routers * self.num_experts
        return raw[..., :split].unflatten(-1, (self.num_routers, self.num_experts)), raw[..., split:]

    def combined(self, sub: Tensor, main: Tensor) -> tuple[Tensor, Tensor]:
        """``(p, logits)`` of the combine rule from the sub- and main-router logits."""
        with full_precision(sub):
            omega = main.softmax(dim=-1).unsqueeze(-1)  # [..., M, 1]
            if self.combine == "logit":
                logits = (omega * sub).sum(dim=-2)
                return logits.softmax(dim=-1), logits
            probs = (omega * sub.softmax(dim=-1)).sum(dim=-2)
            return probs, probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def probabilities(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.combined(*self.scores(x))

    def logits(self, x: Tensor) -> Tensor:
        return self.probabilities(x)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Routing]:
        # the sub-router logits travel in this forward's record: the sub-router balance reads them from the
        # sites that routed, never from state a disabled layer or a shared router could have left behind
        sub, main = self.scores(x)
        return self.dispatch(*self.combined(sub, main), sub_logits=sub)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, routers={self.num_routers}, top_k={self.top_k}, combine={self.combine}"


# ---------------------------------------------------------------------------------------------- per_linear host


@dataclass(kw_only=True)
class PerLinearConfig(RoutedLoraConfig):
    """MoLA-style: every adapted linear gets ``num_experts`` LoRA experts and its own top-k router."""

    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # dense: on one linear map with r = 8 the benchmark did not measure grouped faster, and its peak memory higher
    expert_compute: str = "dense"


class RoutedLoraLinear(AdapterLayer):
    """``W0 x + Σ_{e ∈ top-k} w̃_e s B_e A_e x`` with the layer's own router."""

    def __init__(self, base_layer: nn.Linear, config: PerLinearConfig, router: nn.Module) -> None:
        super().__init__(base_layer)
        self.experts = config.make_experts(base_layer, config.num_experts)
        self.router = router
        self.jitter_noise = config.jitter_noise
        self.expert_compute = config.expert_compute

    def adapted_forward(self, x: Tensor) -> Tensor:
        flat = apply_jitter(x.reshape(-1, x.shape[-1]), self.jitter_noise, self.training)
        weights, self.routing = self.router(flat)
        if self.expert_compute == "grouped":  # the selected experts' B only (experts.py, "Grouped top-k")
            selected = self.routing.selected
            delta = self.experts.routed(flat, selected, weights.gather(-1, selected))
        else:  # all experts at once; the zero weights drop the unselected
            delta = self.experts(flat, weights)
        result = self.base_layer(flat)
        return (result + delta).to(result.dtype).reshape(*x.shape[:-1], -1)  # one cast, as PEFT's LoRA


class PerLinear(RoutedLoraAdapter):
    """The ``per_linear`` host of MoR (not registered: on its own it is MoR with one router)."""

    name = "per_linear"
    config_class = PerLinearConfig
    placement = "linear"
    mergeable = False
    fidelity = "reconstruction"

    def make_layer(self, name: str, module: nn.Module) -> RoutedLoraLinear:
        config = self.config
        router = self.make_router(module.in_features, config.num_experts, config.top_k, config.router_init_std)
        return RoutedLoraLinear(module, config, router.to(module.weight.device))


# ---------------------------------------------------------------------------------------------- the method


def host_class(host: str) -> type[Adapter]:
    require(host in HOSTS, f"host ({host!r}) must be one of {HOSTS}")
    return PerLinear if host == "per_linear" else get_adapter_class(host)


@dataclass(kw_only=True)
class MorConfig(AdapterConfig):
    """The host, its config overrides, and MoR's own flags. Target modules belong to the host
    (``host_config.target_modules``); MoR's own ``target_modules`` must stay unset. ``layers_to_transform``
    is passed on to the host, and so is ``aux_loss_scope``."""

    target_modules: list[str] | str | None = None
    host: str = "mixlora"
    host_config: dict[str, Any] = field(default_factory=dict)
    num_routers: int = 4  # M: a guess, no public source gives it
    combine: str = "prob"
    sub_router_balance: bool = False
    sub_router_balance_coef: float = 1e-3
    # the host's compute flags, set here so that one override reaches every method; null: the host's value
    expert_compute: str | None = None
    lora_dropout_sharing: str | None = None

    def __post_init__(self) -> None:
        # AdapterConfig's target check does not apply: the host's config carries and checks the targets
        require(self.target_modules is None,
                f"target_modules ({self.target_modules!r}): set the targets in host_config, MoR routes the host's")
        for name in PASSED_TO_HOST:  # one override (layers, compute flags) acts the same for every method
            self._pass_to_host(name)
        require(isinstance(self.num_routers, int) and self.num_routers >= 1,
                f"num_routers ({self.num_routers}) must be a positive integer")
        require(self.combine in COMBINES, f"combine ({self.combine!r}) must be one of {COMBINES}")
        require(self.sub_router_balance_coef >= 0,
                f"sub_router_balance_coef ({self.sub_router_balance_coef}) must be >= 0")
        # the loss reads the sub-router logits from the sites' routing records, which lora_mixer builds
        # itself from probabilities() (lora_mixer.MixerRouter) without them
        require(not (self.sub_router_balance and self.host == "lora_mixer"),
                "sub_router_balance: the lora_mixer host's routing records carry no sub-router logits; "
                "use host mixlora or per_linear")
        host = self.host_adapter_config()
        # the host's complete config, defaults filled in: saved adapter configs say exactly what ran, and
        # budget matching reaches the host's rank as "host_config.r"
        self.host_config = host.to_dict()
        require(not (self.combine == "prob" and getattr(host, "router_z_loss_coef", 0.0) > 0),
                "host_config.router_z_loss_coef needs router logits, which combine='prob' does not have; "
                "use combine='logit' or no z-loss")

    def _pass_to_host(self, name: str) -> None:
        """Copy MoR's own ``name`` into ``host_config`` (a conflicting value there fails naming the field)."""
        value = getattr(self, name)
        if value is None:
            return
        value = value if isinstance(value, str) else list(value)
        require(self.host_config.get(name) in (None, value),
                f"{name}: set it here or in host_config, not differently in both")
        self.host_config = {**self.host_config, name: value}

    def host_adapter_config(self) -> AdapterConfig:
        """The host's config: its defaults with ``host_config`` applied, validated by its own class."""
        config_class = host_class(self.host).config_class
        known = {f.name for f in fields(config_class)}
        unknown = sorted(set(self.host_config) - known)
        require(not unknown, f"host_config: unknown field(s) {unknown} for host {self.host!r}")
        try:
            return config_class(**self.host_config)
        except AdapterConfigError as error:
            raise AdapterConfigError(f"host_config ({self.host}): {error}") from error


@register
class MixtureOfRoutersAdapter(Adapter):
    """MoR on a host: the host does everything, built with :class:`MixtureOfRouters` as its router."""

    name = "mor"
    config_class = MorConfig
    placement = "ffn_block"  # the default host's; an instance reports its host's
    mergeable = False
    fidelity = "reconstruction"
    merge_refusal = "its routing is input-dependent, like its host's"
    budget_field = "host_config.r"  # the mixlora and per_linear hosts' rank; lora_mixer's is not sized
    benchmark_variants = {"mor_per_linear": {"host": "per_linear"}}  # the MoLA-style host has no row of its own

    def __init__(self, config: MorConfig) -> None:
        super().__init__(config)
        self.host = host_class(config.host)(config.host_adapter_config())
        self.host.make_router = self.make_router  # every routing site of the host gets a mixture of routers
        self.context = self.host.context  # one batch context for the host's modules and MoR's losses
        self.placement = self.host.placement

    @property
    def label(self) -> str:
        """With the host, so that tables never pool MoR runs on different hosts: ``mor/mixlora [reconstruction]``."""
        return f"{self.name}/{self.host.name} [{self.fidelity}]"

    def make_router(self, d_in: int, num_experts: int, top_k: int, init_std: float) -> MixtureOfRouters:
        return MixtureOfRouters(d_in, num_experts, top_k, init_std, self.config.num_routers, self.config.combine)

    # -- everything else is the host's ------------------------------------------------------------------

    def target_names(self, model: nn.Module) -> list[str]:
        return self.host.target_names(model)

    def inject(self, model: nn.Module) -> None:
        self.host.inject(model)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.host.trainable_parameters(model)

    def stage_schedule(self, max_steps: int) -> list[tuple[int, str]]:
        return self.host.stage_schedule(max_steps)

    def enter_stage(self, model: nn.Module, stage: str) -> None:
        self.host.enter_stage(model, stage)

    def frozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.host.frozen_parameters(model)

    def set_context(self, model: nn.Module, task_ids: Tensor | None, token_mask: Tensor | None,
                    prompt_mask: Tensor | None = None) -> None:
        self.host.set_context(model, task_ids, token_mask, prompt_mask)

    def aux_losses(self, model: nn.Module) -> dict[str, Tensor]:
        losses = self.host.aux_losses(model)
        if self.config.sub_router_balance and self.config.sub_router_balance_coef > 0:
            balance = self.sub_router_balance(model)
            if balance is not None:
                losses["sub_router_balance"] = self.config.sub_router_balance_coef * balance
        return losses

    def sub_router_balance(self, model: nn.Module) -> Tensor | None:
        """``E · Σ F P`` of each sub-router's own softmax and top-k, averaged over j; read from the routing
        records of the sites that routed in the last forward, masked and reduced as the host's balance loss."""
        sites = [module for _, module in routed_modules(model)]
        if not sites:
            return None
        host = self.host.config
        subs = [site.routing.sub_logits for site in sites]
        require(all(sub is not None for sub in subs),
                "sub_router_balance: a routing site reported no sub-router logits (not a MixtureOfRouters)")
        subs = [sub.reshape(-1, *sub.shape[-2:]) for sub in subs]  # [T, M, E] per site
        masks = [site.context.flat_token_mask(sub.shape[0]) for site, sub in zip(sites, subs, strict=True)]
        return torch.stack([load_balance_loss([sub[:, j] for sub in subs], host.top_k, masks, host.aux_loss_reduction)
                            for j in range(self.config.num_routers)]).mean()
