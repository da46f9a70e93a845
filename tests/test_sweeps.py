"""Sweeps as users run them. The demo's multirun over every registered method plus one job whose adapter
config is invalid: the sweep goes on, the failure lands in its folder and in compare.py's table; runs share
a W&B group and carry their method as a tag; routed methods log their expert maps to W&B. Then Optuna with
sqlite storage, trials in parallel joblib workers (one torch thread each), and the SLURM preset."""

import importlib.util
import json
import os
import runpy
import sqlite3
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import CONF, ROOT, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from test_experiments import swept_adapters

from moelab.adapters import registered_adapters

ENV = {**os.environ, "WANDB_MODE": "offline"}
TINY = ["model=tiny_random", "data=tiny", "data.tasks=[tiny_arithmetic,tiny_capitals,tiny_parity]",
        "data.max_test_examples=4", "trainer.max_steps=2", "eval.limit=4"]
METHODS = sorted(registered_adapters())
needs_sweep_extra = pytest.mark.skipif(
    not all(importlib.util.find_spec(f"hydra_plugins.{name}") for name in
            ("hydra_joblib_launcher", "hydra_optuna_sweeper", "hydra_submitit_launcher")),
    reason="the `sweep` extra is not installed (pip install -c constraints.txt -e '.[sweep]')")


def train(*overrides: str, status: int = 0) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *overrides], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == status, completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory):
    """``experiment=offline_commonsense`` on the tiny model: the demo's methods, and `broken`, a LoRA config
    (from an extra config folder) that composes but fails validation when its job runs."""
    demo = swept_adapters("offline_commonsense")
    assert {compose_config(f"adapter={option}").adapter.name for option in demo} == set(METHODS), "all methods"
    out = tmp_path_factory.mktemp("demo")
    (out / "conf" / "adapter").mkdir(parents=True)
    (out / "conf" / "adapter" / "broken.yaml").write_text("defaults:\n  - lora\n  - _self_\nr: 0\n")
    sweep_dir = out / "sweep-7f3a"
    completed = train("experiment=offline_commonsense", f"adapter={','.join(demo)},broken", "seed=0", *TINY,
                      "budget.reference.r=4", "top_layers=[1]",  # the demo's budget and layers, scaled down
                      f"hydra.sweep.dir={sweep_dir}", f"hydra.searchpath=[file://{out / 'conf'}]",
                      f"paths.cache_dir={out / 'cache'}", status=1)  # a job failed: the sweep says so at the end
    jobs = {json.loads((folder / "results.json").read_text())["status"] + ":" + folder.name.split("_", 1)[1]: folder
            for folder in sorted(sweep_dir.iterdir()) if (folder / "results.json").exists()}
    return sweep_dir, jobs, completed.stdout


def test_a_failing_job_is_recorded_in_its_folder_and_the_sweep_goes_on(demo_sweep):
    sweep_dir, jobs, stdout = demo_sweep
    assert set(jobs) == {f"ok:{method}-seed0" for method in METHODS} | {"failed:lora-seed0"}
    failed = jobs["failed:lora-seed0"]
    assert failed.name == f"{len(METHODS)}_lora-seed0", "the last job failed; every other job ran"
    assert "r (0) must be a positive integer" in (failed / "error.txt").read_text()
    assert json.loads((failed / "results.json").read_text())["error"].startswith("AdapterConfigError")
    assert "[moelab] job lora-seed0 failed" in stdout
    assert failed.name in stdout.split("unfinished jobs")[1], "the sweep lists its failed job at the end"


def wandb_run_record(run_dir):
    """The run record (name, group, tags) of the offline W&B run in ``run_dir``, parsed with W&B's protobuf
    schema from the log it writes: a 7-byte file header, then 32 KiB blocks of records, each with a 7-byte
    header (checksum, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    position, payload, block = 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # no room for a header: the block's tail is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(payload)
            payload = b""
            if record.HasField("run"):
                return record.run
    raise AssertionError(f"no run record in {run_dir}")


def test_sweep_runs_share_a_wandb_group_and_carry_their_method_as_a_tag(demo_sweep):
    sweep_dir, jobs, _ = demo_sweep
    for method in METHODS:
        record = wandb_run_record(jobs[f"ok:{method}-seed0"])
        assert record.run_group == sweep_dir.name and method in record.tags
        assert record.display_name == f"{method}-seed0"


def routes(run_dir) -> bool:
    return bool(torch.load(run_dir / "routing.pt", weights_only=True)["train"]["sites"])


def test_routed_methods_log_their_expert_maps_to_wandb(demo_sweep):
    _, jobs, _ = demo_sweep
    for method in METHODS:
        run_dir = jobs[f"ok:{method}-seed0"]
        images = sorted(p.name for p in run_dir.glob("wandb/offline-run-*/files/media/images/**/expert_map_*.png"))
        kinds = {name.split("_")[2] for name in images}
        assert kinds == ({"load", "importance"} if routes(run_dir) else set()), method
    assert any(routes(jobs[f"ok:{method}-seed0"]) for method in METHODS), "no routed method to check"


def run_script(name: str, *arguments: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *arguments])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / name), run_name="__main__")
    assert exit_info.value.code == 0


def test_compare_and_plot_scripts_read_the_sweep(demo_sweep, monkeypatch, capsys):
    sweep_dir, jobs, _ = demo_sweep
    run_script("compare.py", str(sweep_dir), monkeypatch=monkeypatch)
    table = (sweep_dir / "comparison.md").read_text()
    labels = {json.loads((jobs[f"ok:{m}-seed0"] / "results.json").read_text())["label"] for m in METHODS}
    rows = [line for line in table.splitlines() if line.startswith("| ")]  # the header, then one per row
    assert rows[1].startswith("| base model (tiny_random)") and rows[2].startswith("| lora ["), "the reference next"
    methods = [row for row in rows[2:] if not row.startswith("| ↳")]
    assert sorted(row.split(" | ")[0][2:] for row in methods) == sorted(labels)
    assert sum(row.startswith("| ↳ − lora [") for row in rows) == len(labels) - 1, "a paired difference per method"
    assert "[" in rows[2].split(" | ", 1)[1], "cells carry bootstrap intervals from the runs' predictions"
    assert f"{jobs['failed:lora-seed0'].name}` (lora, seed 0) failed: AdapterConfigError" in table
    assert "parameter budget: trainable parameters matched to lora(r=4" in table
    assert (sweep_dir / "comparison.csv").exists() and (sweep_dir / "expert_maps.png").exists()
    assert str(sweep_dir / "comparison.md") in capsys.readouterr().out

    routed = [jobs[f"ok:{m}-seed0"] for m in METHODS if routes(jobs[f"ok:{m}-seed0"])]
    run_script("plot_expert_maps.py", str(routed[0]), str(jobs["ok:lora-seed0"]), monkeypatch=monkeypatch)
    assert sorted(p.name for p in (routed[0] / "plots").iterdir()) == ["expert_map_importance_dev.png",
                                                                       "expert_map_load_dev.png"]
    assert "does not route" in capsys.readouterr().out


@needs_sweep_extra
def test_optuna_with_sqlite_runs_trials_in_parallel_workers_with_one_thread_each(tmp_path):
    storage = tmp_path / "study.db"
    train("hparams_search=optuna", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
          f"hydra.sweeper.storage=sqlite:///{storage}", "adapter=lora", *TINY, "logger=csv",
          f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}")
    trials = [json.loads(path.read_text()) for path in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert len(trials) == 2 and all(trial["timings"]["torch_threads"] == 1 for trial in trials)
    assert {trial["config"]["module"]["optimizer"]["lr"] for trial in trials} != {2.0e-4}, "the sampler chose"
    assert all(trial["scored_splits"] == ["dev"] and trial["scores"] == {} for trial in trials), "test untouched"
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(trial["dev"]["mean"] for trial in trials)
    with sqlite3.connect(storage) as db:
        assert db.execute("select state from trials").fetchall() == [("COMPLETE",), ("COMPLETE",)]


@needs_sweep_extra
def test_a_search_whose_objective_would_read_the_test_split_is_refused(tmp_path):
    completed = train("hparams_search=optuna", "eval.splits=[test]", *TINY, f"hydra.sweep.dir={tmp_path}", status=2)
    assert "eval.splits must list dev" in completed.stderr and not list(tmp_path.glob("*/results.json"))


@needs_sweep_extra
def test_the_slurm_preset_names_partition_gpus_and_time_limit():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
