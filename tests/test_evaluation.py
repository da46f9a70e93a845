"""What the scores depend on: the base-score cache key, the pretrained model's identity, and the eval protocol
scripts/evaluate.py reads from a run folder; per-example predictions, their cache, and each task's headline metric."""

import json
import runpy

import pytest
from conftest import ROOT

from moelab.data.tasks import TaskSpec, resolve_task
from moelab.modules.evaluation import (
    base_score_key,
    cached_scores,
    mean_score,
    metric_label,
    read_predictions,
    sample_prediction,
    write_predictions,
)
from moelab.modules.models import _identity


def split_task(tmp_path) -> dict:
    data = tmp_path / "task.test.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n')
    return {"task": "moelab_task", "dataset_kwargs": {"data_files": {"test": str(data)}}}


def test_base_score_key_changes_with_every_setting_that_changes_scores(tmp_path):
    tasks = [split_task(tmp_path)]
    key = base_score_key("tiny:1", tasks, None, 0, max_length=None, batch_size=16)
    assert base_score_key("tiny:1", tasks, None, 0, max_length=None, batch_size=16) == key
    assert base_score_key("tiny:1", tasks, None, 0, max_length=64, batch_size=16) != key, "truncation"
    assert base_score_key("tiny:1", tasks, None, 0, max_length=None, batch_size=4) != key, "padding and kernels"
    assert {"lm_eval", "transformers", "torch"} <= set(key)


def test_pretrained_identity_names_the_attention_kernel(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    plain = _identity("m", str(tmp_path), "bfloat16", None)
    assert _identity("m", str(tmp_path), "bfloat16", None, None) == plain, "earlier runs keep their identity"
    sdpa, eager = (_identity("m", str(tmp_path), "bfloat16", None, kernel) for kernel in ("sdpa", "eager"))
    assert len({plain, sdpa, eager}) == 3 and sdpa.startswith(plain)
    assert _identity("m", "org/hub-id", "float32", None, "eager") != _identity("m", "org/hub-id", "float32", None)


def test_pretrained_identity_follows_the_weights_content_not_their_times(tmp_path):
    import os

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 16)
    first = _identity("m", str(tmp_path), "float32", None)
    os.utime(weights, (1, 1))  # as after a copy to another machine
    assert _identity("m", str(tmp_path), "float32", None) == first
    weights.write_bytes(bytes(range(256)) * 15 + bytes(256))
    assert _identity("m", str(tmp_path), "float32", None) != first, "other weights"


def test_evaluate_reads_the_runs_eval_protocol(tmp_path):
    run_protocol = runpy.run_path(str(ROOT / "scripts" / "evaluate.py"))["run_protocol"]
    config = {"eval": {"limit": 7, "num_fewshot": 2, "max_length": 128, "batch_size": 3, "metric": "acc"}}
    (tmp_path / "results.json").write_text(json.dumps({"config": config}))
    assert run_protocol(tmp_path) == {"limit": 7, "num_fewshot": 2, "max_length": 128, "batch_size": 3}
    converted = tmp_path / "converted"  # no results.json: conf/eval's defaults, as a training run has them
    converted.mkdir()
    assert run_protocol(converted) == {"limit": None, "num_fewshot": 0, "max_length": None, "batch_size": 16}


# -- per-example predictions, the cache that keeps them, and the headline metric of each task -------------


def lm_eval_sample(doc_id, gold, loglikelihoods, choices):
    """A sample record as lm-eval logs it for a multiple-choice moelab task (the fields moelab reads)."""
    norm = max(range(len(choices)), key=lambda i: loglikelihoods[i] / len(choices[i]))
    best = max(range(len(choices)), key=lambda i: loglikelihoods[i])
    return {"doc_id": doc_id, "doc": {"query": "q", "choices": choices, "gold": gold},
            "filtered_resps": [(ll, False) for ll in loglikelihoods],
            "acc": float(best == gold), "acc_norm": float(norm == gold)}


def test_a_sample_becomes_the_choice_per_metric_and_its_correctness():
    # "a" is likelier in total, "bbbbbb" per character: acc picks 0, acc_norm picks 1 (the gold)
    record = sample_prediction(lm_eval_sample(3, 1, [-2.0, -3.0], ["a", "bbbbbb"]))
    assert record == {"doc_id": 3, "gold": 1, "choice": 0, "choice_norm": 1, "acc": 0, "acc_norm": 1,
                      "loglikelihoods": [-2.0, -3.0]}
    tie = sample_prediction(lm_eval_sample(0, 1, [-1.0, -1.0], ["x", "y"]))
    assert tie["choice"] == 0 and tie["acc"] == 0, "ties go to the first choice, as numpy's argmax in lm-eval"
    partial = lm_eval_sample(0, 1, [-4.0, -1.0], ["ctx a", "ctx b"])
    del partial["acc_norm"]
    partial["doc"] = {"contexts": ["ctx a", "ctx b"], "continuation": "c", "gold": 1}
    assert sample_prediction(partial) == {"doc_id": 0, "gold": 1, "choice": 1, "acc": 1, "loglikelihoods": [-4.0, -1.0]}


def test_predictions_are_written_and_read_per_model_and_task(tmp_path):
    records = [{"doc_id": 0, "gold": 1, "choice": 1, "acc": 1}, {"doc_id": 1, "gold": 0, "choice": 1, "acc": 0}]
    write_predictions(tmp_path, {"base": {"piqa": records[:1]}, "tuned": {"piqa": records, "boolq": records}})
    assert read_predictions(tmp_path, "tuned") == {"boolq": records, "piqa": records}
    assert read_predictions(tmp_path, "base") == {"piqa": records[:1]}
    assert read_predictions(tmp_path / "elsewhere", "base") == {}
    (tmp_path / "predictions" / "base" / "piqa.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"predictions/base/piqa.jsonl"):
        read_predictions(tmp_path, "base")


def test_the_cache_returns_base_predictions_and_recomputes_entries_without_them(tmp_path):
    key = {"model": "tiny:1"}
    calls = []

    def compute():
        calls.append(1)
        return {"piqa": {"acc": 0.5}}, {"piqa": [{"doc_id": 0, "acc": 1}]}

    first = cached_scores(tmp_path, key, compute)
    second = cached_scores(tmp_path, key, compute)
    assert first[:2] == second[:2] and (first[2], second[2]) == (False, True) and len(calls) == 1
    entry = next(tmp_path.glob("*.json"))
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({"key": stored["key"], "scores": stored["scores"]}))  # written before predictions
    assert cached_scores(tmp_path, key, compute)[2] is False and len(calls) == 2
    assert "predictions" in json.loads(entry.read_text())


def test_each_task_has_a_headline_metric_that_eval_metric_overrides():
    openbookqa, winogrande, boolq = (resolve_task(name) for name in ("openbookqa", "winogrande", "boolq"))
    assert [spec.headline() for spec in (openbookqa, winogrande, boolq)] == ["acc_norm", "acc", "acc"]
    assert {resolve_task(name, "hub").metric for name in ("arc_challenge", "hellaswag", "openbookqa", "piqa")} \
        == {"acc_norm"}
    assert openbookqa.headline("acc") == "acc" and boolq.headline("acc_norm") == "acc_norm"
    assert winogrande.headline("acc_norm") == "acc", "WinoGrande reports acc only"
    with pytest.raises(ValueError, match="eval.metric"):
        boolq.headline("f1")
    with pytest.raises(ValueError, match="winogrande format is scored with acc only"):
        TaskSpec("w", "winogrande", "jsonl", "w.jsonl", metric="acc_norm")


def test_the_mean_takes_each_tasks_own_metric():
    scores = {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "boolq": {"acc": 0.5, "acc_norm": 0.1}}
    assert mean_score(scores, {"piqa": "acc_norm", "boolq": "acc"}) == pytest.approx(0.6)
    assert mean_score(scores) == pytest.approx(0.55)
    assert metric_label({"piqa": "acc_norm", "boolq": "acc"}) == "headline" and metric_label({"a": "acc"}) == "acc"


def test_evaluate_averages_the_runs_headline_metrics(tmp_path):
    run_metrics = runpy.run_path(str(ROOT / "scripts" / "evaluate.py"))["run_metrics"]
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"piqa": "acc_norm", "boolq": "acc"}}))
    assert run_metrics(tmp_path) == {"piqa": "acc_norm", "boolq": "acc"}
    converted = tmp_path / "converted"
    converted.mkdir()
    assert run_metrics(converted) == "acc"
