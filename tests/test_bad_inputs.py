"""Bad input through the real entry point: each exits non-zero before any model is loaded, with one last
line on stderr that names the field (and where the traceback went); a run whose learning rate makes it
diverge ends as "diverged" at the step it happened."""

import json
import runpy
import subprocess
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra
from probes import ROOT, TEST_ENV, TRAIN

TINY = ["model=tiny_random", "data=tiny", "trainer.max_steps=2", "logger=none", "eval.enabled=false"]
# (overrides, what the last line of stderr must name)
BAD_INPUTS = [
    (["trainer.max_steps=0"], "trainer.max_steps (0)"),
    (["trainer.max_steps=abc"], "trainer.max_steps ('abc')"),
    (["trainer.max_steps=-1"], "trainer.max_steps (-1) needs trainer.max_epochs"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches (0)"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val (-1)"),
    (["trainer.precision=bf17"], "trainer.precision ('bf17')"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps (0)"),
    (["+trainer.foo=1"], "trainer.foo: unknown key"),
    (["+ckpt_path=/tmp/last.ckpt"], "ckpt_path: moelab reads no top-level key"),
    (["seed=abc"], "seed ('abc')"),
    (["seed=-3"], "seed (-3)"),
    (["threads=0"], "threads (0)"),
    (["checkpoint_every=0"], "checkpoint_every (0)"),
    (["resume=/nonexistent/last.ckpt"], "resume ('/nonexistent/last.ckpt')"),
    (["eval.metric=accc"], "eval.metric ('accc')"),
    (["eval.limit=0"], "eval.limit (0)"),
    (["eval.batch_size=0"], "eval.batch_size (0)"),
    (["eval.num_fewshot=-1"], "eval.num_fewshot (-1)"),
    (["eval.max_length=0"], "eval.max_length (0)"),
    (["eval.enabled=maybe"], "eval.enabled ('maybe')"),
    (["+eval.foo=1"], "eval.foo: unknown key"),
    (["eval.splits=[train]"], "eval.splits (['train']) must list dev and/or test"),
    (["eval.splits=[test,test]"], "eval.splits (['test', 'test'])"),
    (["eval.latency.new_tokens=0"], "eval.latency.new_tokens (0)"),
    (["data.batch_size=abc"], "data.batch_size ('abc')"),
    (["data.max_length=abc"], "data.max_length ('abc')"),
    (["data.test_fraction=2"], "data.test_fraction (2)"),
    (["data.dev_fraction=0.8"], "data.test_fraction + data.dev_fraction (0.25 + 0.8)"),
    (["data.max_dev_examples=0"], "data.max_dev_examples (0)"),
    (["data.tasks=[no_such_task]"], "data.tasks: unknown task 'no_such_task'"),
    (["data.source=web"], "data.source ('web')"),
    (["data.max_train_examples=0"], "data.max_train_examples (0)"),
    (["+data.foo=1"], "data.foo: unknown key"),
    (["module.optimizer.lr=-1"], "module.optimizer.lr (-1)"),
    (["module.optimizer.lr=abc"], "module.optimizer.lr ('abc')"),
    (["module.optimizer.weight_decay=-0.1"], "module.optimizer.weight_decay (-0.1)"),
    (["module.optimizer.betas=[0.9,1.5]"], "module.optimizer.betas ([0.9, 1.5])"),
    (["module.routing_tokens=all"], "module.routing_tokens ('all')"),
    (["+module.foo=1"], "module.foo: unknown key"),
    (["model.dtype=float8"], "model.dtype ('float8')"),
    (["model=smollm2_135m_hub", "model.pretrained=/nonexistent/model"], "model.pretrained ('/nonexistent/model')"),
    (["adapter.r=true"], "adapter.r (True)"),
    (["adapter.r=0"], "adapter.r (0)"),
    (["adapter.lora_alpha=abc"], "adapter.lora_alpha ('abc')"),
    (["adapter.lora_dropout=1.5"], "adapter.lora_dropout (1.5)"),
    (["adapter.layers_to_transform=[-1]"], "adapter.layers_to_transform ([-1])"),
    (["+adapter.foo=1"], "unknown field(s) ['foo']"),
    (["adapter=mixlora", "adapter.top_k=true"], "adapter.top_k (True)"),
    (["adapter=mixlora", "adapter.top_k=9"], "adapter.top_k (9) must be <= num_experts (8)"),
    (["adapter=mixlora", "adapter.aux_loss_scope=galactic"], "adapter.aux_loss_scope ('galactic')"),
    (["adapter=mole", "adapter.experts.r=true"], "experts.r (True)"),
    (["adapter=mole", "adapter.gate_level=tree"], "gate_level ('tree')"),
    (["adapter=furina", "adapter.top_k=0"], "adapter.top_k (0)"),
    (["adapter=mor", "adapter.num_routers=0"], "adapter.num_routers (0)"),
    (["adapter=lora_mixer", "adapter.top_k=5"], "top_k (5)"),
]


def train(overrides: list[str], folder) -> subprocess.CompletedProcess:
    return subprocess.run([*TRAIN, *TINY, *overrides, f"hydra.run.dir={folder}"], cwd=ROOT, env=TEST_ENV,
                          capture_output=True, text=True, timeout=300)


def train_in_process(overrides: list[str], folder, capsys, monkeypatch) -> tuple[int, str, str]:
    """scripts/train.py run as ``__main__`` in this process (the same Hydra entry point, without paying for a
    new interpreter fifty times): ``(exit status, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", ["train.py", *TINY, *overrides, f"hydra.run.dir={folder}"])
    capsys.readouterr()
    try:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    return status, out.out, out.err


def test_every_bad_input_is_refused_in_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    assert len(BAD_INPUTS) >= 40
    problems = []
    for index, (overrides, named) in enumerate(BAD_INPUTS):
        status, stdout, stderr = train_in_process(overrides, tmp_path / str(index), capsys, monkeypatch)
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if status == 0 or named not in last or not last.startswith("[moelab] error: "):
            problems.append(f"{overrides}: exit {status}, last line {last!r}")
        elif "trainable parameters" in stdout:
            problems.append(f"{overrides}: the model was loaded before the error")
    assert not problems, "\n".join(problems)


def test_a_bad_input_ends_the_process_with_one_line_and_the_traceback_in_error_txt(tmp_path):
    completed = train(["adapter.lora_alpha=abc"], tmp_path)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        f"[moelab] error: adapter.lora_alpha ('abc') must be float (traceback: {tmp_path / 'error.txt'}; "
        "HYDRA_FULL_ERROR=1 prints it)")
    assert "Traceback" in (tmp_path / "error.txt").read_text()


@pytest.mark.parametrize("lr, reason", [("1e30", "adapter weights reached"), ("1e38", "overflowed")])
def test_a_runaway_learning_rate_ends_as_diverged_at_its_step(tmp_path, lr, reason):
    completed = train([f"module.optimizer.lr={lr}"], tmp_path)
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    assert reason in last and "step 1" in last and "error.txt" in last
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged" and reason in results["error"]
