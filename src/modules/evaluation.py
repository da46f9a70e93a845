"""The bridge to the EleutherAI lm-evaluation-harness: score an in-memory model on held-out tasks.

The trained model is wrapped in lm-eval's ``HFLM`` as it is in memory (merged first when the method
allows it) and scored with ``simple_evaluate`` on the task configs the data module writes. Base-model
scores are computed the same way and cached on disk, keyed by everything that determines them: the base
model's identity, the exact task configs and held-out file contents, the limit, the few-shot count, the
maximum length, the batch size and the library versions — and "no adapter", so that no adapter's scores
can be served as base scores.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from moelab.data.files import atomic_write_text, file_lock

TASK_PREFIX = "moelab_"


def lm_eval_scores(model: nn.Module, tokenizer, tasks: list[dict[str, Any]], limit: int | float | None = None,
                   batch_size: int = 8, num_fewshot: int | None = None, bootstrap_iters: int = 0,
                   max_length: int | None = None, device=None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval on ``model`` (eval mode for the call), on ``device``, or where
    its parameters are when None."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        device = str(device if device is not None else next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                         bootstrap_iters=bootstrap_iters, log_samples=False,
                                         task_manager=TaskManager(include_defaults=False), verbosity="ERROR")
    finally:
        model.train(was_training)
    return {task.removeprefix(TASK_PREFIX): _metrics(values) for task, values in output["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """``acc,none`` → ``acc``; stderr entries and aliases dropped."""
    return {key.split(",")[0]: float(value) for key, value in values.items()
            if "," in key and "stderr" not in key and isinstance(value, int | float)}


def mean_score(scores: dict[str, dict[str, float]], metric: str = "acc") -> float | None:
    values = [task_scores[metric] for task_scores in scores.values() if metric in task_scores]
    return sum(values) / len(values) if values else None


def base_score_key(model_identity: str, tasks: list[dict[str, Any]], limit: int | float | None,
                   num_fewshot: int | None, *, max_length: int | None,
                   batch_size: int | None) -> dict[str, Any]:
    """Everything the base-model scores depend on; the cache file is named by its hash.

    ``max_length`` changes how long contexts are truncated. ``batch_size`` matters too, if only slightly:
    lm-eval right-pads each batch to its longest request, and other shapes run other kernels, so that
    near-ties can flip. The library versions cover changed defaults (transformers' attention kernel) and
    numerics. ``bootstrap_iters`` only changes the stderr entries, which the scores drop.
    """
    import lm_eval
    import torch
    import transformers

    task_digests = {}
    for task in tasks:
        data_file = Path(task["dataset_kwargs"]["data_files"]["test"])
        content = json.dumps({k: v for k, v in task.items() if k != "dataset_kwargs"}, sort_keys=True)
        task_digests[task["task"]] = hashlib.sha256(content.encode() + data_file.read_bytes()).hexdigest()
    return {"model": model_identity, "adapter": None, "tasks": task_digests, "limit": limit,
            "num_fewshot": num_fewshot, "max_length": max_length, "batch_size": batch_size,
            "lm_eval": lm_eval.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def cached_scores(cache_dir: str | Path, key: dict[str, Any],
                  compute: Callable[[], dict[str, dict[str, float]]]) -> tuple[dict[str, dict[str, float]], bool]:
    """``(scores, came_from_cache)``: read the file named by ``key`` if its stored key matches exactly,
    otherwise compute and store. Jobs running side by side take turns on a lock, so that one computes and the
    others read; the file is written atomically. A file that cannot be read (a writer killed before atomic
    writes, a disk error) is reported with its path and recomputed."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{digest}.json"
    with file_lock(path.with_suffix(".lock")):
        stored = _read_cache_entry(path)
        if stored is not None and stored.get("key") == key:
            return stored["scores"], True
        scores = compute()
        atomic_write_text(path, json.dumps({"key": key, "scores": scores}, indent=2))
    return scores, False


def _read_cache_entry(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and isinstance(stored.get("scores"), dict):
            return stored
        problem = "it holds no scores"
    except (OSError, ValueError) as error:
        problem = str(error)
    warnings.warn(f"base-score cache entry {path} is unreadable ({problem}); recomputing it", stacklevel=3)
    return None
