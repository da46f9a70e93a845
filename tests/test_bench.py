"""The benchmark script's measurements are well-formed (timings themselves are never asserted)."""

import subprocess
import sys
import time

import pytest
import torch
from conftest import CONF

from moelab.adapters import registered_adapters
from moelab.modules.bench import (
    BASE,
    REDUCED_VOCAB,
    REFERENCE,
    ModelShape,
    OtherLoad,
    TrainBench,
    VariantSpec,
    _add_memory,
    latency_benchmark,
    markdown_table,
    memory_floor,
    paired_ratios,
    probe_in_subprocess,
    train_step_benchmark,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_result():
    methods = sorted(m for m in registered_adapters() if m != "lora")
    bench = TrainBench(ModelShape("tiny"), batch_size=2, seq_len=8, rounds=2, warmup=0, memory=False)
    return methods, train_step_benchmark(CONF, bench, methods, CPU, torch.float32)


def test_train_step_benchmark_reports_every_method_against_lora(tiny_result):
    methods, result = tiny_result
    variants = result["variants"]
    assert {"base", REFERENCE, "lora_r16_dropout0", "lora_r16_per_input", "lora_r128", "peft_lora_r16"} <= set(variants)
    assert {name.split(":")[0].split("[")[0] for name in variants} >= {*methods, "mor_per_linear"}
    # shared-mask twins for the methods that own their dropout; MoR's is its host's, which has the twin
    assert {"mixlora[per_input]", "furina[per_input]"} <= set(variants) and "mor[per_input]" not in variants
    reference = variants[REFERENCE]
    assert reference["ratio"] == 1.0 and reference["range"] == [1.0, 1.0] and reference["flop_floor"] == 1.0
    assert reference["parameters"] == 2 * (4 * 16 * 128 + 3 * 16 * (64 + 128))
    assert variants["peft_lora_r16"]["parameters"] == reference["parameters"]
    for values in variants.values():
        assert values["range"][0] <= values["ratio"] <= values["range"][1] and values["tokens_per_s"] > 0


def test_fast_paths_are_checked_and_floors_counted_on_the_grouped_path(tiny_result):
    _, result = tiny_result
    variants = result["variants"]
    # the default row and its twin with the other expert_compute (MixLoRA groups by default, the others not)
    pairs = [("mixlora", "mixlora[dense]"), ("mor_per_linear[grouped]", "mor_per_linear"),
             ("lora_mixer:hard[grouped]", "lora_mixer:hard")]
    for grouped_name, dense_name in pairs:
        grouped, dense = variants[grouped_name], variants[dense_name]
        assert grouped["check"] and grouped["check_max_relative_error"] < 1e-5
        assert grouped["flop_floor"] == dense["flop_floor"] == grouped["flops_ratio"]
        assert dense["flops_ratio"] > grouped["flops_ratio"], "the dense path computes every expert"
    assert variants["lora_r128"]["flop_floor"] > variants["lora_r16_dropout0"]["flop_floor"] == 1.0


def test_memory_floor_adds_the_variants_own_state_to_the_frozen_models_peak(tiny_result):
    _, result = tiny_result
    variants = result["variants"]
    reference, mixlora = variants[REFERENCE], variants["mixlora"]
    for values in (reference, mixlora):  # AdamW: two fp32 moments per parameter, and a step count per tensor
        assert 0 <= values["optimizer_state_bytes"] - 2 * 4 * values["parameters"] <= 4 * 100
    assert reference["routing_bytes"] == 0 < mixlora["routing_bytes"]
    held = mixlora["optimizer_state_bytes"] + mixlora["routing_bytes"]
    assert memory_floor(mixlora, frozen_peak=10**6) == 10**6 + held
    assert memory_floor(reference, frozen_peak=10**6) == 10**6 + reference["optimizer_state_bytes"]
    # the table's figures: ratios to LoRA r16's measured peak, the floor built on the base row's
    figures = {name: {**variants[name], "peak_memory_bytes": peak}
               for name, peak in ((BASE, 10**6), (REFERENCE, 2 * 10**6), ("mixlora", 3 * 10**6))}
    _add_memory(figures, TrainBench(ModelShape("tiny"), memory=False), [], CPU)
    assert figures["mixlora"]["peak_memory_ratio"] == 1.5
    assert figures["mixlora"]["peak_memory_floor"] == (10**6 + held) / (2 * 10**6)
    assert figures[BASE]["peak_memory_floor"] == 0.5 <= figures[REFERENCE]["peak_memory_floor"] < 1.0


def test_markdown_table_lists_every_variant(tiny_result):
    _, result = tiny_result
    table = markdown_table(result)
    assert all(f"| {name} |" in table for name in result["variants"])


def test_paired_ratios_pair_each_round_with_the_reference():
    figures = paired_ratios([4.0, 3.0, 8.0], [1.0, 2.0, 2.0])  # per round: 4, 1.5, 4
    assert figures == {"ratio": 4.0, "range": [1.5, 4.0], "ratio_of_minimums": 3.0}


def test_cut_shapes_reduce_the_vocabulary_and_check_the_layer_count():
    assert ModelShape("llama3_2_3b", layers=2).config_values()["vocab_size"] == REDUCED_VOCAB
    assert ModelShape("smollm2_135m").config_values()["vocab_size"] == 49152
    with pytest.raises(ValueError, match="--layers"):
        ModelShape("tiny", layers=3).config_values()


def test_other_load_counts_other_processes_not_the_benchmark_itself():
    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    with OtherLoad(threads=1) as alone:  # the benchmark's own work: one core busy in this process
        spin(1.0)
    busy_loop = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", busy_loop])
    try:
        with OtherLoad(threads=1) as crowded:  # another process on a core while this one waits
            time.sleep(1.0)
    finally:
        spinner.wait()
    # the spinner's core counts for the second block only (what else runs on the machine counts for both)
    assert crowded.figures["other_cores"] - alone.figures["other_cores"] > 0.3, (alone.figures, crowded.figures)
    assert set(alone.figures) == {"other_cores", "cores", "threads", "load_1min", "busy"}


def test_memory_probe_measures_a_train_step_in_a_subprocess():
    probe = probe_in_subprocess(VariantSpec(REFERENCE, "adapter", "lora", {"target_modules": ["q_proj"], "r": 4}),
                                ModelShape("tiny"), batch_size=8, seq_len=128, threads=1)
    logits = 8 * 128 * ModelShape("tiny").config_values()["vocab_size"] * 4  # fp32, alive until the backward
    assert probe.get("step_peak_bytes", 0) >= logits, probe


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
