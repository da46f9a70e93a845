"""What the scores depend on: the base-score cache key, the pretrained model's identity, and the eval protocol
scripts/evaluate.py reads from a run folder."""

import json
import runpy

from conftest import ROOT

from moelab.modules.evaluation import base_score_key
from moelab.modules.models import _identity


def heldout_task(tmp_path) -> dict:
    data = tmp_path / "task.heldout.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n')
    return {"task": "moelab_task", "dataset_kwargs": {"data_files": {"test": str(data)}}}


def test_base_score_key_changes_with_every_setting_that_changes_scores(tmp_path):
    tasks = [heldout_task(tmp_path)]
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
