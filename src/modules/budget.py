"""Parameter budgets (``budget=...``): every method sized to the same number of trainable parameters.

A budget names a reference adapter — by default a LoRA of a given rank on given projections, the way the
method papers size their LoRA baselines (methods.md §1.3) — and its trainable parameter count on the run's base
model is the target. The run's method is then sized through its ``budget_field`` (a class attribute of its
:class:`~moelab.adapters.Adapter`, usually the rank ``r``; a dotted path reaches into a nested config): the
integer value whose trainable count is closest to the target is chosen. Every count injects the adapter
into a meta-device copy of the base model, which has the module structure but no weights and no memory.
Fields named in ``scale_with`` (e.g. ``lora_alpha``), looked up next to the budget field, are scaled in
proportion, so that α / r stays as configured.

The rule, the target, the chosen value and the achieved count are written into results.json (``budget``)
and shown by the comparison tables.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from moelab.adapters import AdapterConfig, config_from_dict, count_parameters, inject, registered_adapters
from moelab.adapters.base import AdapterConfigError, adapter_for, require

BUDGET_KEYS = ("reference", "scale_with")
MAX_VALUE = 1 << 16


def _get(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = config[part] if isinstance(config, dict) else getattr(config, part)
    return config


def _has(config: Any, path: str) -> bool:
    try:
        _get(config, path)
    except (AttributeError, KeyError, TypeError):
        return False
    return True


def _replaced(config: Any, path: str, value: Any) -> Any:
    """A copy of ``config`` (dataclasses and dicts) with ``path`` set to ``value``; dataclasses re-validate."""
    head, _, rest = path.partition(".")
    new = _replaced(_get(config, head), rest, value) if rest else value
    if isinstance(config, dict):
        return {**config, head: new}
    return dataclasses.replace(config, **{head: new})


def _sibling(path: str, name: str) -> str:
    """``name`` next to ``path``: the α of ``experts.r`` is ``experts.lora_alpha``."""
    parent = path.rpartition(".")[0]
    return f"{parent}.{name}" if parent else name


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of a transformers model's module structure on the meta device: no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config)


def trainable_count(skeleton: nn.Module, config: AdapterConfig) -> int:
    model = copy.deepcopy(skeleton)
    inject(model, config)
    return count_parameters(model)["trainable"]


def closest_value(count: Callable[[int], int], target: int, name: str) -> int:
    """The integer ``v >= 1`` whose ``count(v)`` is closest to ``target`` (the smaller on a tie), for counts
    that grow with ``v``: doubling brackets the target, bisection finds the crossing."""
    count = functools.cache(count)
    low, high = 0, 1
    while count(high) < target:
        if high >= MAX_VALUE or (low and count(high) == count(low)):
            raise AdapterConfigError(f"budget: no {name} up to {high} reaches {target:,} trainable parameters "
                                     f"({name}={high} gives {count(high):,})")
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target else (low, middle)
    if low == 0:
        return high
    return low if target - count(low) <= count(high) - target else high


@dataclass
class BudgetPlan:
    """A validated budget for one run's method; :meth:`fit` sizes it on the base model."""

    method: str
    config: AdapterConfig
    field: str | None
    scale_with: list[str]
    reference_name: str
    reference: AdapterConfig

    def scaled_paths(self) -> list[str]:
        """The ``scale_with`` fields, next to the budget field, that this method's config sets."""
        paths = [_sibling(self.field, name) for name in self.scale_with]
        return [path for path in paths if _has(self.config, path) and _get(self.config, path) is not None]

    def resized(self, value: int) -> AdapterConfig:
        configured = _get(self.config, self.field)
        config = _replaced(self.config, self.field, value)
        for path in self.scaled_paths():
            config = _replaced(config, path, _get(self.config, path) * value / configured)
        return config

    def rule(self, target: int) -> str:
        values = self.reference.to_dict()
        shown = ", ".join(f"{key}={values[key]}" for key in ("r", "target_modules", "layers_to_transform")
                          if values.get(key) is not None)
        return f"trainable parameters matched to {self.reference_name}({shown}) = {target:,}"

    def fit(self, model: nn.Module) -> tuple[AdapterConfig, dict[str, Any]]:
        """The method's config sized to the reference's trainable count on ``model``, and the report."""
        skeleton = meta_skeleton(model)
        target = trainable_count(skeleton, self.reference)
        report = {"rule": self.rule(target), "reference": {"name": self.reference_name, **self.reference.to_dict()},
                  "target": target, "method": self.method, "field": self.field}
        if self.field is None:  # the method declares nothing to size: it keeps its configured size
            achieved = trainable_count(skeleton, self.config)
            return self.config, {**report, "sized": False, "achieved": achieved,
                                 "relative_error": (achieved - target) / target,
                                 "sizing": f"{self.method} has no budget field; {achieved:,} trainable parameters"}
        value = closest_value(lambda v: trainable_count(skeleton, self.resized(v)), target,
                              f"{self.method}.{self.field}")
        config, configured = self.resized(value), _get(self.config, self.field)
        achieved = trainable_count(skeleton, config)
        error = (achieved - target) / target
        return config, {**report, "sized": True, "configured": configured, "value": value,
                        "scaled": {path: [_get(self.config, path), _get(config, path)] for path in self.scaled_paths()},
                        "achieved": achieved, "relative_error": error,
                        "sizing": f"{self.method}.{self.field} = {value} (configured {configured}): "
                                  f"{achieved:,} trainable parameters ({100 * error:+.2f}% of the target)"}


def plan_budget(budget: DictConfig | dict | None, config: AdapterConfig) -> BudgetPlan | None:
    """Validate ``cfg.budget`` against the run's method config before any model is loaded; None = no budget."""
    if budget is None:
        return None
    values = OmegaConf.to_container(budget, resolve=True) if isinstance(budget, DictConfig) else dict(budget)
    unknown = sorted(set(values) - set(BUDGET_KEYS))
    require(not unknown, f"budget: unknown field(s) {unknown}; known fields: {list(BUDGET_KEYS)}")
    reference = dict(values.get("reference") or {})
    require("name" in reference, "budget.reference.name must name the reference adapter (e.g. lora)")
    reference_name = reference.pop("name")
    try:
        reference_config = config_from_dict(reference_name, reference)
    except AdapterConfigError as error:
        raise AdapterConfigError(f"budget.reference: {error}") from None

    adapter_cls = adapter_for(config)
    field = adapter_cls.budget_field
    if field is not None:
        require(_has(config, field), f"budget: {adapter_cls.name}'s budget_field {field!r} is not a field of "
                                     f"{type(config).__name__}")
        configured = _get(config, field)
        require(isinstance(configured, int) and configured > 0,
                f"budget: {adapter_cls.name}.{field} ({configured!r}) must be a positive integer to be sized")

    scale_with = list(values.get("scale_with") or [])
    known = {f.name for cls in registered_adapters().values() for f in _all_fields(cls.config_class)}
    typos = sorted(set(scale_with) - known)
    require(not typos, f"budget.scale_with: {typos} is no field of any method's config")
    return BudgetPlan(adapter_cls.name, config, field, scale_with, reference_name, reference_config)


def _all_fields(config_class: type) -> list[dataclasses.Field]:
    """A config class's fields and those of its nested config dataclasses."""
    found, hints = [], typing.get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        found.append(item)
        if isinstance(hints[item.name], type) and dataclasses.is_dataclass(hints[item.name]):
            found += _all_fields(hints[item.name])
    return found
