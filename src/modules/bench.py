"""Speed benchmarks: training-step time per method and inference latency of merged and unmerged models.

Measured side by side in one process, on the same random-weight model shapes and the same batch, so the
ratios are fair: every variant is built up front and the timed steps are interleaved round-robin (one
step of each variant per round), which spreads machine noise evenly over the variants. Reported per
variant: median seconds per step, tokens/s, the ratio to the reference variant and, on CUDA, peak memory.
Absolute times mean something only on a GPU; on a CPU read the ratios.

* ``train``: forward + backward + AdamW step; methods trained in stages get one row per stage. The
  ``base`` row backpropagates through the frozen model to its input embeddings — the floor that every
  adapter pays — and the reference for ratios is LoRA r16 on all seven projections (the targets of the
  method papers' LoRA baselines).
* ``latency``: batch 1; ``prefill`` = one forward over the prompt, ``decode`` = time per generated token
  of greedy decoding with the KV cache (the prefill that fills the cache is not timed). Variants: the base
  model, a copy of it (the noise floor), merged LoRA r16, and every other registered method as it runs
  unmerged plus, when its class says ``mergeable``, merged; the reference is the base model.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from moelab.adapters import config_from_dict, count_parameters, inject, merge_and_unload, registered_adapters
from moelab.adapters.base import LLAMA_PROJECTIONS

# Real architectures' shapes (random weights: timing needs no trained values).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=260),
    "smollm2_135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama3_2_3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama2_7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}
LORA_R16_ALL = {"target_modules": list(LLAMA_PROJECTIONS),
                "r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: Callable[[], float | None]  # returns its own timing when only part of the step counts
    parameters: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    peak_memory: int | None = None


def build_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {sorted(SHAPES)}")
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def default_adapter_values(conf_dir: Path, method: str) -> dict:
    """The method's defaults from conf/adapter/<method>.yaml, as training uses them, with interpolations such
    as ``${data.tasks}`` (one expert per data task) resolved against the tiny data config."""
    root = OmegaConf.create({"data": OmegaConf.load(conf_dir / "data" / "tiny.yaml"),
                             "adapter": OmegaConf.load(conf_dir / "adapter" / f"{method}.yaml")})
    values = OmegaConf.to_container(root.adapter, resolve=True)
    values.pop("name")
    return values


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rounds(variants: list[Variant], rounds: int, warmup: int, device: torch.device) -> None:
    for round_index in range(warmup + rounds):
        for variant in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _synchronize(device)
            started = time.perf_counter()
            own_timing = variant.step()
            _synchronize(device)
            if round_index >= warmup:
                variant.seconds.append(own_timing if own_timing is not None else time.perf_counter() - started)
                if device.type == "cuda":
                    variant.peak_memory = max(variant.peak_memory or 0, torch.cuda.max_memory_allocated(device))


def _report(variants: list[Variant], reference: str, tokens_per_step: int) -> list[dict]:
    medians = {v.name: statistics.median(v.seconds) for v in variants}
    return [{"variant": v.name, "median_s": medians[v.name], "min_s": min(v.seconds),
             "ratio_to_" + reference: medians[v.name] / medians[reference],
             "tokens_per_s": tokens_per_step / medians[v.name], "peak_memory_bytes": v.peak_memory,
             "parameters": v.parameters, "steps_timed": len(v.seconds)} for v in variants]


# -- training step --------------------------------------------------------------------------------------


def _train_step(model: nn.Module, adapter, batch: dict) -> Callable[[], None]:
    trainable = adapter.trainable_parameters(model) if adapter else []
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    embeddings = model.get_input_embeddings()

    def step() -> None:
        if adapter is None:  # backprop through the frozen model to its inputs: the cost every adapter pays
            inputs = embeddings(batch["input_ids"]).detach().requires_grad_(True)
            loss = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        else:
            adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
            output = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
            loss = output.loss + sum(adapter.aux_losses(model).values(), torch.zeros((), device=output.loss.device))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _staged_variants(base: nn.Module, name: str, config, batch: dict, device: torch.device) -> list[Variant]:
    """One variant per training stage of the method (``name:stage``), or one when it has no stages."""
    stages = [stage for _, stage in inject(copy.deepcopy(base), config).stage_schedule(max_steps=100)] or [None]
    variants = []
    for stage in stages:
        model = copy.deepcopy(base)
        adapter = inject(model, config)
        if stage is not None:
            adapter.enter_stage(model, stage)
        model.to(device)
        label = name if stage is None else f"{name}:{stage}"
        variants.append(Variant(label, model, _train_step(model, adapter, batch), count_parameters(model)))
    return variants


def train_step_benchmark(conf_dir: Path, shape: str, methods: list[str], batch_size: int, seq_len: int, rounds: int,
                         warmup: int, device: torch.device, dtype: torch.dtype) -> dict:
    base = build_model(shape, dtype, device)
    base.train()
    base.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, base.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
             "task_ids": torch.zeros(batch_size, dtype=torch.long, device=device)}
    variants = [Variant("base", base, _train_step(base, None, batch))]
    for name, values in [("lora_r16_all", ("lora", LORA_R16_ALL))] + [
            (m, (m, default_adapter_values(conf_dir, m))) for m in methods]:
        variants += _staged_variants(base, name, config_from_dict(*values), batch, device)
    _timed_rounds(variants, rounds, warmup, device)
    return {"kind": "train_step", "shape": shape, "batch_size": batch_size, "seq_len": seq_len,
            "rows": _report(variants, "lora_r16_all", batch_size * seq_len)}


# -- inference latency ----------------------------------------------------------------------------------


def _prefill(model: nn.Module, prompt: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(input_ids=prompt, use_cache=False)
    return step


def _decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> Callable[[], float]:
    def step() -> float:
        with torch.no_grad():
            output = model(input_ids=prompt, use_cache=True)
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(new_tokens):
                token = output.logits[:, -1:].argmax(-1)
                output = model(input_ids=token, past_key_values=output.past_key_values, use_cache=True)
            _synchronize(device)
            return (time.perf_counter() - started) / new_tokens
    return step


def latency_variants(conf_dir: Path, base: nn.Module) -> list[tuple[str, nn.Module]]:
    """The models whose latency is compared: base, its copy, merged LoRA r16, then every other registered
    method with its default config, named ``<method>`` unmerged and ``<method>_merged`` when it can merge.

    ``base_copy`` is a deep copy of the base model, the same computation in other memory: its ratio to
    ``base`` is the noise floor of the run, against which a merged model's ratio (the same architecture, so
    ideally 1.00) is read."""

    def with_adapter(method: str, merged: bool, values: dict | None = None) -> nn.Module:
        model = copy.deepcopy(base)
        inject(model, config_from_dict(method, values or default_adapter_values(conf_dir, method)))
        with torch.no_grad():  # non-zero updates, as after training
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0.0, 0.01)
        return merge_and_unload(model) if merged else model

    variants = [("base", base), ("base_copy", copy.deepcopy(base)),
                ("lora_r16_merged", with_adapter("lora", True, LORA_R16_ALL))]
    for method, adapter_cls in registered_adapters().items():
        if method == "lora":
            continue
        variants.append((method, with_adapter(method, False)))
        if adapter_cls.mergeable:
            variants.append((f"{method}_merged", with_adapter(method, True)))
    return variants


def latency_benchmark(conf_dir: Path, shape: str, prompt_len: int, new_tokens: int, rounds: int, warmup: int,
                      device: torch.device, dtype: torch.dtype) -> dict:
    base = build_model(shape, dtype, device)
    base.eval()
    base.requires_grad_(False)
    prompt = torch.randint(4, base.config.vocab_size, (1, prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    models = [(name, model.to(device).eval()) for name, model in latency_variants(conf_dir, base)]
    prefill = [Variant(name, model, _prefill(model, prompt)) for name, model in models]
    decode = [Variant(name, model, _decode(model, prompt, new_tokens, device)) for name, model in models]
    _timed_rounds(prefill, rounds, warmup, device)
    _timed_rounds(decode, rounds, warmup, device)
    return {"kind": "latency", "shape": shape, "batch_size": 1, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill": _report(prefill, "base", prompt_len), "decode_per_token": _report(decode, "base", 1)}
