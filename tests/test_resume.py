"""Runs that survive pre-emption. Every method is killed (SIGKILL, a real subprocess) after a checkpoint,
mid-epoch and mid-stage, dropout on, and resumed: the result equals the uninterrupted run bit for bit. SIGTERM
and SIGINT save, record "interrupted" and exit non-zero; a sweep re-run skips finished jobs and resumes the
others; two live runs refuse one folder; a corrupt base-score cache entry is recomputed; exit codes."""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import compose_config
from probes import ROOT, STAGED, TEST_ENV, TRAIN
from safetensors.torch import load_file

from moelab.adapters import registered_adapters
from moelab.modules.checkpointing import RunLock
from moelab.modules.training import run

METHODS = sorted(registered_adapters())
# 180 tiny training examples in steps of 32: 6 steps an epoch, so 8 steps cross an epoch; the kill comes
# after the checkpoint of step 3, mid-epoch, and (staged methods) mid-way through stage "hard" (steps 0-4)
RUN = ["model=tiny_random", "data=tiny", "data.batch_size=32", "trainer.max_steps=8", "checkpoint_every=3",
       "threads=1", "eval.limit=4", "logger=csv", "callbacks=none"]


def overrides(method: str) -> list[str]:
    return [*RUN, f"adapter={method}", *(["adapter.experts.stage1_steps=5"] if method in STAGED else [])]


def start_paused(method: str, folder, cache, *extra: str) -> subprocess.Popen:
    """The run as a subprocess, waiting at step 3 (its checkpoint of step 3 written) until signalled."""
    proc = subprocess.Popen([*TRAIN, *overrides(method), f"hydra.run.dir={folder}", f"paths.cache_dir={cache}",
                             "+callbacks.pause._target_=probes.PauseAt", "+callbacks.pause.step=3", *extra],
                            cwd=ROOT, env=TEST_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (folder / "paused_at_3").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.1)
    return proc


def losses(folder) -> dict[int, str]:
    with open(folder / "csv" / "metrics.csv", newline="") as file:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(file) if row.get("train/loss")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("method", METHODS)
def test_a_killed_run_resumes_bit_for_bit(tmp_path, cache, method):
    uninterrupted = tmp_path / "uninterrupted"
    expected = run(compose_config(*overrides(method), f"paths.output_dir={uninterrupted}", f"paths.cache_dir={cache}"))

    folder = tmp_path / "killed"
    proc = start_paused(method, folder, cache)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (folder / "results.json").exists()
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3

    resumed = run(compose_config(*overrides(method), f"paths.output_dir={folder}", f"paths.cache_dir={cache}"))
    assert resumed["resumed_from"] == str(folder / "checkpoints" / "last.ckpt")
    ours, theirs = load_file(str(folder / "adapter" / "adapter_model.safetensors")), \
        load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), "adapter tensors"
    routing, reference = torch.load(folder / "routing.pt"), torch.load(uninterrupted / "routing.pt")
    for split in ("train", "dev"):
        assert all(torch.equal(routing[split]["sums"][k], v) for k, v in reference[split]["sums"].items()), split
    for key in ("scores", "validation", "mean"):
        assert resumed[key] == expected[key], key
    for key in ("train_steps", "train_tokens"):
        assert resumed["timings"][key] == expected["timings"][key], key
    assert losses(folder) == losses(uninterrupted) and len(losses(folder)) == 8, "every step's loss, once"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_records_interrupted_and_exits_non_zero(tmp_path, cache, stop):
    folder = tmp_path / "run"
    proc = start_paused("lora", folder, cache)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + stop, stderr[-2000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "interrupted" and results["step"] == 4, "saved at the end of the step it was in"
    assert results["checkpoint"] == str(folder / "checkpoints" / "last.ckpt")
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (folder / "run.lock").exists(), "the lock is released"
    resumed = run(compose_config(*overrides("lora"), f"paths.output_dir={folder}", f"paths.cache_dir={cache}"))
    assert resumed["status"] == "ok" and resumed["timings"]["train_steps"] == 8


def test_a_rerun_sweep_skips_finished_jobs_and_resumes_the_others(tmp_path, cache):
    sweep = tmp_path / "sweep"
    command = [*TRAIN, "-m", *overrides("lora"), "adapter=lora,mixlora", f"hydra.sweep.dir={sweep}",
               f"paths.cache_dir={cache}"]
    first = subprocess.run(command, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    finished, unfinished = sweep / "0_lora-seed0", sweep / "1_mixlora-seed0"
    (unfinished / "results.json").unlink()  # as if pre-empted after its last checkpoint
    finished_mtime = (finished / "results.json").stat().st_mtime_ns
    again = subprocess.run(command, cwd=ROOT, env=TEST_ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{finished} holds a finished run" in again.stdout
    assert (finished / "results.json").stat().st_mtime_ns == finished_mtime
    assert json.loads((unfinished / "results.json").read_text())["resumed_from"].endswith("last.ckpt")
    assert (sweep / "comparison.md").exists()


def test_a_sweep_with_a_failed_job_exits_non_zero_after_the_table(tmp_path, cache):
    sweep = tmp_path / "sweep"
    completed = subprocess.run([*TRAIN, "-m", *overrides("lora"), "adapter.r=4,0", f"hydra.sweep.dir={sweep}",
                                f"paths.cache_dir={cache}"], cwd=ROOT, env=TEST_ENV, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 1
    assert "unfinished jobs" in completed.stdout and "1_lora-seed0" in completed.stdout
    assert (sweep / "comparison.md").exists()
    strict = subprocess.run(["python", str(ROOT / "scripts" / "compare.py"), str(sweep), "--strict"], cwd=ROOT,
                            env={**TEST_ENV, "PATH": os.path.dirname(TRAIN[0]) + os.pathsep + os.environ["PATH"]},
                            capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1, strict.stderr[-2000:]


def test_a_live_run_keeps_its_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, cache):
    folder = tmp_path / "run"
    with RunLock(folder):
        completed = subprocess.run([*TRAIN, *overrides("lora"), f"hydra.run.dir={folder}",
                                    f"paths.cache_dir={cache}"], cwd=ROOT, env=TEST_ENV, capture_output=True,
                                   text=True, timeout=120)
        assert completed.returncode != 0 and "is in use by a live run" in completed.stderr
        assert not (folder / "checkpoints").exists()
    dead = subprocess.run(["true"])
    (folder / "run.lock").write_text(json.dumps({"pid": 2 ** 22 + dead.returncode + 12345,
                                                 "host": os.uname().nodename}))
    with RunLock(folder):
        assert json.loads((folder / "run.lock").read_text())["pid"] == os.getpid()


def test_a_corrupt_base_score_cache_entry_is_reported_and_recomputed(tmp_path):
    cache = tmp_path / "cache"
    first = run(compose_config(*overrides("lora"), "trainer.max_steps=1", f"paths.output_dir={tmp_path / 'a'}",
                               f"paths.cache_dir={cache}"))
    [entry] = (cache / "base_scores").glob("*.json")
    entry.write_text(entry.read_text()[:40])  # a torn write
    with pytest.warns(UserWarning, match=f"{entry}.*unreadable"):
        second = run(compose_config(*overrides("lora"), "trainer.max_steps=1", f"paths.output_dir={tmp_path / 'b'}",
                                    f"paths.cache_dir={cache}"))
    assert not second["base_scores_cached"] and second["base_scores"] == first["base_scores"]
    assert json.loads(entry.read_text())["scores"] == first["base_scores"], "rewritten whole"


def test_resume_never_refuses_a_folder_that_holds_a_run(tmp_path, cache):
    folder = tmp_path / "run"
    run(compose_config(*overrides("lora"), "trainer.max_steps=1", f"paths.output_dir={folder}",
                       f"paths.cache_dir={cache}"))
    with pytest.raises(FileExistsError, match="resume=never starts afresh only in a new folder"):
        run(compose_config(*overrides("lora"), "resume=never", f"paths.output_dir={folder}",
                           f"paths.cache_dir={cache}"))


def test_a_signal_outside_training_stops_at_once_and_the_previous_handler_gets_it():
    from moelab.modules.checkpointing import RunInterrupted, SignalGuard

    received = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))  # as submitit's
    try:
        with SignalGuard() as guard:
            with pytest.raises(RunInterrupted, match="SIGUSR2 before training saved anything"):
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(1)
            with pytest.raises(SystemExit) as stopped:
                guard.hand_on(signal.SIGUSR2)
        assert received == [signal.SIGUSR2] and stopped.value.code == 128 + signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, previous)
