"""Multi-process training on CPU (two gloo processes): every method under DDP, both stages of the staged ones,
with the default (length-grouped) data; a step split across processes or accumulated micro-batches equals
the unsplit step; staged methods leave their frozen tensors bit-identical; a failure on one process stops
both with one named error; the Lightning launcher, torchrun, and the refusal of DDP inside a local multirun."""

import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import compose_config
from probes import NO_BALANCE, NO_DROPOUT, ROOT, STAGED, TEST_ENV, TRAIN
from safetensors.torch import load_file

from moelab.adapters import registered_adapters
from moelab.modules.training import run

METHODS = sorted(registered_adapters())
ROUTED = [m for m in METHODS if m != "lora"]
STEPS = 4
TINY = ["model=tiny_random", "data=tiny", f"trainer.max_steps={STEPS}", "eval.enabled=false", "logger=none",
        "callbacks=none", "threads=1", "checkpoint_every=100"]


def stage_overrides(method: str) -> list[str]:
    return ["adapter.experts.stage1_steps=2", "+callbacks.probe._target_=probes.StageProbe"] if method in STAGED else []


def job(method: str, folder, *extra: str, balance: bool = False) -> list[str]:
    return [*TINY, f"adapter={method}", *NO_DROPOUT[method], *([] if balance else NO_BALANCE[method]),
            *stage_overrides(method), f"paths.output_dir={folder}", f"paths.cache_dir={folder.parent / 'cache'}",
            *extra]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_processes(runs: list[list[str]], timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """Run ``tests/ddp_worker.py`` as ranks 0 and 1 of one process group (the variables torchrun sets)."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**TEST_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), json.dumps(runs)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    """Per method: (a) 2 processes × batch 4, (b) 1 × 8, (c) 1 × 4 with 2 accumulated micro-batches, all with
    balance losses off; and with them on, (a) with aux_loss_scope=global and (b)."""
    out = tmp_path_factory.mktemp("ddp")
    two = [job(m, out / f"{m}-a", "trainer=ddp_cpu", "data.batch_size=4") for m in METHODS]
    two += [job(m, out / f"{m}-a-global", "trainer=ddp_cpu", "data.batch_size=4", "adapter.aux_loss_scope=global",
                balance=True) for m in ROUTED]
    started = time.monotonic()
    ranks = two_processes(two)
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    seconds = time.monotonic() - started
    for m in METHODS:
        run(compose_config(*job(m, out / f"{m}-b", "data.batch_size=8")))
        run(compose_config(*job(m, out / f"{m}-c", "data.batch_size=4", "trainer.accumulate_grad_batches=2")))
    for m in ROUTED:
        run(compose_config(*job(m, out / f"{m}-b-global", "data.batch_size=8", balance=True)))
    return out, seconds


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(folder, reference) -> None:
    """Every adapter tensor within 3e-5 of the reference, relative to its norm. The residue is fp32 rounding:
    a micro-batch is padded to its own longest example, so its matmuls have other shapes than the whole
    batch's, and Adam's normalised first steps magnify the rounding of near-zero gradient entries (single
    elements then differ by up to 5e-4 of the tensor's largest entry; whole tensors by up to 1.2e-5 of their
    norm, measured for MoLE's sites on the tiny mixture). A loss normalised per micro-batch instead of per step
    misses by orders of magnitude more."""
    ours, theirs = adapter_tensors(folder), adapter_tensors(reference)
    assert set(ours) == set(theirs)
    moved = 0
    for key, value in theirs.items():
        assert (ours[key] - value).norm() <= 3e-5 * value.norm().clamp_min(1e-12), f"{folder.name}: {key}"
        moved += int(value.abs().max() > 0)
    assert moved, "training changed the adapter"


def assert_same_routing(folder, reference) -> None:
    ours, theirs = torch.load(folder / "routing.pt"), torch.load(reference / "routing.pt")
    for split in ("train", "dev"):
        for name, value in theirs[split]["sums"].items():
            if name in ("tokens", "slots", "load"):  # counts: every real token once, no padded duplicates
                assert torch.equal(ours[split]["sums"][name], value), f"{folder.name} {split} {name}"
            else:  # sums of fp32 probabilities over hundreds of tokens, added up in another order: ~1e-6
                torch.testing.assert_close(ours[split]["sums"][name], value, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_split_steps_equal_the_unsplit_step(equivalence_runs, method):
    out, _ = equivalence_runs
    for variant in ("a", "c"):
        assert_same_adapter(out / f"{method}-{variant}", out / f"{method}-b")
        assert_same_routing(out / f"{method}-{variant}", out / f"{method}-b")
    results = json.loads((out / f"{method}-a" / "results.json").read_text())
    reference = json.loads((out / f"{method}-b" / "results.json").read_text())
    assert results["timings"]["train_tokens"] == reference["timings"]["train_tokens"], "every process's tokens"
    assert results["timings"]["train_steps"] == STEPS


@pytest.mark.parametrize("method", ROUTED)
def test_global_balance_losses_equal_the_unsplit_step(equivalence_runs, method):
    out, _ = equivalence_runs
    assert_same_adapter(out / f"{method}-a-global", out / f"{method}-b-global")


@pytest.mark.parametrize("method", STAGED)
def test_staged_methods_freeze_without_touching_requires_grad(equivalence_runs, method):
    out, _ = equivalence_runs
    probes = [torch.load(out / f"{method}-a" / f"probe_rank{rank}.pt") for rank in range(2)]
    for probe in probes:
        start, switch, end = probe["stage 0"], probe["stage 2"], probe["end"]
        sites = [key for key in start if ".site." in key]
        experts = [key for key in start if ".experts." in key]
        assert sites and experts
        assert all(torch.equal(start[k], switch[k]) for k in sites), "sites frozen in stage hard"
        assert any(not torch.equal(start[k], switch[k]) for k in experts), "experts trained in stage hard"
        assert all(torch.equal(switch[k], end[k]) for k in experts), "experts frozen in stage soft"
        assert any(not torch.equal(switch[k], end[k]) for k in sites), "sites trained in stage soft"
    assert all(torch.equal(probes[0]["end"][k], probes[1]["end"][k]) for k in probes[0]["end"]), "ranks agree"


def test_the_two_process_runs_stay_within_budget(equivalence_runs):
    _, seconds = equivalence_runs
    assert seconds < 150, f"{len(METHODS) + len(ROUTED)} two-process runs took {seconds:.0f} s"


@pytest.mark.parametrize("kind, rank, error", [("exception", 1, "RuntimeError: injected failure"),
                                               ("non_finite", 0, "TrainingDiverged: non-finite training loss")])
def test_a_failure_on_one_process_stops_both_with_one_named_error(tmp_path, kind, rank, error):
    folder = tmp_path / "run"
    overrides = job("mixlora", folder, "trainer=ddp_cpu", "data.batch_size=4", "+callbacks.fail._target_=probes.FailAt",
                    "+callbacks.fail.step=2", f"+callbacks.fail.rank={rank}", f"+callbacks.fail.kind={kind}")
    started = time.monotonic()
    ranks = two_processes([overrides], timeout=120)
    assert time.monotonic() - started < 60
    message = f"process {rank} of 2 failed at step 2: {error}"
    for result in ranks:
        assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == ("diverged" if kind == "non_finite" else "failed") and message in results["error"]
    assert message in (folder / "error.txt").read_text()


def test_lightning_launcher_runs_a_staged_method_with_scores_from_process_zero(tmp_path):
    folder = tmp_path / "run"
    completed = subprocess.run([*TRAIN, "model=tiny_random", "data=tiny", "adapter=lora_mixer", "trainer=ddp_cpu",
                                "trainer.max_steps=4", "logger=csv", "eval.limit=4", f"hydra.run.dir={folder}",
                                f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, env=TEST_ENV, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "ok" and results["timings"]["train_steps"] == 4
    assert results["scoring"] == {"device": "cpu", "precision": "32-true", "parameter_dtype": "torch.float32"}
    dev = torch.load(folder / "routing.pt")["dev"]["sums"]["tokens"]  # [site, task]
    assert (dev == dev[0]).all(), "every routing site counts the same tokens"
    assert dev[0].sum() == dev_tokens(tmp_path), "every dev token counted once, no padded duplicates"


def dev_tokens(folder) -> int:
    from hydra.utils import instantiate

    cfg = compose_config("model=tiny_random", "data=tiny")
    data = instantiate(cfg.data)
    data.prepare_examples(folder / "dev-count")
    data.set_tokenizer(instantiate(cfg.model).tokenizer)
    data.setup()
    return sum(len(item["input_ids"]) for item in data.dev_items)


def test_torchrun_runs_one_job_in_one_folder(tmp_path):
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(ROOT / "scripts" / "train.py"), "model=tiny_random", "data=tiny",
               "adapter=mixlora", "trainer=ddp_cpu", "trainer.max_steps=3", "eval.enabled=false", "logger=none",
               f"paths.log_dir={logs}", f"paths.cache_dir={tmp_path / 'cache'}"]
    completed = subprocess.run(command, cwd=ROOT, env={**TEST_ENV, "OMP_NUM_THREADS": "1"}, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    folders = list((logs / "runs").iterdir())
    assert len(folders) == 1, "both processes chose the same run folder"
    assert json.loads((folders[0] / "results.json").read_text())["timings"]["train_steps"] == 3


def test_ddp_inside_a_local_multirun_is_refused_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    completed = subprocess.run([*TRAIN, "-m", "model=tiny_random", "data=tiny", "adapter=lora,mixlora",
                                "trainer=cpu,ddp_cpu", f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=TEST_ENV,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "hydra/launcher=slurm" in completed.stderr and "torchrun --nproc-per-node" in completed.stderr
    assert not any(sweep.glob("*/results.json")), "no job ran"


def test_fsdp_wraps_the_loaded_models_own_decoder_layers(tiny):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from moelab.modules.launch import decoder_layer_classes
    from moelab.modules.training import fitted_strategy

    model, _ = tiny
    strategy = fitted_strategy(compose_config("trainer=fsdp").trainer.strategy, model)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert fitted_strategy(compose_config("trainer=ddp").trainer.strategy, model) is None, "DDP as configured"
    with pytest.raises(ValueError, match="auto_wrap_policy: Linear names no decoder-layer class"):
        decoder_layer_classes(torch.nn.Linear(2, 2))
