"""One pass over the whole job config before anything is loaded: every field a user sets is checked for its
type and range, and every key for its existence, with an error that names the field and the bad value.

* Each node with a ``_target_`` (model, data, module and its optimiser and scheduler, trainer and its
  strategy, loggers, callbacks) is checked against the signature of what it instantiates: an unknown key
  (``+trainer.foo=1``) is refused, and each value must fit its parameter's annotation (a string where a
  number belongs, a bool where a count belongs).
* :data:`RANGES` adds the ranges that annotations cannot say (``trainer.max_steps >= 1``, ``lr > 0``).
* The job's own keys (``seed``, ``resume``, ...) and the ``eval`` block have their types here; the adapter
  block is checked by its method's config class, the budget by the budget planner, both in the training
  pipeline's first step.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from moelab.adapters.base import ConfigError, matches_type, type_name
from moelab.data.protocols import LABEL_SCORING, PROTOCOLS

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"

# The job's own keys and the eval block: name -> annotation (None allowed where the annotation says so)
JOB_FIELDS: dict[str, Any] = {
    "seed": int, "run_name": str, "group": str | None, "threads": int | None, "resume": str,
    "checkpoint_every": int, "progress_every": int, "verbose": bool,
}
EVAL_FIELDS: dict[str, Any] = {
    "enabled": bool, "base": bool, "merge": bool, "limit": int | float | None, "batch_size": int | str,
    "num_fewshot": int | None, "bootstrap_iters": int, "max_length": int | None, "metric": str,
    "splits": list[str], "latency": dict | None,
}


def _positive(value: Any) -> bool:
    return value > 0 and math.isfinite(value)


RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "threads": (lambda v: v >= 1, "must be >= 1 or null"),
    "checkpoint_every": (lambda v: v >= 1, "must be >= 1"),
    "progress_every": (lambda v: v >= 1, "must be >= 1"),
    "trainer.max_steps": (lambda v: v >= 1 or v == -1, "must be >= 1 (or -1 with trainer.max_epochs >= 1)"),
    "trainer.max_epochs": (lambda v: v >= 1 or v == -1, "must be >= 1, or -1 for no limit"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "must be >= 1"),
    "trainer.gradient_clip_val": (lambda v: v >= 0 and math.isfinite(v), "must be >= 0 or null"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "must be >= 1"),
    "module.optimizer.lr": (_positive, "must be a positive, finite learning rate"),
    "module.optimizer.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "module.optimizer.eps": (_positive, "must be > 0"),
    "module.optimizer.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two values in [0, 1)"),
    "module.routing_log_every": (lambda v: v >= 0, "must be >= 0 (0: never)"),
    "module.divergence_factor": (lambda v: v > 1, "must be > 1"),
    "model.dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "must be float32, bfloat16 or float16"),
    "module.routing_tokens": (lambda v: v in ("attention", "answer"), "must be 'attention' or 'answer'"),
    "data.batch_size": (lambda v: v >= 1, "must be >= 1"),
    "data.eval_batch_size": (lambda v: v >= 1, "must be >= 1 or null"),
    "data.max_length": (lambda v: v >= 2, "must be >= 2"),
    "data.num_workers": (lambda v: v >= 0, "must be >= 0"),
    "data.protocol": (lambda v: v in PROTOCOLS, f"must be one of {list(PROTOCOLS)}"),
    "data.label_scoring": (lambda v: v in LABEL_SCORING, f"must be one of {list(LABEL_SCORING)}"),
    "eval.limit": (lambda v: v >= 1 if isinstance(v, int) else 0 < v <= 1, "must be a count >= 1, a share in "
                                                                               "(0, 1], or null"),
    "eval.batch_size": (lambda v: v >= 1 if isinstance(v, int) else v.startswith("auto"), "must be >= 1 or 'auto'"),
    "eval.num_fewshot": (lambda v: v >= 0, "must be >= 0 or null"),
    "eval.bootstrap_iters": (lambda v: v >= 0, "must be >= 0"),
    "eval.max_length": (lambda v: v >= 1, "must be >= 1 or null"),
    "eval.latency.prompt_tokens": (lambda v: v >= 1, "must be >= 1"),
    "eval.latency.new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "eval.latency.repeats": (lambda v: v >= 1, "must be >= 1"),
    "eval.splits": (lambda v: len(v) == len(set(v)) and set(v) <= {"dev", "test"},
                    "must list dev and/or test, each once (test: the table's scores; dev: what tuning may read)"),
}


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad field of the job config; return when all are fine."""
    values = OmegaConf.to_container(cfg, resolve=True)
    _check_added_keys()
    for name, annotation in JOB_FIELDS.items():
        if name in values:
            _check_type(name, values[name], annotation)
    for name, value in (values.get("eval") or {}).items():
        require_known(f"eval.{name}", name in EVAL_FIELDS, sorted(EVAL_FIELDS))
        _check_type(f"eval.{name}", value, EVAL_FIELDS[name])
    for path, node in _targets(values):
        _check_target(path, node)
    for path, (holds, message) in RANGES.items():
        value = _lookup(values, path)
        if value is None:
            continue
        try:
            fine = holds(value)
        except TypeError:  # a target whose annotations could not be read let a string through
            fine = False
        if not fine:
            raise ConfigError(f"{path} ({value!r}) {message}")
    _check_steps(values["trainer"])
    _check_metric(values.get("eval") or {})
    _check_objective(values.get("eval") or {})
    _check_model(values["model"])


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Errors raised while the configs and the data are read are the user's to fix: one line that names the
    field (:class:`ConfigError`), whatever raised it (Hydra wraps a target's error in its own)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError, InstantiationException) as error:
        cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
        raise ConfigError(str(cause).strip().splitlines()[0]) from error


def require_known(path: str, known: bool, choices: list[str]) -> None:
    if not known:
        raise ConfigError(f"{path}: unknown key; known keys: {choices}")


def _check_added_keys() -> None:
    """A key added at the top level from the command line (``+ckpt_path=...``) is read by nothing: refuse it
    instead of ignoring it. (Keys added inside a block are checked against what the block instantiates.)"""
    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("+").split("=", 1)[0]
        if override.startswith("+") and "." not in key and "/" not in key:
            hint = "; to continue from a checkpoint use resume=<path>" if "ckpt" in key else ""
            raise ConfigError(f"{key}: moelab reads no top-level key of that name (added with {override!r}){hint}")


def _check_type(path: str, value: Any, annotation: Any) -> None:
    if not matches_type(value, annotation):
        raise ConfigError(f"{path} ({value!r}) must be {type_name(annotation)}")


def _lookup(values: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def _targets(values: Any, path: str = "") -> list[tuple[str, dict]]:
    """Every node with a ``_target_``, with its path (nested targets included)."""
    found = []
    if isinstance(values, dict):
        if "_target_" in values:
            found.append((path, values))
        for key, value in values.items():
            found += _targets(value, f"{path}.{key}" if path else str(key))
    return found


def _check_target(path: str, node: dict) -> None:
    target = node["_target_"]
    try:
        signature = inspect.signature(get_object(target))
    except Exception as error:  # noqa: BLE001 - any failure to import the target is the user's to fix
        raise ConfigError(f"{path}._target_ ({target!r}) cannot be imported: {error}") from None
    parameters = signature.parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    hints = _hints(get_object(target))
    for key, value in node.items():
        if key.startswith("_") and key.endswith("_"):
            continue
        if key not in parameters:
            if open_ended:
                continue
            named = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            raise ConfigError(f"{path}.{key}: unknown key for {target}; known keys: {sorted(named)}")
        if not (isinstance(value, dict) and "_target_" in value):  # nested targets are checked on their own
            _check_type(f"{path}.{key}", value, hints.get(key, inspect.Parameter.empty))


def _hints(target: Any) -> dict[str, Any]:
    """The parameter annotations of a callable or class, resolved where they can be (else none)."""
    import typing

    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable annotations (forward references) check nothing
        return {}


def _check_objective(evaluation: dict) -> None:
    if HydraConfig.initialized():
        check_objective(str(HydraConfig.get().sweeper.get("_target_") or ""), evaluation)


def check_objective(sweeper: str, evaluation: dict) -> None:
    """A sweeper that optimises the score a job returns (Optuna) reads the dev mean: dev must be scored."""
    if "optuna" in sweeper.lower() and not (evaluation.get("enabled") and "dev" in evaluation.get("splits", [])):
        raise ConfigError("eval.splits must list dev (and eval.enabled be true) under a hyper-parameter search: "
                          "its objective is the mean dev score; the test split is never tuned on")


def _check_steps(trainer: dict) -> None:
    if trainer.get("max_steps") == -1 and trainer.get("max_epochs") in (None, -1):
        raise ConfigError("trainer.max_steps (-1) needs trainer.max_epochs >= 1: the run would never end")


def task_metrics() -> set[str]:
    """The metrics the task templates report (``acc`` everywhere, ``acc_norm`` for multiple choice)."""
    metrics = set()
    for template in TEMPLATES.glob("*.yaml"):
        metrics |= {entry["metric"] for entry in yaml.safe_load(template.read_text())["metric_list"]}
    return metrics


def _check_metric(evaluation: dict) -> None:
    """``auto`` (each task's own headline metric, ``TaskSpec.metric``) or one metric the templates report."""
    metric = evaluation.get("metric")
    if metric is not None and metric != "auto" and metric not in task_metrics():
        raise ConfigError(f"eval.metric ({metric!r}) must be auto (each task's own) or a metric the tasks report: "
                          f"{sorted(task_metrics())}")


def _check_model(model: dict) -> None:
    """A local checkpoint folder must exist (unless an offline asset creates it); anything else is a hub id."""
    pretrained = model.get("pretrained")
    if not isinstance(pretrained, str) or model.get("asset"):
        return
    looks_local = pretrained.startswith(("/", ".", "~")) or Path(pretrained).exists()
    if looks_local and not (Path(pretrained).expanduser() / "config.json").exists():
        raise ConfigError(f"model.pretrained ({pretrained!r}) is no model folder (no config.json there); "
                          "give a local checkpoint folder or a hub id such as 'meta-llama/Llama-3.2-3B'")

