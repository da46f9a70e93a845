"""Checks of the accelerator path, marked ``gpu``: scripts/gpu_check.sh runs them on a GPU
(MOELAB_TEST_ACCELERATOR=gpu); everywhere else they run on the CPU, where they still check that scoring
follows the trainer (device and precision), not the parameters."""

import os

import pytest
import torch
from conftest import compose_config

from moelab.modules import training
from moelab.modules.training import Scoring, run

pytestmark = pytest.mark.gpu
ACCELERATOR = os.environ.get("MOELAB_TEST_ACCELERATOR", "gpu" if torch.cuda.is_available() else "cpu")


def trainer(precision: str):
    import lightning as L

    return L.Trainer(accelerator=ACCELERATOR, devices=1, precision=precision, logger=False,
                     enable_progress_bar=False, enable_checkpointing=False)


def test_scoring_runs_on_the_trainers_device_and_precision_wherever_the_parameters_are(monkeypatch):
    cfg = compose_config("model=tiny_random", "data=tiny")
    scoring = Scoring(trainer("bf16-mixed"), cfg)
    model = torch.nn.Linear(3, 3)  # on the CPU, as Lightning's teardown leaves the module
    moved, seen = [], {}
    original_to = model.to
    monkeypatch.setattr(model, "to", lambda device: moved.append(device) or original_to(device))

    def fake_scores(scored, tokenizer, tasks, device=None, **kwargs):
        seen.update(device=device, autocast=torch.is_autocast_enabled(device.type),
                    dtype=torch.get_autocast_dtype(device.type), parameters=next(scored.parameters()).device)
        return {}

    monkeypatch.setattr(training, "lm_eval_scores", fake_scores)
    scoring.scores(model, None, [])
    root = scoring.device
    assert root.type == ("cuda" if ACCELERATOR == "gpu" else "cpu")
    assert moved == [root] and seen["device"] == root and seen["parameters"].type == root.type
    assert seen["autocast"] and seen["dtype"] == torch.bfloat16, "bf16-mixed scores under bf16 autocast"
    assert scoring.report() == {"device": str(root), "precision": "bf16-mixed", "parameter_dtype": "torch.float32"}
    full = Scoring(trainer("32-true"), cfg)
    full.scores(model, None, [])
    assert not seen["autocast"], "32-true scores without autocast"


def test_a_tiny_run_trains_and_scores_on_the_accelerator(tmp_path):
    results = run(compose_config("model=tiny_random", "data=tiny", "adapter=mixlora", "trainer=gpu",
                                 f"trainer.accelerator={ACCELERATOR}", "trainer.max_steps=3", "eval.limit=4",
                                 "logger=none", "callbacks=none", f"paths.output_dir={tmp_path}",
                                 f"paths.cache_dir={tmp_path / 'cache'}"))
    assert results["status"] == "ok" and results["scoring"]["precision"] == "bf16-mixed"
    assert results["scoring"]["device"].startswith("cuda" if ACCELERATOR == "gpu" else "cpu")
