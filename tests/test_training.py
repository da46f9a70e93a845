"""End to end: the training entry point, results.json, W&B offline files, checkpoints, the base-score cache,
aux losses in the objective, the NaN stop, and one real-model smoke run (SmolLM2-135M)."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from safetensors.torch import load_file

from moelab.adapters import AdapterConfigError, merge_and_unload, register
from moelab.adapters.base import _REGISTRY
from moelab.adapters.lora import Lora, LoraConfig, LoraLinear
from moelab.adapters.routing import RoutingStatistics
from moelab.modules.errors import TrainingDiverged
from moelab.modules.evaluation import lm_eval_scores, read_predictions
from moelab.modules.runs import load_trained, split_tasks
from moelab.modules.training import run

TINY_RUN = ("model=tiny_random", "data=tiny", "adapter=lora", "trainer.max_steps=5")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The README's tiny-model command, run as users run it (a subprocess, W&B offline)."""
    out = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY_RUN, f"hydra.run.dir={out}",
               f"paths.cache_dir={out / 'cache'}"]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "loglikelihood requests" not in completed.stderr, "lm-eval's progress bars are hidden like the others'"
    return out, completed.stdout


def test_cli_run_writes_results_with_lm_eval_scores(cli_run):
    out, stdout = cli_run
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok" and results["label"] == "lora [official-code-parity]"
    assert set(results["scores"]) == {"tiny_arithmetic", "tiny_capitals", "tiny_parity"}
    assert all(0.0 <= s["acc"] <= 1.0 for s in results["scores"].values())
    assert set(results["base_scores"]) == set(results["scores"]) and results["scored_as"] == "merged"
    assert results["parameters"]["trainable"] == 2 * 2 * 8 * (64 + 64)  # q,v × 2 layers × r(64+64)
    assert results["timings"]["train_steps"] == 5 and results["timings"]["tokens_per_s"] > 0
    split_sizes = results["data"]["tasks"]["tiny_parity"]
    assert (split_sizes["train"], split_sizes["dev"], split_sizes["test"]) == (50, 10, 20)
    assert results["versions"]["torch"].startswith("2.13")
    assert "tuned (merged)" in stdout
    assert results["metric"] == "auto" and results["metrics"] == dict.fromkeys(results["scores"], "acc")
    assert results["memory"]["measure"] == "peak_rss" and results["memory"]["peak_mib"] > 0
    latency = results["latency"]
    assert latency["model"] == "merged" and latency["prefill_ms"] > 0 and latency["decode_ms_per_token"] > 0
    assert (latency["prompt_tokens"], latency["new_tokens"], latency["device"]) == (128, 16, "cpu")


def test_a_dev_only_run_scores_dev_and_never_reads_the_test_split(tmp_path, monkeypatch):
    """What each trial of a hyper-parameter search does: lm-eval on the dev files only, whose mean the entry
    point returns; the test files are written but no model is scored on them."""
    import moelab.modules.training as training

    scored_files = []
    real_scores = training.Scoring.scores

    def recording(self, model, tokenizer, tasks):
        scored_files.extend(Path(task["dataset_kwargs"]["data_files"]["test"]).name for task in tasks)
        return real_scores(self, model, tokenizer, tasks)

    monkeypatch.setattr(training.Scoring, "scores", recording)
    results = run(compose_config("model=tiny_random", "data=tiny", "adapter=lora", "trainer.max_steps=2",
                                 "eval.splits=[dev]", "logger=csv", "callbacks=none", f"paths.output_dir={tmp_path}",
                                 f"paths.cache_dir={tmp_path / 'cache'}"))
    assert scored_files and all(name.endswith(".dev.jsonl") for name in scored_files)
    assert results["scores"] == {} and results["mean"] is None and results["scored_splits"] == ["dev"]
    assert set(results["dev"]["scores"]) == set(results["dev"]["base_scores"]) == set(results["metrics"])
    assert results["dev"]["mean"] == pytest.approx(sum(v["acc"] for v in results["dev"]["scores"].values()) / 3)
    assert not (tmp_path / "predictions" / "tuned").exists(), "per-example records are the test split's"


def test_a_run_logged_to_a_file_shows_phases_and_progress_lines(cli_run):
    """stdout is a pipe here, as under SLURM or nohup: plain lines, no progress bar, no third-party chatter."""
    out, stdout = cli_run
    lines = stdout.splitlines()
    assert any(line.startswith("[moelab] step 5/5 · loss ") and "tokens/s" in line for line in lines)
    for phase in ("loading tiny_random", "scoring the base model on test", "training: 5 steps", "dev pass",
                  "scoring the trained model on test (merged"):
        assert any(line.startswith(f"[moelab] ── {phase}") for line in lines), phase
    assert not any(line.startswith(("Epoch ", "💡", "[20")) for line in lines), "no bar, tips or library INFO lines"
    log = (out / "train.log").read_text()
    assert all(line in log for line in lines if line.startswith("[moelab]")), "train.log holds every [moelab] line"


def test_cli_run_keeps_per_example_predictions_of_base_and_tuned_model(cli_run):
    out, _ = cli_run
    results = json.loads((out / "results.json").read_text())
    for model, scores in (("base", results["base_scores"]), ("tuned", results["scores"])):
        predictions = read_predictions(out, model)
        assert set(predictions) == set(scores)
        for task, records in predictions.items():
            assert [record["doc_id"] for record in records] == list(range(results["data"]["tasks"][task]["test"]))
            for metric in ("acc", "acc_norm"):
                assert sum(record[metric] for record in records) / len(records) == pytest.approx(scores[task][metric])
            assert all(record["acc"] == (record["choice"] == record["gold"]) for record in records)


def test_cli_run_writes_wandb_offline_csv_and_adapter_only_files(cli_run):
    out, _ = cli_run
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "W&B offline run file"
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "eval/mean_acc" in metrics
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora." in key for key in adapter)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in adapter}, "checkpoints hold the adapter only"
    assert (out / "train.log").exists() and (out / ".hydra" / "config.yaml").exists()


def test_a_saved_run_reloads_and_scores_the_same(cli_run):
    out, _ = cli_run
    results = json.loads((out / "results.json").read_text())
    base, adapter = load_trained(out)
    scores = lm_eval_scores(merge_and_unload(base.model), base.tokenizer, split_tasks(out))
    assert scores == results["scores"]


def test_base_scores_are_cached_per_base_model(tmp_path):
    first = run(compose_config(*TINY_RUN, "logger=csv", "callbacks=none", f"paths.output_dir={tmp_path / 'a'}",
                               f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=1"))
    second = run(compose_config(*TINY_RUN, "logger=csv", "callbacks=none", "adapter.r=4", "trainer.max_steps=1",
                                f"paths.output_dir={tmp_path / 'b'}", f"paths.cache_dir={tmp_path / 'cache'}"))
    other_model = run(compose_config(*TINY_RUN, "logger=csv", "callbacks=none", "model.seed=1",
                                     "trainer.max_steps=1", f"paths.output_dir={tmp_path / 'c'}",
                                     f"paths.cache_dir={tmp_path / 'cache'}"))
    assert not first["base_scores_cached"] and second["base_scores_cached"]
    assert second["base_scores"] == first["base_scores"]
    assert read_predictions(tmp_path / "b", "base") == read_predictions(tmp_path / "a", "base") != {}
    assert not other_model["base_scores_cached"], "another base model never reuses these scores"
    assert len(list((tmp_path / "cache" / "base_scores").glob("*.json"))) == 2


# -- the aux-loss path and the NaN stop, with a test-only method --------------------------------------


@dataclass(kw_only=True)
class AuxProbeConfig(LoraConfig):
    coefficient: float = 0.5
    nan_at_call: int = -1


class AuxProbeLinear(LoraLinear):
    calls = 0

    def aux_losses(self):
        AuxProbeLinear.calls += 1
        value = self.config.coefficient * self.lora.lora_A.square().sum()
        if AuxProbeLinear.calls == self.config.nan_at_call:
            value = value * float("nan")
        return {"probe": value}


class AuxProbe(Lora):
    name = "aux_probe"
    config_class = AuxProbeConfig

    def make_layer(self, name, module):
        layer = AuxProbeLinear(module, self.config)
        layer.config = self.config
        return layer


@pytest.fixture
def aux_probe():
    register(AuxProbe)
    AuxProbeLinear.calls = 0
    yield
    _REGISTRY.pop("aux_probe")


def probe_config(tmp_path, *overrides):
    return compose_config("model=tiny_random", "data=tiny", "adapter=lora", "adapter.name=aux_probe",
                          "+adapter.coefficient=0.5", "logger=csv", "callbacks=none", "eval.enabled=false",
                          f"paths.output_dir={tmp_path}", *overrides)


def test_aux_losses_enter_the_training_loss(aux_probe, tmp_path):
    run(probe_config(tmp_path, "trainer.max_steps=3"))
    rows = [line.split(",") for line in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()]
    header, values = rows[0], [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert "train/aux/probe" in header
    logged = [row for row in values if row["train/loss"]]
    assert len(logged) == 3
    for row in logged:
        # two LoRA layers per decoder layer × 2 layers: the probe is averaged over its 4 layers
        assert float(row["train/loss"]) == pytest.approx(float(row["train/ce"]) + float(row["train/aux/probe"]),
                                                         rel=1e-5)
        assert float(row["train/aux/probe"]) > 0


def test_a_non_finite_loss_stops_the_run_naming_the_step(aux_probe, tmp_path):
    # 4 probe layers: call 9 is the first layer of the third training step (step index 2)
    with pytest.raises(TrainingDiverged, match="non-finite training loss .* at step 2"):
        run(probe_config(tmp_path, "trainer.max_steps=5", "+adapter.nan_at_call=9"))
    assert "TrainingDiverged" in (tmp_path / "error.txt").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "diverged"


# -- methods trained in stages ------------------------------------------------------------------------


def test_stage_lengths_that_do_not_fit_fail_before_the_model_loads(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the stage lengths were checked")

    monkeypatch.setattr("moelab.modules.models.build_tiny_random", refuse)
    cfg = compose_config("model=tiny_random", "data=tiny", "adapter=mole", "adapter.experts.stage1_steps=5",
                         "trainer.max_steps=5", "logger=csv", "callbacks=none", f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(AdapterConfigError, match=r"experts.stage1_steps \(5\) leaves no step"):
        run(cfg)


def test_training_routing_statistics_describe_the_last_stage_only(tmp_path):
    results = run(compose_config("model=tiny_random", "data=tiny", "adapter=mole", "adapter.experts.stage1_steps=3",
                                 "trainer.max_steps=5", "logger=csv", "callbacks=none", "eval.enabled=false",
                                 f"paths.output_dir={tmp_path}"))
    train = RoutingStatistics.from_state_dict(torch.load(tmp_path / "routing.pt")["train"])
    tokens_per_site = train.sums["tokens"].sum(dim=-1)
    assert 0 < tokens_per_site.max() < results["timings"]["train_tokens"], "the hard stage's tokens are not counted"
    # hard routing is one-hot (entropy 0); the gates start uniform and have moved two steps only
    assert results["routing"]["train"]["routing/entropy"] > 0.9


# -- the real offline default model --------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_smoke_run(tmp_path):
    cfg = compose_config("model=smollm2_135m", "data=commonsense", "data.tasks=[arc_easy,piqa]",
                         "data.max_train_examples=16", "data.max_test_examples=10", "data.batch_size=4",
                         "trainer.max_steps=3", "eval.limit=10", "logger=csv", "callbacks=none",
                         f"paths.output_dir={tmp_path}")
    results = run(cfg)
    assert results["model"] == "smollm2_135m" and results["status"] == "ok"
    assert results["parameters"]["base"] == 134_515_008
    assert set(results["scores"]) == {"arc_easy", "piqa"} and results["base_mean"] is not None
    assert results["timings"]["train_steps"] == 3
