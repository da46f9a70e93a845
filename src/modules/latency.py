"""Inference latency of a trained model, for the cost columns of the comparison table.

A method's cost at inference is what a user deploying it pays per request: the forward over the prompt
(*prefill*) and each generated token after it (*decode*, with the KV cache). Both are timed on the model as
it was scored (merged into the base weights when the method merges, as lm-eval scored it), on the trainer's
root device and in the run's precision, at batch 1, with greedy decoding of ``new_tokens`` tokens after a
prompt of ``prompt_tokens`` random token ids. Routing depends on the tokens, not on whether they read as
text, so random ids cost what text costs. Each figure is the median over ``repeats`` timed rounds after one
warm-up round.

The same timing steps serve the latency benchmark (``moelab.modules.bench``), which compares methods side by
side in one process; the numbers here are per run, so that they sit in each run's results.json and a table's
cost columns. Absolute times mean something only on a quiet machine, a GPU above all; on a shared CPU read
them as rough.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_step(model: nn.Module, prompt: torch.Tensor) -> Callable[[], None]:
    """One forward over ``prompt`` without a cache."""
    def step() -> None:
        with torch.no_grad():
            model(input_ids=prompt, use_cache=False)
    return step


def decode_step(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> Callable[[], float]:
    """Prefill ``prompt`` with the cache on, then time ``new_tokens`` greedy tokens; returns seconds per token.
    The KV cache goes back in under the name the model returned it by (``cache`` in transformers 5,
    ``past_key_values`` before)."""
    def step() -> float:
        with torch.no_grad():
            output = model(input_ids=prompt, use_cache=True)
            cache = "cache" if "cache" in output else "past_key_values"
            synchronize(device)
            started = time.perf_counter()
            for _ in range(new_tokens):
                token = output.logits[:, -1:].argmax(-1)
                output = model(input_ids=token, use_cache=True, **{cache: output[cache]})
            synchronize(device)
            return (time.perf_counter() - started) / new_tokens
    return step


def _median_seconds(step: Callable[[], float | None], repeats: int, device: torch.device) -> float:
    seconds = []
    for round_index in range(1 + repeats):
        synchronize(device)
        started = time.perf_counter()
        own_timing = step()
        synchronize(device)
        if round_index > 0:
            seconds.append(own_timing if own_timing is not None else time.perf_counter() - started)
    return statistics.median(seconds)


def measure_latency(model: nn.Module, device: torch.device, prompt_tokens: int = 128, new_tokens: int = 16,
                    repeats: int = 3) -> dict[str, Any]:
    """``prefill_ms`` and ``decode_ms_per_token`` of ``model`` (eval mode for the call) on ``device``, under
    whatever autocast the caller has entered. The prompt comes from a generator of its own: the run's random
    streams are not touched."""
    prompt = torch.randint(4, model.config.vocab_size, (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        prefill = _median_seconds(prefill_step(model, prompt), repeats, device)
        decode = _median_seconds(decode_step(model, prompt, new_tokens, device), repeats, device)
    finally:
        model.train(was_training)
    return {"prefill_ms": 1000 * prefill, "decode_ms_per_token": 1000 * decode, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "batch_size": 1, "device": str(device)}
