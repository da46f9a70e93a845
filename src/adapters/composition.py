"""Composing LoRA experts: what MoLE (methods.md §2) and LoRA-Mixer (§5) share.

Both wrap linear maps in a :class:`ComposedLinear`,

    y = W0 x + Σ_e w_e(x) · s_e B_e A_e dropout(x),      w(x) ∈ R^E,

and differ only in the *routing site* that computes ``w`` (MoLE's gate, LoRA-Mixer's router). Everything
else lives here, once:

* **Expert sources** (``experts.source``). ``load``: frozen LoRAs read from ``experts.paths`` — moelab runs
  of method ``lora`` or HF PEFT folders, each keeping its own rank and scale (``experts.py``, last section);
  they stay frozen but are part of the adapter state, so checkpoints round-trip. ``train``: the experts are
  trained in the same run, ``experts.r / lora_alpha / lora_dropout`` (PEFT init, B = 0), one per data task
  (``experts.tasks`` = ``${data.tasks}``; expert i ↔ task id i) unless ``experts.num_experts`` is given.
* **Two stages** for ``train``: ``hard`` routes every example to the expert of its task
  (``context.task_ids``, a one-hot ``w``) and trains the experts only; ``soft`` freezes the experts and trains
  the routing sites. Stage ``hard`` lasts ``experts.stage1_steps`` steps, or ``experts.stage1_fraction`` of
  ``trainer.max_steps`` (clamped so that both stages get at least one step). Loaded experts have the ``soft``
  stage only. In eval mode a layer always routes through its site, whatever the stage. The two stages are
  LoRA-Mixer's hard–soft routing (§5.1); MoLE's paper composes LoRAs trained beforehand, and its in-run
  stage ``hard`` is our convenience, close to training one LoRA per task first (the experts share one
  optimiser, so Adam's momentum and gradient clipping act on all of them at once). A stage switch never
  changes ``requires_grad`` (DDP fixes that set when it wraps the model): what a stage freezes is named by
  ``frozen_parameters`` and loses its gradient before every optimiser step, so that AdamW skips it. In stage
  ``soft`` frozen experts therefore still get (discarded) gradients: a little backward work for DDP safety.
* **Shared routing sites.** The projections of one site — each projection alone (``matrix``), one decoder
  layer, a group of layers (``block``) or the whole network — share one gate/router. The site is held by the
  site's first projection in module order, its *leader* (``q_proj`` for attention targets), and reads that
  projection's input and expert outputs; the site's other projections reuse its weights in the same forward.
  For attention targets the leader's input is the normalised layer input, ``input_layernorm(h)``. Only
  leaders report a :class:`~.routing.Routing`, so statistics count every site once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    ATTENTION_PROJECTIONS,
    Adapter,
    AdapterConfig,
    AdapterLayer,
    BatchContext,
    adapter_modules,
    base_modules,
    check_field_types,
    decoder_layer,
    require,
)
from .experts import (
    LoraExperts,
    TrainedLora,
    adapter_dtype,
    check_dropout_sharing,
    check_expert_compute,
    lora_folder,
    read_trained_lora,
    stack_trained_loras,
)
from .routing import Routing

EXPERT_SOURCES = ("train", "load")
HARD, SOFT = "hard", "soft"
SITE_LEVELS = ("matrix", "layer", "block", "network")


# ---------------------------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class ExpertsConfig:
    """Where the experts come from and, when they are trained in the run, how (stage ``hard``)."""

    source: str = "train"  # "train": trained in this run (two stages); "load": frozen LoRAs from `paths`
    paths: list[str] = field(default_factory=list)  # moelab run folders (method lora) or PEFT folders
    tasks: list[Any] = field(default_factory=list)  # the data tasks (${data.tasks}); expert i trains on task i
    num_experts: int | None = None  # null: one per task (train) or per path (load)
    r: int = 16  # rank / alpha / dropout of experts trained in the run (MixLoRA's expert values)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05  # on the expert input, loaded experts included
    use_rslora: bool = False
    stage1_steps: int | None = None  # length of stage `hard` in steps; wins over stage1_fraction
    stage1_fraction: float = 0.8  # length of stage `hard` as a share of trainer.max_steps

    def __post_init__(self) -> None:
        check_field_types(self, prefix="experts.")
        require(self.source in EXPERT_SOURCES, f"experts.source ({self.source!r}) must be one of {EXPERT_SOURCES}")
        self.paths, self.tasks = [str(path) for path in self.paths], list(self.tasks)
        require(isinstance(self.r, int) and self.r > 0, f"experts.r ({self.r}) must be a positive integer")
        require(self.lora_alpha > 0, f"experts.lora_alpha ({self.lora_alpha}) must be positive")
        require(0.0 <= self.lora_dropout < 1.0, f"experts.lora_dropout ({self.lora_dropout}) must be in [0, 1)")
        require(self.stage1_steps is None or (isinstance(self.stage1_steps, int) and self.stage1_steps >= 1),
                f"experts.stage1_steps ({self.stage1_steps}) must be a positive integer or null")
        require(0.0 < self.stage1_fraction < 1.0, f"experts.stage1_fraction ({self.stage1_fraction}) must be in (0, 1)")
        require(self.num_experts is None or (isinstance(self.num_experts, int) and self.num_experts >= 1),
                f"experts.num_experts ({self.num_experts}) must be a positive integer or null")
        if self.source == "load":
            require(bool(self.paths), "experts.paths must name at least one LoRA folder when experts.source is 'load'")
            require(self.num_experts in (None, len(self.paths)),
                    f"experts.num_experts ({self.num_experts}) must equal the number of experts.paths "
                    f"({len(self.paths)})")
            for path in self.paths:
                lora_folder(path)  # a missing or foreign folder fails here, before any model is loaded
        else:
            require(not self.paths, "experts.paths is read only when experts.source is 'load'")
            require(self.num_experts is not None or bool(self.tasks),
                    "experts.num_experts or experts.tasks must be set when experts.source is 'train'")
            require(self.num_experts is None or self.num_experts >= len(self.tasks),
                    f"experts.num_experts ({self.num_experts}) must be >= the number of data tasks "
                    f"({len(self.tasks)}): task i trains expert i")

    @property
    def count(self) -> int:
        if self.source == "load":
            return len(self.paths)
        return self.num_experts if self.num_experts is not None else len(self.tasks)

    def stage1_length(self, max_steps: int) -> int:
        """Steps of stage ``hard``; the fraction is clamped so that both stages run."""
        if self.stage1_steps is not None:
            require(max_steps < 0 or self.stage1_steps < max_steps,
                    f"experts.stage1_steps ({self.stage1_steps}) leaves no step of trainer.max_steps "
                    f"({max_steps}) for the soft stage")
            return self.stage1_steps
        require(max_steps >= 2, f"experts.stage1_fraction needs trainer.max_steps >= 2 (one step per stage), "
                                f"got {max_steps}; set experts.stage1_steps instead for an open-ended run")
        return max(1, min(int(self.stage1_fraction * max_steps), max_steps - 1))


@dataclass(kw_only=True)
class ComposedConfig(AdapterConfig):
    """The fields MoLE and LoRA-Mixer share: targets (attention projections) and the ``experts`` block."""

    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    # "grouped": where the weights are top-k (stage hard, sparse sites) only the selected experts' B is computed;
    # "dense" (default): every expert, masked; with 3 experts the benchmark measured no difference beyond noise
    expert_compute: str = "dense"
    lora_dropout_sharing: str = "per_module"  # "per_input": q/k/v draw one dropout mask (experts.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_compute(self.expert_compute)
        check_dropout_sharing(self.lora_dropout_sharing)
        if isinstance(self.experts, dict):
            known = {f.name for f in fields(ExpertsConfig)}
            unknown = sorted(set(self.experts) - known)
            require(not unknown, f"experts: unknown field(s) {unknown}; known fields: {sorted(known)}")
            self.experts = ExpertsConfig(**self.experts)

    def require_expert_ids(self, name: str, ids: list[int]) -> list[int]:
        """Validate a list of expert indices (``masked_experts``, ``preserve_experts``) and return it."""
        ids = list(ids)
        count = self.experts.count
        require(all(isinstance(i, int) and 0 <= i < count for i in ids),
                f"{name} ({ids}) must hold expert indices in [0, {count})")
        require(len(set(ids)) == len(ids), f"{name} ({ids}) lists an expert twice")
        return ids


# ---------------------------------------------------------------------------------------------- layers


def site_key(module: str, level: str, block_layers: int = 1) -> str:
    """The routing site a module belongs to at ``level`` (see the module docstring)."""
    if level == "matrix":
        return module
    if level == "network":
        return ""
    found = decoder_layer(module)
    require(found is not None, f"cannot tell the decoder layer of {module!r} for a {level}-level routing site")
    stack, index = found
    return f"{stack}.{index}" if level == "layer" else f"{stack}.block{index // block_layers}"


def task_weights(context: BatchContext, x: Tensor, num_experts: int) -> Tensor:
    """Hard routing (stage ``hard``): a one-hot ``[batch, seq, E]`` on the expert of each example's task."""
    tasks = context.token_task_ids(*x.shape[:2]) if x.dim() == 3 else None
    if tasks is None:
        raise RuntimeError("hard routing (stage 'hard') needs the task id of every example of the batch "
                           "(Adapter.set_context(task_ids=...)) and inputs shaped [batch, seq, features]")
    return F.one_hot(tasks.to(x.device), num_experts).reshape(*x.shape[:2], num_experts)


class ComposedLinear(AdapterLayer):
    """``base_layer(x) + Σ_e w_e s_e B_e A_e dropout(x)``: E LoRA experts of one projection, mixed per token.

    ``site`` is the routing site's module on a leader (None elsewhere): called as
    ``site(x, h, experts, context) -> (weights [..., E], Routing)`` with ``h = experts.down(x)``. A site whose
    ``sparse`` is true returns weights that are zero outside ``Routing.selected``; there, and in stage
    ``hard`` (one expert per token), ``expert_compute: grouped`` computes only the selected experts' B.
    """

    def __init__(self, base_layer: nn.Linear, experts: LoraExperts, site: nn.Module | None,
                 leader: ComposedLinear | None, expert_compute: str = "dense") -> None:
        super().__init__(base_layer)
        self.experts = experts
        self.site = site
        self._leader = (leader,) if leader is not None else ()  # a tuple: not a registered submodule
        self.stage = SOFT
        self.expert_compute = expert_compute
        self.shared_weights: Tensor | None = None
        self.shared_support: Tensor | None = None  # [T, k] experts outside which the shared weights are zero

    @property
    def is_leader(self) -> bool:
        return self.site is not None

    def adapted_forward(self, x: Tensor) -> Tensor:
        h = self.experts.down(x)
        weights, support = self._mixing_weights(x, h)
        result = self.base_layer(x)
        if support is not None and self.expert_compute == "grouped":
            flat = weights.reshape(-1, weights.shape[-1])
            delta = self.experts.routed(x.reshape(-1, x.shape[-1]), support, flat.gather(-1, support),
                                        h.reshape(-1, *h.shape[-2:])).reshape(*x.shape[:-1], -1)
        else:
            delta = self.experts.up(h * weights.unsqueeze(-1).to(h.dtype))
        # the fp32 update is added before one cast, as PEFT's LoRA does under a bf16 base
        return (result + delta).to(result.dtype)

    def _mixing_weights(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weights ``[..., E]`` and, when they are zero outside a few experts per token, those [T, k]."""
        num_experts = self.experts.num_experts
        if self.training and self.stage == HARD:
            weights = task_weights(self.context, x, num_experts)
            flat = weights.reshape(-1, num_experts)
            selected = flat.argmax(-1, keepdim=True)
            self.routing = Routing(flat.float(), selected) if self.is_leader else None
            return weights, selected
        if not self.is_leader:
            leader = self._leader[0]
            if leader.shared_weights is None or leader.shared_weights.shape[:-1] != x.shape[:-1]:
                raise RuntimeError("a shared routing site's leader (its first projection in module order) must run "
                                   "before the site's other projections in every forward")
            self.routing = None
            return leader.shared_weights, leader.shared_support
        weights, self.routing = self.site(x, h, self.experts, self.context)
        self.shared_weights = weights
        self.shared_support = self.routing.selected if self.site.sparse else None
        return weights, self.shared_support

    def extra_repr(self) -> str:
        return f"leader={self.is_leader}, stage={self.stage!r}"


def composed_layers(model: nn.Module) -> list[tuple[str, ComposedLinear]]:
    return [(name, m) for name, m in adapter_modules(model) if isinstance(m, ComposedLinear)]


# ---------------------------------------------------------------------------------------------- adapter


class ComposedAdapter(Adapter, ABC):
    """Injection, expert sources, stages and trainable parameters of a LoRA composition.

    A method sets :meth:`site_of` (which site a module belongs to), :meth:`make_site` (the gate or router of
    a leader), and, if its experts also train in the soft stage, :meth:`experts_train_in`.
    """

    placement = "linear"
    mergeable = False
    fidelity = "reconstruction"
    # Experts trained in the run are sized by their rank; a composition of loaded LoRAs trains only its
    # sites and has nothing a budget could size.
    budget_field = "experts.r"
    config: ComposedConfig

    @abstractmethod
    def site_of(self, module: str) -> str:
        """The routing site ``module`` (a path in the model) belongs to."""

    @abstractmethod
    def make_site(self, linear: nn.Linear, experts: LoraExperts) -> nn.Module:
        """The gate or router of the routing site that ``linear`` leads."""

    def experts_train_in(self, stage: str) -> bool:
        return stage == HARD

    # -- injection ------------------------------------------------------------------------------------

    def inject(self, model: nn.Module) -> None:
        loras = [read_trained_lora(path) for path in self.config.experts.paths] or None
        leaders: dict[str, ComposedLinear] = {}
        for name in self._wrapped_names(model, loras):
            linear = model.get_submodule(name)
            experts = self._experts(name, linear, loras)
            leader = leaders.get(self.site_of(name))
            site = None if leader else self.make_site(linear, experts).to(linear.weight.device)
            layer = ComposedLinear(linear, experts, site, leader, self.config.expert_compute)
            leaders.setdefault(self.site_of(name), layer)
            model.set_submodule(name, layer)
        self.enter_stage(model, self.stages[0])

    def _wrapped_names(self, model: nn.Module, loras: list[TrainedLora] | None) -> list[str]:
        """The targets; with loaded experts, those that some expert adapts (each of its modules must be one)."""
        names = self.target_names(model)
        if loras is None:
            return names
        linears = {name for name, m in base_modules(model) if isinstance(m, nn.Linear)}
        for lora in loras:
            for module in lora.modules:
                require(module in linears,
                        f"expert LoRA {lora.path} adapts {module!r}, which is no nn.Linear of {type(model).__name__}")
                require(module in names,
                        f"expert LoRA {lora.path} adapts {module!r}, which target_modules "
                        f"({self.config.target_modules}) does not select: add it, or use 'all-linear'")
        return [name for name in names if any(name in lora.modules for lora in loras)]

    def _experts(self, name: str, linear: nn.Linear, loras: list[TrainedLora] | None) -> LoraExperts:
        cfg = self.config.experts
        sharing = self.config.lora_dropout_sharing
        if loras is not None:
            return stack_trained_loras(loras, name, linear, cfg.lora_dropout, sharing)
        return LoraExperts(cfg.count, linear.in_features, linear.out_features, cfg.r, cfg.lora_alpha, cfg.lora_dropout,
                           cfg.use_rslora, dtype=adapter_dtype(linear.weight.dtype), device=linear.weight.device,
                           dropout_sharing=sharing)

    # -- stages ---------------------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[str, ...]:
        return (HARD, SOFT) if self.config.experts.source == "train" else (SOFT,)

    def stage_schedule(self, max_steps: int) -> list[tuple[int, str]]:
        if self.config.experts.source == "train":
            return [(0, HARD), (self.config.experts.stage1_length(max_steps), SOFT)]
        return [(0, SOFT)]

    def enter_stage(self, model: nn.Module, stage: str) -> None:
        self.stage = stage
        for _, layer in composed_layers(model):
            layer.stage = stage

    def frozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Experts outside the stages that train them, sites in stage ``hard`` (where nothing routes)."""
        frozen = []
        for _, layer in composed_layers(model):
            if not self.experts_train_in(self.stage):
                frozen += [p for p in layer.experts.parameters() if p.requires_grad]
            if layer.is_leader and self.stage == HARD:
                frozen += list(layer.site.parameters())
        return frozen

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter that trains in some stage: the sites, and the experts when they are trained."""
        experts_train = any(self.experts_train_in(stage) for stage in self.stages)
        parameters = []
        for _, layer in composed_layers(model):
            if experts_train:
                parameters += list(layer.experts.parameters())
            if layer.is_leader:
                parameters += list(layer.site.parameters())
        return parameters

    # -- what the aux losses read ---------------------------------------------------------------------

    def soft_routing(self, model: nn.Module) -> list[tuple[Routing, Tensor | None]]:
        """``(routing, token mask [T])`` of every site that routed through its site in the last training
        forward; empty in the hard stage and in eval mode."""
        return [(layer.routing, layer.context.flat_token_mask(layer.routing.probs.shape[0]))
                for _, layer in composed_layers(model)
                if layer.is_leader and layer.training and layer.stage == SOFT and layer.routing is not None]
