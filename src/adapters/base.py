"""The adapter contract: configs, the registry, injection, merging and adapter-only state.

A method is one file in ``moelab/adapters/`` that defines

* a config dataclass (a subclass of :class:`AdapterConfig`) validated in ``__post_init__`` with errors that
  name the field, and
* an :class:`Adapter` subclass decorated with :func:`register`, which carries the class-level facts the
  trainer reads instead of method names (``placement``, ``mergeable``, ``fidelity``) and knows how to put
  its layers into a model (:meth:`Adapter.make_layer`, or :meth:`Adapter.inject` for anything unusual).

Everything a method puts into a model is an :class:`AdapterModule`; the ones that take the place of a base
module are :class:`AdapterLayer` and keep that module, frozen, as ``base_layer``. The vocabulary follows
HF PEFT's LoRA tuner: ``get_delta_weight``, ``merge(safe_merge=...)``, ``unmerge``, ``merge_and_unload``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import re
import types
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import torch
from torch import Tensor, nn

ALL_LINEAR = "all-linear"
# The projections of a LLaMA-style decoder layer, as transformers names them (Llama, Gemma, Qwen, SmolLM alike)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LLAMA_PROJECTIONS = ATTENTION_PROJECTIONS + FFN_PROJECTIONS
FIDELITY_LABELS = ("official-code-parity", "paper-equations", "reconstruction")
PLACEMENTS = ("linear", "ffn_block")
AUX_LOSS_SCOPES = ("local", "global")


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the offending field and value. The entry point
    prints it as one line (the traceback goes to the run's error.txt)."""


class AdapterConfigError(ConfigError):
    """A configuration error in the ``adapter`` block."""


class MergeError(RuntimeError):
    """Raised when a method cannot be merged into the base weights, a safe merge finds NaN/Inf, or adapter
    weights are loaded into merged layers."""


def matches_type(value: Any, annotation: Any) -> bool:
    """Whether a plain config value fits a type annotation: ``int`` takes no bool and no string, ``float``
    takes ints, unions and ``Literal`` are followed, lists are checked element by element; a dataclass field
    also takes the dict it is built from. Annotations it does not know (classes such as a torch dtype) pass."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if origin in (Union, types.UnionType):
        return any(matches_type(value, member) for member in args)
    if origin is Literal:
        return value in args and type(value) in {type(arg) for arg in args}
    if annotation is type(None):
        return value is None
    simple = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    if annotation in simple:
        return isinstance(value, simple[annotation]) and (annotation is bool or not isinstance(value, bool))
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, list | tuple) and (not args or args[-1] is Ellipsis or all(
            matches_type(item, args[0]) for item in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if is_dataclass(annotation):
        return isinstance(value, annotation | dict)
    return True


def type_name(annotation: Any) -> str:
    """How an annotation reads in an error message: ``int``, ``float or None``, ``one of ['a', 'b']``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(member) for member in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def check_field_types(config: Any, prefix: str = "") -> None:
    """Every dataclass field of ``config`` against its annotation, before any range check compares a string
    with a number or counts ``True`` as 1."""
    hints = get_type_hints(type(config))
    for item in fields(config):
        value = getattr(config, item.name)
        require(matches_type(value, hints[item.name]),
                f"{prefix}{item.name} ({value!r}) must be {type_name(hints[item.name])}")


def require(condition: bool, message: str) -> None:
    """Config validation: raise :class:`AdapterConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise AdapterConfigError(message)


# ----------------------------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every method shares. Subclasses add theirs and extend ``__post_init__``."""

    # Module names matched against the end of each module path (``q_proj`` matches
    # ``model.layers.3.self_attn.q_proj``), or "all-linear" for every nn.Linear except the LM head.
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Decoder-layer indices to adapt (PEFT's name); None = every layer. Adapting only the top layers also
    # stops the backward pass there, which is what makes short CPU runs affordable.
    layers_to_transform: list[int] | None = None
    # Batch statistics of the balance losses (methods that have them): "local" per process and micro-batch,
    # as the papers compute them on one GPU; "global" over all processes of the step (Qiu et al.,
    # arXiv 2501.11873), which costs two all-reduces per statistic. Equal on one process.
    aux_loss_scope: str = "local"
    # Whether an empty target list is meaningful: only for a method that adapts other modules anyway.
    allows_empty_targets: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_field_types(self)
        require(self.aux_loss_scope in AUX_LOSS_SCOPES,
                f"aux_loss_scope ({self.aux_loss_scope!r}) must be one of {AUX_LOSS_SCOPES}")
        if self.layers_to_transform is not None:
            self.layers_to_transform = list(self.layers_to_transform)
            require(len(self.layers_to_transform) > 0 and all(isinstance(i, int) and i >= 0
                                                              for i in self.layers_to_transform),
                    f"layers_to_transform ({self.layers_to_transform}) must be null or non-negative layer indices")
        if isinstance(self.target_modules, str):
            require(self.target_modules == ALL_LINEAR,
                    f"target_modules ({self.target_modules!r}) must be a list of module names or "
                    f"{ALL_LINEAR!r}")
        else:
            self.target_modules = list(self.target_modules)
            require(self.allows_empty_targets or len(self.target_modules) > 0, "target_modules must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_from_dict(name: str, values: dict[str, Any]) -> AdapterConfig:
    """Build the registered method ``name``'s config from plain values, naming any unknown field."""
    adapter_cls = get_adapter_class(name)
    known = {f.name for f in fields(adapter_cls.config_class)}
    unknown = sorted(set(values) - known)
    require(not unknown, f"adapter {name!r}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return adapter_cls.config_class(**values)


# ---------------------------------------------------------------------------------------------- modules


@dataclass
class BatchContext:
    """What the trainer knows about the current batch and adapters may use.

    ``task_ids`` ([batch]) drives hard routing by task; ``token_mask`` ([batch, seq], bool) says which
    tokens count for balance losses and routing statistics; ``prompt_mask`` ([batch, seq], bool) marks
    the real prompt tokens (not answer, not padding) for sequence-level gates. All are None outside
    training (lm-eval), where adapters must work without them.
    """

    task_ids: Tensor | None = None
    token_mask: Tensor | None = None
    prompt_mask: Tensor | None = None

    def flat_token_mask(self, num_tokens: int) -> Tensor | None:
        """The token mask flattened to [T]; None without a batch (lm-eval). A mask of other tokens is an error,
        not a reason to compute masked losses unmasked."""
        if self.token_mask is None:
            return None
        if self.token_mask.numel() != num_tokens:
            raise RuntimeError(f"the batch's token mask covers {self.token_mask.numel()} tokens, the layer saw "
                               f"{num_tokens}: set_context was given another batch than the forward ran on")
        return self.token_mask.reshape(-1)

    def token_task_ids(self, batch: int, seq: int) -> Tensor | None:
        """Task id of every token, [batch * seq], or None when unknown."""
        if self.task_ids is None or self.task_ids.numel() != batch:
            return None
        return self.task_ids.repeat_interleave(seq)


class AdapterModule(nn.Module):
    """Anything an adapter adds to a model. Routed modules set ``self.routing`` on every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.context = BatchContext()
        self.routing = None  # a routing.Routing for the last forward, when the module routes

    def aux_losses(self) -> dict[str, Tensor]:
        """Named auxiliary losses of the last forward, already multiplied by their coefficients."""
        return {}


class AdapterLayer(AdapterModule):
    """An adapter module that takes the place of ``base_layer``; the base stays frozen inside it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.disabled = False
        self.merged = False

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled or self.merged:
            self.routing = None
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement adapted_forward")

    def get_delta_weight(self) -> Tensor:
        """The update ``ΔW`` such that the layer equals ``base_layer`` with weight ``W0 + ΔW``."""
        raise MergeError(f"{type(self).__name__} has no input-independent weight update to merge")

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """``(A [R, d_in], B [d_out, R])`` with ``B @ A == get_delta_weight()``: the update as one plain LoRA
        of rank R and scale 1, which is what a PEFT-format export writes."""
        raise MergeError(f"{type(self).__name__} has no input-independent weight update to export")


# ---------------------------------------------------------------------------------------------- registry


class Adapter:
    """A method: its class-level facts and how its layers enter a model.

    Subclasses set the class attributes and implement :meth:`make_layer` (one call per matched target
    module) or override :meth:`inject`. Everything else has a generic default that methods may override:
    which parameters train (:meth:`trainable_parameters`), training stages (:meth:`stage_schedule`,
    :meth:`enter_stage`), how per-layer aux losses combine (:meth:`aux_losses`).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    placement: ClassVar[str]  # "linear": wraps one nn.Linear; "ffn_block": replaces a decoder layer's FFN
    mergeable: ClassVar[bool]
    fidelity: ClassVar[str]
    # Why a non-mergeable method refuses to merge, completed into the error message.
    merge_refusal: ClassVar[str] = "its expert weights depend on the input"
    # What the routing columns of a comparison mean for this method, when it is not a top-k router's choice.
    routing_meaning: ClassVar[str | None] = None
    # The config field that sizes the method, scaled when a parameter budget is matched (budget=...).
    budget_field: ClassVar[str] = "r"
    # Rows the speed benchmark times besides the method's defaults: row name → config overrides (another host).
    benchmark_variants: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: AdapterConfig) -> None:
        require(isinstance(config, self.config_class),
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.context = BatchContext()

    @property
    def label(self) -> str:
        """The method name with its fidelity label, as every report prints it: ``mixlora [official-code-parity]``."""
        return f"{self.name} [{self.fidelity}]"

    # -- injection ------------------------------------------------------------------------------------

    def target_names(self, model: nn.Module) -> list[str]:
        """Paths of the modules this method wraps or replaces; fails when a target matches nothing."""
        return in_selected_layers(match_linear_targets(model, self.config.target_modules),
                                  self.config.layers_to_transform)

    def make_layer(self, name: str, module: nn.Module) -> AdapterModule:
        raise NotImplementedError(f"{type(self).__name__} must implement make_layer or inject")

    def inject(self, model: nn.Module) -> None:
        for name in self.target_names(model):
            model.set_submodule(name, self.make_layer(name, model.get_submodule(name)))

    def make_router(self, d_in: int, num_experts: int, top_k: int, init_std: float) -> nn.Module:
        """The router of one routing site. Routed methods build every router through this, so that a
        router method (MoR) can plug into any host by replacing it."""
        from .routing import TopKRouter

        return TopKRouter(d_in, num_experts, top_k, init_std)

    # -- training -------------------------------------------------------------------------------------

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the optimiser owns: every adapter parameter that trains in some stage."""
        return [p for _, p in adapter_parameters(model) if p.requires_grad]

    def stage_schedule(self, max_steps: int) -> list[tuple[int, str]]:
        """``(first_step, stage_name)`` pairs in order; empty for single-stage methods."""
        return []

    def enter_stage(self, model: nn.Module, stage: str) -> None:
        """Switch the routing mode for ``stage`` (see :meth:`stage_schedule`). It must not change which
        parameters require grad: DDP fixes that set when it wraps the model. Parameters a stage does not train
        are named by :meth:`frozen_parameters` instead."""

    def frozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters of :meth:`trainable_parameters` that the current stage must leave untouched: the trainer
        drops their gradients before every optimiser step (after DDP has all-reduced them), so that AdamW
        skips them entirely, moments and weight decay included."""
        return []

    def aux_losses(self, model: nn.Module) -> dict[str, Tensor]:
        """Each named aux loss averaged over the modules that report it (one value per routed layer)."""
        per_name: dict[str, list[Tensor]] = {}
        for _, module in adapter_modules(model):
            for key, value in module.aux_losses().items():
                per_name.setdefault(key, []).append(value)
        return {key: torch.stack(values).mean() for key, values in per_name.items()}

    def set_context(self, model: nn.Module, task_ids: Tensor | None, token_mask: Tensor | None,
                    prompt_mask: Tensor | None = None) -> None:
        """Tell every adapter module about the next batch (hard routing, masked losses and statistics)."""
        self.context.task_ids = task_ids
        self.context.token_mask = token_mask
        self.context.prompt_mask = prompt_mask


_REGISTRY: dict[str, type[Adapter]] = {}


def register(adapter_cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a method available under ``adapter_cls.name`` (and ``adapter=<name>``)."""
    for attribute in ("name", "config_class", "placement", "mergeable", "fidelity"):
        if not hasattr(adapter_cls, attribute):
            raise TypeError(f"{adapter_cls.__name__} must define the class attribute {attribute!r}")
    if adapter_cls.fidelity not in FIDELITY_LABELS:
        raise TypeError(f"{adapter_cls.__name__}.fidelity must be one of {FIDELITY_LABELS}")
    if adapter_cls.placement not in PLACEMENTS:
        raise TypeError(f"{adapter_cls.__name__}.placement must be one of {PLACEMENTS}")
    _REGISTRY[adapter_cls.name] = adapter_cls
    return adapter_cls


def _import_method_modules() -> None:
    """Import every module of this package once, so that each method file registers itself."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")


def registered_adapters() -> dict[str, type[Adapter]]:
    """All methods by name; a new method file is found without editing anything else."""
    _import_method_modules()
    return dict(sorted(_REGISTRY.items()))


def get_adapter_class(name: str) -> type[Adapter]:
    adapters = registered_adapters()
    require(name in adapters, f"unknown adapter {name!r}; registered: {sorted(adapters)}")
    return adapters[name]


def adapter_for(config: AdapterConfig) -> type[Adapter]:
    for adapter_cls in registered_adapters().values():
        if type(config) is adapter_cls.config_class:
            return adapter_cls
    raise AdapterConfigError(f"no registered adapter uses {type(config).__name__}")


# --------------------------------------------------------------------------------------- model surgery


def match_linear_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Paths of the nn.Linear modules named by ``target_modules`` (suffix match or "all-linear")."""
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [name for name, m in base_modules(model) if isinstance(m, nn.Linear) and m is not output_embedding]
    if target_modules == ALL_LINEAR:
        matched = linears
    else:
        matched = [name for name in linears if any(_suffix_match(name, t) for t in target_modules)]
        unmatched = [t for t in target_modules if not any(_suffix_match(name, t) for name in linears)]
        require(not unmatched,
                f"target_modules: {unmatched} match no nn.Linear in {type(model).__name__} "
                f"(linear names there: {sorted({n.rsplit('.', 1)[-1] for n in linears})})")
    require(bool(matched), f"target_modules {target_modules!r} match no module of {type(model).__name__}")
    return matched


# ``<stack>.<i>.`` in a module path: the i-th decoder layer (``model.layers.3.``, GPT-2's ``transformer.h.3.``).
_DECODER_LAYER = re.compile(r"^(?P<stack>(?:.*?\.)?(?:layers|layer|h|blocks))\.(?P<index>\d+)\.")


def decoder_layer(module: str) -> tuple[str, int] | None:
    """``(stack path, index)`` of the decoder layer a module path lies in, or None outside the layers."""
    match = _DECODER_LAYER.match(module)
    return (match["stack"], int(match["index"])) if match else None


def in_selected_layers(names: list[str], layers: list[int] | None) -> list[str]:
    """The ``names`` inside the decoder layers ``layers``; all of them when None."""
    if layers is None:
        return names
    indices = {name: decoder_layer(name) for name in names}
    kept = [name for name, found in indices.items() if found and found[1] in layers]
    present = sorted({found[1] for found in indices.values() if found})
    require(bool(kept), f"layers_to_transform ({layers}) selects no target: the targets sit in layers {present}")
    return kept


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every submodule with its path, not descending into adapter modules (which are yielded)."""
    for child_name, child in module.named_children():
        path = f"{prefix}.{child_name}" if prefix else child_name
        yield path, child
        if not isinstance(child, AdapterModule):
            yield from _walk(child, path)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules of the base model that no adapter has wrapped or replaced."""
    return ((name, m) for name, m in _walk(model) if not isinstance(m, AdapterModule))


def inject(model: nn.Module, config: AdapterConfig) -> Adapter:
    """Put the method described by ``config`` into ``model`` in place; freeze everything else.

    Returns the :class:`Adapter`, which the trainer asks for aux losses, stages and facts. The model also
    keeps it as ``model.moelab_adapter`` so that functions given only the model can find it.
    """
    require(not list(adapter_modules(model)), "the model already carries an adapter; inject once per model")
    adapter = adapter_for(config)(config)
    model.requires_grad_(False)  # adapter parameters are created afterwards and train unless the method
    adapter.inject(model)        # freezes them itself (loaded experts, for instance)
    for _, module in adapter_modules(model):
        module.context = adapter.context
    model.moelab_adapter = adapter
    return adapter


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Every adapter module that is not nested inside another one, with its path."""
    return ((name, m) for name, m in _walk(model) if isinstance(m, AdapterModule))


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    return ((name, m) for name, m in adapter_modules(model) if isinstance(m, AdapterLayer))


def routed_modules(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """Adapter modules that produced a routing record in the last forward (the routing sites)."""
    return [(name, m) for name, m in adapter_modules(model) if m.routing is not None]


def _is_adapter_key(key: str) -> bool:
    return not (key == "base_layer" or key.startswith("base_layer.") or ".base_layer." in f".{key}")


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, module in adapter_modules(model):
        for key, parameter in module.named_parameters():
            if _is_adapter_key(key):
                yield f"{name}.{key}", parameter


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors only (parameters and persistent buffers), keyed by their path in the model."""
    state: dict[str, Tensor] = {}
    for name, module in adapter_modules(model):
        for key, tensor in module.state_dict().items():
            if _is_adapter_key(key):
                state[f"{name}.{key}"] = tensor
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    """Copy adapter tensors into an injected model; missing, unexpected or misshapen keys fail by name.

    Refused while layers are merged: their base weights hold the old ``ΔW``, and unmerging after the load
    would subtract the new one. The tensors go in through each adapter module's ``load_state_dict``, so
    that modules which keep weight-derived caches (FURINA) see the load through their pre-hooks.
    """
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise MergeError(f"{source}: {len(merged)} adapter layer(s) are merged into the base weights "
                         f"({merged[0]}{', ...' if len(merged) > 1 else ''}); call unmerge(model) before loading "
                         "adapter weights, or unmerging later would subtract the new update from the old one")
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterConfigError(f"{source}: missing adapter keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                 f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, target in expected.items():
        if state[key].shape != target.shape:
            raise AdapterConfigError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                                     f"the model expects {tuple(target.shape)}")
    for name, module in adapter_modules(model):
        prefix = f"{name}."
        # strict=False: the frozen base_layer keys are absent by design; every adapter key was checked above
        module.load_state_dict({key.removeprefix(prefix): value for key, value in state.items()
                                if key.startswith(prefix)}, strict=False)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Base, adapter and trainable parameter counts (tied weights counted once)."""
    adapter_ids = {id(p) for _, p in adapter_parameters(model)}
    unique = {id(p): p for p in model.parameters()}
    adapter = sum(p.numel() for i, p in unique.items() if i in adapter_ids)
    adapter_obj = getattr(model, "moelab_adapter", None)
    trainable = (sum(p.numel() for p in adapter_obj.trainable_parameters(model)) if adapter_obj
                 else sum(p.numel() for p in unique.values() if p.requires_grad))
    return {"base": sum(p.numel() for p in unique.values()) - adapter, "adapter": adapter,
            "trainable": trainable}


# ---------------------------------------------------------------------------------------------- merging


def _refuse_unless_mergeable(model: nn.Module) -> None:
    adapter = getattr(model, "moelab_adapter", None)
    if adapter is not None and not adapter.mergeable:
        raise MergeError(f"{adapter.name} cannot be merged into the base weights: {adapter.merge_refusal}. "
                         "Evaluate it unmerged.")


def merge(model: nn.Module, safe_merge: bool = False) -> None:
    """Add every layer's ``ΔW`` to its base weight, one layer at a time and without autograd, so that a
    single dense ``ΔW`` is alive at any moment. With ``safe_merge`` every merged weight ``W + ΔW`` is checked
    for NaN/Inf first (PEFT checks the sum too: a finite ``ΔW`` can still overflow a bf16/fp16 base), and
    nothing changes if any fails. Merging twice warns and changes nothing."""
    _refuse_unless_mergeable(model)
    layers = list(adapter_layers(model))
    pending = [(name, layer) for name, layer in layers if not layer.merged]
    if len(pending) < len(layers):
        warnings.warn("some adapter layers are already merged; merging only the others", stacklevel=2)
    if safe_merge:
        _check_merged_weights(pending)
    _add_deltas(pending, sign=1)


def _check_merged_weights(layers: list[tuple[str, AdapterLayer]]) -> None:
    """Safe merge: ``W + ΔW`` of every layer must be finite in the base dtype. All layers are checked before
    any is written, so that a failure leaves the weights bit for bit as they were (subtracting ``ΔW`` again
    would not restore bf16 weights exactly); the price is computing each ``ΔW`` twice."""
    with torch.no_grad():
        for name, layer in layers:
            weight = layer.base_layer.weight
            if not torch.isfinite((weight + layer.get_delta_weight()).to(weight.dtype)).all():
                raise MergeError(f"safe merge: W + ΔW of {name} contains NaN or Inf (in {weight.dtype}); "
                                 "nothing was merged")


def _add_deltas(layers: list[tuple[str, AdapterLayer]], sign: int) -> None:
    """``W ← W ± ΔW`` layer by layer (``sign`` = ±1), marking the layers merged or unmerged. The in-place add
    keeps ``ΔW``'s (at least fp32) precision and rounds the sum to the base dtype once, as PEFT's does."""
    with torch.no_grad():
        for _, layer in layers:
            layer.base_layer.weight.add_(layer.get_delta_weight(), alpha=sign)
            layer.merged = sign > 0


def unmerge(model: nn.Module) -> None:
    """Subtract every merged layer's ``ΔW`` again, restoring the base weights (up to rounding)."""
    _add_deltas([(name, layer) for name, layer in adapter_layers(model) if layer.merged], sign=-1)


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge, then put every base layer back in its place: a plain transformers model remains."""
    merge(model, safe_merge=safe_merge)
    for name, layer in list(adapter_layers(model)):
        model.set_submodule(name, layer.base_layer)
    if hasattr(model, "moelab_adapter"):
        del model.moelab_adapter
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the context every adapter layer returns its base layer's output. Layers that were merged are
    unmerged for it and merged again on exit — those layers only, not every layer."""
    layers = [layer for _, layer in adapter_layers(model)]
    merged = [(name, layer) for name, layer in adapter_layers(model) if layer.merged]
    _add_deltas(merged, sign=-1)
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer.disabled = state
        _add_deltas(merged, sign=1)
