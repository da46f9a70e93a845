"""The bridge to the EleutherAI lm-evaluation-harness: score an in-memory model on a split's tasks.

The trained model is wrapped in lm-eval's ``HFLM`` as it is in memory (merged first when the method
allows it) and scored with ``simple_evaluate`` on the task configs the data module writes. Base-model
scores are computed the same way and cached on disk, keyed by everything that determines them: the base
model's identity, the exact task configs and data file contents, the limit, the few-shot count, the
maximum length, the batch size and the library versions — and "no adapter", so that no adapter's scores
can be served as base scores.

With ``log_samples`` the scores come with per-example predictions: for each task and scored example, the
gold index, the choice with the highest log-likelihood (and per character, for ``acc_norm``), whether each
accuracy counted it correct, and the choices' log-likelihoods. They are what paired tests between methods
need; the base-score cache keeps them next to the scores.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, overload

from torch import nn

from moelab.data.files import atomic_write_text, file_lock

TASK_PREFIX = "moelab_"
PREDICTIONS_DIR = "predictions"


Scores = dict[str, dict[str, float]]
Predictions = dict[str, list[dict[str, Any]]]


@overload
def lm_eval_scores(model: nn.Module, tokenizer, tasks: list[dict[str, Any]], limit: int | float | None = None,
                   batch_size: int = 8, num_fewshot: int | None = None, bootstrap_iters: int = 0,
                   max_length: int | None = None, device=None, log_samples: Literal[False] = False) -> Scores: ...


@overload
def lm_eval_scores(model: nn.Module, tokenizer, tasks: list[dict[str, Any]], limit: int | float | None = None,
                   batch_size: int = 8, num_fewshot: int | None = None, bootstrap_iters: int = 0,
                   max_length: int | None = None, device=None, *,
                   log_samples: Literal[True]) -> tuple[Scores, Predictions]: ...


def lm_eval_scores(model: nn.Module, tokenizer, tasks: list[dict[str, Any]], limit: int | float | None = None,
                   batch_size: int = 8, num_fewshot: int | None = None, bootstrap_iters: int = 0,
                   max_length: int | None = None, device=None, log_samples: bool = False):
    """``{task: {metric: value}}`` from lm-eval on ``model`` (eval mode for the call), on ``device``, or where
    its parameters are when None; with ``log_samples``, ``(scores, predictions)`` (:func:`sample_prediction`)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        device = str(device if device is not None else next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
        if os.environ.get("TQDM_DISABLE") == "1":
            # lm-eval's evaluator asks for its two progress bars explicitly, past TQDM_DISABLE: hide them as
            # moelab's quiet mode hides every other library's (verbose=true shows them)
            lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                         bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                                         task_manager=TaskManager(include_defaults=False), verbosity="ERROR")
    finally:
        model.train(was_training)
    scores = {task.removeprefix(TASK_PREFIX): _metrics(values) for task, values in output["results"].items()}
    if not log_samples:
        return scores
    predictions = {task.removeprefix(TASK_PREFIX): sorted((sample_prediction(s) for s in samples),
                                                          key=lambda record: record["doc_id"])
                   for task, samples in output["samples"].items()}
    return scores, predictions


def sample_prediction(sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval sample record of a moelab task, reduced to what a paired test reads: ``doc_id``, ``gold``,
    ``choice`` (highest log-likelihood), ``choice_norm`` (highest log-likelihood per character, as lm-eval's
    ``acc_norm`` picks it), ``acc`` / ``acc_norm`` (1 when lm-eval counted the example correct) and the
    choices' ``loglikelihoods``. ``gold`` is read from the normalised row, whichever way the task's template
    passes it to lm-eval (a target index, or the index of the gold context)."""
    loglikelihoods = [float(response[0]) for response in sample["filtered_resps"]]
    doc = sample["doc"]
    record: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "gold": int(doc["gold"]),
                              "choice": _argmax(loglikelihoods)}
    if "acc_norm" in sample:
        lengths = [float(len(choice)) for choice in doc["choices"]]
        record["choice_norm"] = _argmax([ll / length for ll, length in zip(loglikelihoods, lengths, strict=True)])
    record.update({metric: int(sample[metric]) for metric in ("acc", "acc_norm") if metric in sample})
    record["loglikelihoods"] = loglikelihoods
    return record


def write_predictions(run_dir: str | Path, predictions: dict[str, Predictions]) -> None:
    """``run_dir/predictions/<model>/<task>.jsonl`` for each model (``base``, ``tuned``) that was scored."""
    for model, tasks in predictions.items():
        folder = Path(run_dir) / PREDICTIONS_DIR / model
        for task, records in tasks.items():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / f"{task}.jsonl", "".join(json.dumps(record) + "\n" for record in records))


def read_predictions(run_dir: str | Path, model: str) -> Predictions:
    """The predictions :func:`write_predictions` stored for ``model``; ``{}`` when there are none."""
    folder = Path(run_dir) / PREDICTIONS_DIR / model
    predictions = {}
    for path in sorted(folder.glob("*.jsonl")):
        try:
            predictions[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except ValueError as error:
            raise ValueError(f"{path}: not JSON lines ({error})") from None
    return predictions


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's rule, which lm-eval uses)."""
    return max(range(len(values)), key=lambda index: (values[index], -index))


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """``acc,none`` → ``acc``; stderr entries and aliases dropped."""
    return {key.split(",")[0]: float(value) for key, value in values.items()
            if "," in key and "stderr" not in key and isinstance(value, int | float)}


def mean_score(scores: Scores, metric: str | dict[str, str] = "acc") -> float | None:
    """The mean over tasks of ``metric``, or of each task's own metric when ``metric`` maps task → metric."""
    values = [task_scores[name] for task, task_scores in scores.items()
              if (name := metric.get(task) if isinstance(metric, dict) else metric) in task_scores]
    return sum(values) / len(values) if values else None


def metric_label(metrics: dict[str, str]) -> str:
    """One name for a set of per-task headline metrics: the metric when all tasks share it, else ``headline``."""
    names = set(metrics.values())
    return names.pop() if len(names) == 1 else "headline"


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
                  compute: Callable[[], tuple[Scores, Predictions]]) -> tuple[Scores, Predictions, bool]:
    """``(scores, predictions, came_from_cache)``: read the file named by ``key`` if its stored key matches
    exactly and it holds predictions, otherwise compute and store. Jobs running side by side take turns on a
    lock, so that one computes and the others read; the file is written atomically. A file that cannot be read
    (a writer killed before atomic writes, a disk error) is reported with its path and recomputed; an entry
    written before predictions were kept is recomputed silently, so that every run has base predictions."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{digest}.json"
    with file_lock(path.with_suffix(".lock")):
        stored = _read_cache_entry(path)
        if stored is not None and stored.get("key") == key and isinstance(stored.get("predictions"), dict):
            return stored["scores"], stored["predictions"], True
        scores, predictions = compute()
        atomic_write_text(path, json.dumps({"key": key, "scores": scores, "predictions": predictions}))
    return scores, predictions, False


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
