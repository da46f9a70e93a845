"""The benchmark script's measurements are well-formed (timings themselves are never asserted)."""

import torch
from conftest import CONF

from moelab.adapters import registered_adapters
from moelab.modules.bench import latency_benchmark, train_step_benchmark

CPU = torch.device("cpu")


def test_train_step_benchmark_reports_every_method_against_lora():
    methods = sorted(m for m in registered_adapters() if m != "lora")
    result = train_step_benchmark(CONF, "tiny", methods, batch_size=2, seq_len=8, rounds=1, warmup=0,
                                  device=CPU, dtype=torch.float32)
    rows = {row["variant"]: row for row in result["rows"]}
    assert {"base", "lora_r16_all"} <= set(rows)
    assert {name.split(":")[0] for name in rows} == {"base", "lora_r16_all", *methods}
    assert rows["lora_r16_all"]["ratio_to_lora_r16_all"] == 1.0
    assert rows["lora_r16_all"]["parameters"]["trainable"] == 2 * (4 * 16 * 128 + 3 * 16 * (64 + 128))
    assert all(row["median_s"] > 0 and row["steps_timed"] == 1 for row in rows.values())


def test_latency_benchmark_compares_with_the_base_model():
    result = latency_benchmark(CONF, "tiny", prompt_len=8, new_tokens=2, rounds=1, warmup=0, device=CPU,
                               dtype=torch.float32)
    prefill = {row["variant"] for row in result["prefill"]}
    methods = {name: cls for name, cls in registered_adapters().items() if name != "lora"}
    merged = {f"{name}_merged" for name, cls in methods.items() if cls.mergeable}
    assert prefill == {"base", "base_copy", "lora_r16_merged", *methods, *merged}
    assert merged, "at least one mergeable method besides LoRA is compared merged"
    assert prefill == {row["variant"] for row in result["decode_per_token"]}
    assert next(r for r in result["prefill"] if r["variant"] == "base")["ratio_to_base"] == 1.0
