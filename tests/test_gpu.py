"""Checks of the accelerator path, marked ``gpu``: scripts/gpu_check.sh runs them on a GPU
(MOELAB_TEST_ACCELERATOR=gpu); everywhere else they run on the CPU, where they still check that scoring
follows the trainer (device and precision), not the parameters, and that the grouped experts' GEMMs give
``torch._grouped_mm`` offsets and layouts it computes correctly."""

import os

import pytest
import torch
from conftest import compose_config, randomize_adapter, tiny_model, token_batch

from moelab.adapters import inject
from moelab.adapters.mixlora import MixLoraConfig
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


def test_grouped_expert_gemms_run_grouped_mm_where_it_is_fast_and_equal_the_loop(monkeypatch):
    # On a GPU of compute capability 9.0 or later, MixLoRA's grouped path under bf16 autocast runs its per-expert
    # GEMMs (forward and backward, inside its slot function and in W2's B) as torch._grouped_mm; it must train
    # like the torch.mm loop. Elsewhere torch._grouped_mm is forced onto its CPU fallback, so that the offsets
    # and layouts it is given are checked on every machine.
    from moelab.adapters import experts

    device = torch.device("cuda" if ACCELERATOR == "gpu" else "cpu")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("torch._grouped_mm has grouped kernels from compute capability 9.0 on")
    model, _ = tiny_model()
    adapter = inject(model, MixLoraConfig(num_experts=8, top_k=2, lora_dropout=0.0))
    randomize_adapter(model, scale=0.1)
    model.to(device).train()
    batch = {key: value.to(device) for key, value in token_batch(batch=4, seq=16).items()}
    params = adapter.trainable_parameters(model)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *args, **kwargs: calls.append(1) or grouped_mm(*args, **kwargs))

    def loss_and_grads():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    if device.type == "cpu":
        monkeypatch.setattr(experts, "_grouped_mm_is_fast", lambda *tensors: True)
    fast = loss_and_grads()
    assert calls, "the grouped GEMMs ran torch._grouped_mm"
    monkeypatch.setattr(experts, "_grouped_mm_is_fast", lambda *tensors: False)
    count = len(calls)
    loop = loss_and_grads()
    assert len(calls) == count, "the reference ran the torch.mm loop"
    for a, b in zip(fast, loop, strict=True):  # bf16 GEMMs of another kernel: equal to bf16 rounding
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * b.abs().max().item())


def test_slot_dropout_draws_its_mask_on_the_accelerator_under_bf16_autocast():
    # W2's expert dropout on the grouped path draws 16-bit integers where its tensors live; under bf16 autocast a
    # train step with it on gives finite gradients to every expert factor, and the kept share is 1 − p
    from moelab.adapters.mixlora import draw_keep_mask

    device = torch.device("cuda" if ACCELERATOR == "gpu" else "cpu")
    mask = draw_keep_mask(round(0.25 * 2**16), out=torch.empty(512, 1024, dtype=torch.uint8, device=device))
    assert mask.device.type == device.type and abs(mask.double().mean().item() - 0.75) < 0.01
    model, _ = tiny_model()
    adapter = inject(model, MixLoraConfig(num_experts=4, top_k=2, lora_dropout=0.25))
    randomize_adapter(model, scale=0.1)
    model.to(device).train()
    batch = {key: value.to(device) for key, value in token_batch(batch=2, seq=16).items()}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in adapter.trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(torch.count_nonzero(g) for g in grads)


def test_the_benchmarks_memory_peak_counts_a_fresh_optimizer_state_not_a_first_steps_one_time_costs():
    # what the benchmark's peak_memory_ratio rests on: two steps from a fresh AdamW state (two moments) after a
    # warm-up step. Every buffer is 36 MiB, over glibc's largest mmap threshold (32 MiB), so that on a CPU each
    # one is mapped and unmapped on its own and the resident set follows the live tensors
    from moelab.modules.bench import AllocatedPeak, ResidentPeak, added_peak_bytes

    device = torch.device("cuda" if ACCELERATOR == "gpu" else "cpu")
    unit = 9 * 2**20  # fp32 elements: 36 MiB
    weight = torch.nn.Parameter(torch.zeros(unit, device=device))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    kept_by_the_first_step = []

    def step():
        if not kept_by_the_first_step:  # as the library code and caches a first step leaves resident
            kept_by_the_first_step.append(torch.ones(4 * unit, device=device))
        (weight * 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    meter = AllocatedPeak(device) if device.type == "cuda" else ResidentPeak()
    peak = added_peak_bytes(step, optimizer, meter) / (4 * unit)
    assert set(optimizer.state[weight]) == {"step", "exp_avg", "exp_avg_sq"}
    # at the optimizer step the two moments, the gradient and AdamW's denominator (one or two temporaries) live at
    # once: 5 units measured; with the state kept from the warm-up step it measured 3, with the first step's 4
    # units it would pass 7
    assert 4 <= peak < 5.5, peak
