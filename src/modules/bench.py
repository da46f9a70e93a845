"""Speed benchmarks: training-step time per method and inference latency of merged and unmerged models.

Measured side by side in one process, on the same random-weight model shapes and the same batch, so the
ratios are fair: every variant is built up front and the timed steps are interleaved round-robin (one
step of each variant per round), which spreads machine noise evenly over the variants. Absolute times mean
something only on a GPU; on a CPU read the ratios.

* ``train``: forward + backward + AdamW step; methods trained in stages get one row per stage. The
  ``base`` row backpropagates through the frozen model to its input embeddings — the floor that every
  adapter pays — and the reference for ratios is LoRA r16 on all seven projections (the targets of the
  method papers' LoRA baselines). Per variant:

  - ``ratio``: the median over rounds of the round's time divided by the reference's time in the same
    round (paired, so a slow round slows both), with the ``range`` of those per-round ratios, and
    ``ratio_of_minimums`` (fastest step over fastest reference step, the least noisy single figure);
  - ``flop_floor``: matmul FLOPs of one train step of the variant's maths over the reference's, counted by
    ``torch.utils.flop_counter`` (a routed method's floor is counted on its grouped top-k path, which does
    only the selected experts' work; ``flops_ratio`` is what the variant as configured executes);
  - ``peak_memory_ratio``: the peak memory that two train steps, from a fresh optimizer, add to what the
    variant holds before them (its model), after one warm-up step (:func:`added_peak_bytes`): on a CPU the
    resident set in a fresh subprocess per variant (``/proc`` high-water mark; glibc's mmap threshold fixed,
    ``PROBE_ENV``, so that it follows the live tensors), on CUDA the allocator's ``max_memory_allocated``;
  - ``peak_memory_floor``: a lower bound of that ratio, what the maths holds whatever the implementation: the
    ``base`` row's peak (backpropagation through the frozen model) plus the variant's optimizer state and routing
    records, over LoRA r16's peak (:func:`memory_floor`);
  - ``check``: every fast path is compared with its reference (``expert_compute: dense``) on the same
    weights before it is timed, loss and adapter gradients, dropout off; a failing variant is not timed.

  At the large shapes only a few decoder layers are built (``layers``) and the vocabulary is cut to
  ``REDUCED_VOCAB`` tokens, so that the LM head, which no adapter touches, does not hide the layers' cost.
  ``load`` records how many cores other processes kept busy during the timed rounds (:class:`OtherLoad`) and
  flags a run where they competed with the benchmark's threads; ``seconds`` what each phase took.
* ``latency``: batch 1; ``prefill`` = one forward over the prompt, ``decode`` = time per generated token
  of greedy decoding with the KV cache (the prefill that fills the cache is not timed). Variants: the base
  model, a copy of it (the noise floor), merged LoRA r16, and every other registered method as it runs
  unmerged plus, when its class says ``mergeable``, merged; the reference is the base model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moelab.adapters import config_from_dict, count_parameters, inject, merge_and_unload, registered_adapters
from moelab.adapters.base import LLAMA_PROJECTIONS, routed_modules
from moelab.modules.latency import decode_step, prefill_step, synchronize

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
# Per shape, the decoder layers built (None: all) and the tokens per sequence of the default run (batch 4): the
# large shapes are cut so that a CPU run of every variant takes under ten minutes on two cores.
DEFAULT_LAYERS = {"tiny": None, "smollm2_135m": None, "llama3_2_3b": 1, "llama2_7b": 1}
DEFAULT_SEQ_LEN = {"tiny": 128, "smollm2_135m": 128, "llama3_2_3b": 128, "llama2_7b": 64}
REDUCED_VOCAB = 512  # the vocabulary of a model cut to a few layers (see the module docstring)
LORA_R16_ALL = {"target_modules": list(LLAMA_PROJECTIONS), "r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
REFERENCE = "lora_r16"
BASE = "base"  # the row without an adapter: backpropagation through the frozen model alone
CHECK_RTOL = 1e-4  # fast path vs reference at real shapes, fp32: relative to the largest entry


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: Callable[[], float | None]  # returns its own timing when only part of the step counts
    parameters: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class ModelShape:
    """A base model to benchmark: an architecture's shape, optionally cut to ``layers`` decoder layers."""

    shape: str
    layers: int | None = None
    vocab: int | None = None  # None: the shape's own, or REDUCED_VOCAB when layers are cut

    def config_values(self) -> dict:
        if self.shape not in SHAPES:
            raise ValueError(f"--shape must be one of {sorted(SHAPES)}, got {self.shape!r}")
        values = dict(SHAPES[self.shape])
        if self.layers is not None:
            if not 1 <= self.layers <= values["num_hidden_layers"]:
                raise ValueError(f"--layers ({self.layers}) must be in [1, {values['num_hidden_layers']}] "
                                 f"for {self.shape}")
            values["num_hidden_layers"] = self.layers
        vocab = self.vocab or (REDUCED_VOCAB if self.layers is not None else None)
        if vocab is not None:
            values["vocab_size"] = vocab
        return values


def build_model(shape: str | ModelShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = shape if isinstance(shape, ModelShape) else ModelShape(shape)
    config = LlamaConfig(max_position_embeddings=4096, **shape.config_values())
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


def _timed_rounds(variants: list[Variant], rounds: int, warmup: int, device: torch.device) -> None:
    for round_index in range(warmup + rounds):
        for variant in variants:
            synchronize(device)
            started = time.perf_counter()
            own_timing = variant.step()
            synchronize(device)
            if round_index >= warmup:
                variant.seconds.append(own_timing if own_timing is not None else time.perf_counter() - started)


def _report(variants: list[Variant], reference: str, tokens_per_step: int) -> list[dict]:
    medians = {v.name: statistics.median(v.seconds) for v in variants}
    return [{"variant": v.name, "median_s": medians[v.name], "min_s": min(v.seconds),
             "ratio_to_" + reference: medians[v.name] / medians[reference],
             "tokens_per_s": tokens_per_step / medians[v.name],
             "parameters": v.parameters, "steps_timed": len(v.seconds)} for v in variants]


def paired_ratios(seconds: list[float], reference: list[float]) -> dict:
    """Ratio figures of one variant's per-round times against the reference's times of the same rounds."""
    ratios = [s / r for s, r in zip(seconds, reference, strict=True)]
    return {"ratio": statistics.median(ratios), "range": [min(ratios), max(ratios)],
            "ratio_of_minimums": min(seconds) / min(reference)}


# -- the variants of the train-step benchmark ----------------------------------------------------------


@dataclass
class VariantSpec:
    """One row of the train-step benchmark, as plain values (a memory probe rebuilds it in a subprocess).

    ``kind``: ``base`` (no adapter), ``adapter`` (a moelab method, ``method`` with config ``values``, in
    ``stage``) or ``peft`` (HF PEFT's LoRA with ``values``)."""

    name: str
    kind: str
    method: str | None = None
    values: dict = field(default_factory=dict)
    stage: str | None = None

    @property
    def routed(self) -> bool:
        """Whether the method has the ``expert_compute`` flag and this stage can route top-k (the soft stage of a
        composition mixes every expert)."""
        if self.kind != "adapter" or self.stage == "soft":
            return False
        return "expert_compute" in {f.name for f in dataclasses.fields(registered_adapters()[self.method].config_class)}

    def other_compute(self) -> VariantSpec:
        """The same variant with the other ``expert_compute`` than its config's (``name[dense]`` of a grouped
        default, ``name[grouped]`` of a dense one)."""
        config = config_from_dict(self.method, self.values)
        host = getattr(config, "host_adapter_config", None)
        current = (host() if host else config).expert_compute
        other = "dense" if current == "grouped" else "grouped"
        return self.with_values(f"{self.name}[{other}]", expert_compute=other)

    def with_values(self, name: str, **changes) -> VariantSpec:
        return VariantSpec(name, self.kind, self.method, {**self.values, **changes}, self.stage)


def _adapter_specs(conf_dir: Path, method: str, name: str | None = None, **changes) -> list[VariantSpec]:
    """The method with its conf defaults (plus ``changes``), one spec per training stage."""
    values = {**default_adapter_values(conf_dir, method), **changes}
    adapter = inject(_skeleton(), config_from_dict(method, values))
    stages = [stage for _, stage in adapter.stage_schedule(max_steps=100)] or [None]
    name = name or method
    return [VariantSpec(name if stage is None or len(stages) == 1 else f"{name}:{stage}", "adapter", method, values,
                        stage if len(stages) > 1 else None) for stage in stages]


def _skeleton() -> nn.Module:
    return build_model("tiny", torch.float32, torch.device("cpu"))


def train_variant_specs(conf_dir: Path, methods: list[str]) -> list[VariantSpec]:
    """Reference rows (base, LoRA r16 and its twins, LoRA r128, PEFT's LoRA r16) and every method in ``methods``
    with its defaults; routed methods also with the other ``expert_compute``, and shared dropout masks
    (``lora_dropout_sharing: per_input``) for every method that has dropout."""
    specs = [VariantSpec(BASE, "base"),
             VariantSpec(REFERENCE, "adapter", "lora", LORA_R16_ALL),
             VariantSpec("lora_r16_dropout0", "adapter", "lora", {**LORA_R16_ALL, "lora_dropout": 0.0}),
             VariantSpec("lora_r16_per_input", "adapter", "lora",
                         {**LORA_R16_ALL, "lora_dropout_sharing": "per_input"}),
             VariantSpec("lora_r128", "adapter", "lora", {**LORA_R16_ALL, "r": 128, "lora_alpha": 256}),
             VariantSpec("peft_lora_r16", "peft", values=LORA_R16_ALL)]
    for method in methods:
        for name, changes in [(method, {}), *registered_adapters()[method].benchmark_variants.items()]:
            own = _adapter_specs(conf_dir, method, name, **changes)
            specs += own
            specs += [spec.other_compute() for spec in own if spec.routed]
            # a method whose dropout sharing defaults to null passes it on to the layers of another method (MoR to
            # its host's), whose own row has the twin already
            if config_from_dict(method, own[0].values).lora_dropout_sharing is not None:
                specs += [spec.with_values(f"{spec.name}[per_input]", lora_dropout_sharing="per_input")
                          for spec in own if spec.stage != "soft"]
    return specs


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose modules are new but whose (frozen) weights are ``base``'s own tensors: two dozen
    variants of one model then cost one model's memory, not two dozen."""
    memo = {id(tensor): tensor for tensor in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def build_variant(spec: VariantSpec, base: nn.Module, device: torch.device) -> tuple[nn.Module, object]:
    """A copy of ``base`` (sharing its frozen weights) with the spec's adapter (the adapter object, or None)."""
    model = shared_copy(base)
    adapter = None
    if spec.kind == "adapter":
        adapter = inject(model, config_from_dict(spec.method, spec.values))
        if spec.stage is not None:
            adapter.enter_stage(model, spec.stage)
    elif spec.kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**spec.values))
    return model.to(device), adapter


def _train_step(model: nn.Module, adapter, batch: dict) -> tuple[Callable[[], None], torch.optim.Optimizer | None]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    embeddings = model.get_input_embeddings()

    def step() -> None:
        if not trainable:  # backprop through the frozen model to its inputs: the cost every adapter pays
            inputs = embeddings(batch["input_ids"]).detach().requires_grad_(True)
            loss = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        else:
            if adapter is not None:
                adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
            output = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
            aux = adapter.aux_losses(model).values() if adapter is not None else []
            loss = output.loss + sum(aux, torch.zeros((), device=output.loss.device))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def make_batch(model: nn.Module, batch_size: int, seq_len: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone(),
            "task_ids": torch.arange(batch_size, device=device) % 3}


# -- what is checked and counted before timing -----------------------------------------------------------


class _DropoutOff:
    """Dropout probabilities set to 0 inside the block: two paths see the same inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, nn.Dropout)]

    def __enter__(self) -> None:
        self.saved = [m.p for m in self.modules]
        for m in self.modules:
            m.p = 0.0

    def __exit__(self, *exc) -> None:
        for m, p in zip(self.modules, self.saved, strict=True):
            m.p = p


def _loss_and_grads(model: nn.Module, adapter, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss, adapter gradients and matmul FLOPs of one forward + backward, dropout off."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with _DropoutOff(model), FlopCounterMode(display=False) as counter:
        if adapter is not None:
            adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        grads = torch.autograd.grad(loss, trainable, allow_unused=True) if trainable else []
    return loss.detach(), [g for g in grads if g is not None], counter.get_total_flops()


def set_expert_compute(model: nn.Module, value: str) -> None:
    """Switch every layer that has an ``expert_compute`` attribute (the routed layers) to ``value``."""
    for module in model.modules():
        if hasattr(module, "expert_compute"):
            module.expert_compute = value


def check_and_count(model: nn.Module, adapter, batch: dict) -> dict:
    """FLOPs of the variant's step; for a fast path also its reference's, and the largest relative difference
    of loss and gradients between the two (``check`` passes below ``CHECK_RTOL``)."""
    model.train()
    loss, grads, flops = _loss_and_grads(model, adapter, batch)
    modes = {getattr(m, "expert_compute", None) for m in model.modules()} - {None}
    if not modes:
        return {"flops": flops, "floor_flops": flops}
    set_expert_compute(model, "grouped")
    fast_loss, fast_grads, fast_flops = _loss_and_grads(model, adapter, batch)
    set_expert_compute(model, "dense")
    ref_loss, ref_grads, ref_flops = _loss_and_grads(model, adapter, batch)
    set_expert_compute(model, modes.pop())
    error = max(_relative_error(a, b) for a, b in zip([fast_loss, *fast_grads], [ref_loss, *ref_grads], strict=True))
    return {"flops": flops, "floor_flops": fast_flops, "reference_flops": ref_flops,
            "check_max_relative_error": error, "check": error <= CHECK_RTOL}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return float((a - b).abs().max() / scale)


# -- peak memory, one subprocess per variant ---------------------------------------------------------------

# glibc serves a large allocation from its heap once a freed mapping was larger than its (then raised) mmap
# threshold, and keeps freed heap memory resident: with the default, dynamic threshold the peak RSS of one
# variant moved by 40 MiB between identical runs at Llama-3.2-3B shapes, and counted memory no tensor held.
# Fixed, every buffer from 128 KiB up is mapped and unmapped on its own, and the peak RSS follows the live tensors
# (what torch.cuda.max_memory_allocated counts on a GPU). Other C libraries ignore the variable.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
PROBES_AT_ONCE = 4  # at most, and at most one per core: four probes of a 7B-wide layer stay under 8 GiB


def _process_memory(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` in bytes: ``VmRSS`` (resident now) or ``VmHWM``
    (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class ResidentPeak:
    """The peak resident set of this process since :meth:`start`, above the resident set then (CPU)."""

    def start(self) -> None:
        self.before = _process_memory("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS (proc(5))

    def added(self) -> int:
        return _process_memory("VmHWM") - self.before


@dataclass
class AllocatedPeak:
    """The CUDA caching allocator's peak of live tensors since :meth:`start`, above the live tensors then."""

    device: torch.device

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)

    def added(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.before


def added_peak_bytes(step: Callable[[], None], optimizer: torch.optim.Optimizer | None,
                     meter: ResidentPeak | AllocatedPeak) -> int:
    """The peak memory that two train steps add to what a variant holds before them (its model, gradients
    released): the first step allocates the optimizer's state afresh, the second runs with it. The variant must
    have run a step already, so that one-time costs are not counted: at Llama-2-7B width a first step pages in
    9.5 to 13 MiB of library code on a CPU and keeps 8 MiB more that no tensor holds (measured), which a GPU's
    allocator would not count."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
    meter.start()
    for _ in range(2):
        step()
    return meter.added()


def memory_probe(request: dict) -> dict:
    """Run in a fresh process: build the variant, one warm-up step, then :func:`added_peak_bytes` of its
    resident set."""
    torch.set_num_threads(request["threads"])
    shape = ModelShape(**request["shape"])
    base = build_model(shape, torch.float32, torch.device("cpu"))
    base.train()
    base.requires_grad_(False)
    model, adapter = build_variant(VariantSpec(**request["spec"]), base, torch.device("cpu"))
    del base
    batch = make_batch(model, request["batch_size"], request["seq_len"], torch.device("cpu"))
    step, optimizer = _train_step(model, adapter, batch)
    step()
    meter = ResidentPeak()
    peak = added_peak_bytes(step, optimizer, meter)
    return {"step_peak_bytes": peak, "rss_before_bytes": meter.before}


def held_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """What a variant holds through its steps besides activations: its optimizer's state (AdamW: two moments per
    trainable parameter) and the routing records of its last forward (routing probabilities, logits and selected
    experts, which the balance losses read and the router's backward keeps)."""
    state = [t for values in (optimizer.state.values() if optimizer else []) for t in values.values()
             if torch.is_tensor(t)]
    records = [t for _, module in routed_modules(model) for t in vars(module.routing).values() if torch.is_tensor(t)]
    return {"optimizer_state_bytes": _storage_bytes(state), "routing_bytes": _storage_bytes(records)}


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def probe_in_subprocess(spec: VariantSpec, shape: ModelShape, batch_size: int, seq_len: int, threads: int) -> dict:
    request = {"spec": asdict(spec), "shape": asdict(shape), "batch_size": batch_size, "seq_len": seq_len,
               "threads": threads}
    env = {**os.environ, **PROBE_ENV, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "moelab.modules.bench", json.dumps(request)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- machine load --------------------------------------------------------------------------------------------


class OtherLoad:
    """The cores that other processes kept busy while the block ran: the machine's busy CPU time (``/proc/stat``)
    less this process's own, over the wall time. Unlike the load average, it does not count the benchmark itself,
    so a run on every core is not flagged for its own threads. ``busy``: the others took more than the cores the
    benchmark's ``threads`` left free, plus half a core."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.figures: dict = {}

    def __enter__(self) -> OtherLoad:
        self._start = (_machine_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        machine, own, wall = (now - then for now, then in zip(
            (_machine_busy_seconds(), time.process_time(), time.perf_counter()), self._start, strict=True))
        cores = os.cpu_count() or 1
        other_cores = max(0.0, machine - own) / wall  # NaN where /proc/stat is missing: never flagged busy
        self.figures = {"other_cores": other_cores, "cores": cores, "threads": self.threads,
                        "load_1min": os.getloadavg()[0], "busy": bool(other_cores > cores - self.threads + 0.5)}


def _machine_busy_seconds() -> float:
    """CPU seconds all processes have spent outside idle and I/O wait since boot (NaN without ``/proc/stat``)."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in stat.read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# -- the train-step benchmark ----------------------------------------------------------------------------------


@dataclass
class TrainBench:
    """The settings of one train-step benchmark run."""

    shape: ModelShape
    batch_size: int = 4
    seq_len: int = 128
    rounds: int = 7
    warmup: int = 1
    memory: bool = True  # the per-variant subprocesses (CPU); off in tests


def train_step_benchmark(conf_dir: Path, bench: TrainBench, methods: list[str], device: torch.device,
                         dtype: torch.dtype) -> dict:
    """Every variant of :func:`train_variant_specs` on the same base and batch: checked, counted, timed in
    interleaved rounds, and probed for memory. Returns the per-variant figures."""
    started = time.perf_counter()
    base = build_model(bench.shape, dtype, device)
    base.train()
    base.requires_grad_(False)
    batch = make_batch(base, bench.batch_size, bench.seq_len, device)
    threads = torch.get_num_threads()
    variants, figures, specs = [], {}, train_variant_specs(conf_dir, methods)
    for spec in specs:
        model, adapter = build_variant(spec, base, device)
        figures[spec.name] = {"parameters": count_parameters(model)["trainable"], **check_and_count(model, adapter,
                                                                                                       batch)}
        if figures[spec.name].get("check", True):
            step, optimizer = _train_step(model, adapter, batch)
            variants.append(Variant(spec.name, model, step, optimizer=optimizer))
    checked = time.perf_counter()
    with OtherLoad(threads) as load:
        _timed_rounds(variants, bench.rounds, bench.warmup, device)
    timed_at = time.perf_counter()
    timed = {v.name: v for v in variants}
    reference = timed[REFERENCE]
    for name, values in figures.items():
        values["flop_floor"] = values.pop("floor_flops") / figures[REFERENCE]["flops"]
        values["flops_ratio"] = values["flops"] / figures[REFERENCE]["flops"]
        if name in timed:
            seconds = timed[name].seconds
            values.update(paired_ratios(seconds, reference.seconds), median_s=statistics.median(seconds),
                          tokens_per_s=bench.batch_size * bench.seq_len / statistics.median(seconds))
            values.update(held_state_bytes(timed[name].model, timed[name].optimizer))
            if device.type == "cuda":  # the timed rounds warmed every variant up
                values["peak_memory_bytes"] = added_peak_bytes(timed[name].step, timed[name].optimizer,
                                                               AllocatedPeak(device))
    del variants, timed, reference
    _add_memory(figures, bench, specs, device)
    return {"kind": "train_step", "shape": bench.shape.shape, "layers": base.config.num_hidden_layers,
            "vocab_size": base.config.vocab_size, "batch_size": bench.batch_size, "seq_len": bench.seq_len,
            "rounds": bench.rounds, "reference": REFERENCE,
            "load": load.figures,
            "seconds": {"build_and_check": checked - started, "timed_rounds": timed_at - checked,
                        "memory_probes": time.perf_counter() - timed_at},
            "variants": figures}


def markdown_table(result: dict) -> str:
    """The train-step figures of one shape as a Markdown table (ratios to LoRA r16)."""
    header = (f"{result['shape']}: {result['layers']} decoder layers, vocabulary {result['vocab_size']}, batch "
              f"{result['batch_size']} × {result['seq_len']} tokens, {result['rounds']} rounds"
              + (f" — **other processes kept {result['load']['other_cores']:.1f} of {result['load']['cores']} cores "
                 "busy during the timing: ratios are noisy**" if result["load"]["busy"] else ""))
    lines = [header, "", "| variant | ratio (median) | range | ratio of minimums | FLOP floor | FLOPs executed | "
                         "peak memory | memory floor | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        if "ratio" not in v:
            lines.append(f"| {name} | not timed: fast path differs from its reference by "
                         f"{v.get('check_max_relative_error', float('nan')):.1e} | | | | | | | |")
            continue
        memory, floor = (f"{v[key]:.2f}" if key in v else "—" for key in ("peak_memory_ratio", "peak_memory_floor"))
        lines.append(f"| {name} | {v['ratio']:.2f} | {v['range'][0]:.2f}–{v['range'][1]:.2f} | "
                     f"{v['ratio_of_minimums']:.2f} | {v['flop_floor']:.2f} | {v['flops_ratio']:.2f} | {memory} | "
                     f"{floor} | {v['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def _add_memory(figures: dict, bench: TrainBench, specs: list[VariantSpec], device: torch.device) -> None:
    """``peak_memory_ratio`` of every variant: CUDA peaks measured after the timed rounds, or CPU subprocess probes
    (one torch thread each, one per core at a time: a process's resident set does not depend on its neighbours)."""
    if device.type == "cpu" and bench.memory:
        with ThreadPoolExecutor(max_workers=min(PROBES_AT_ONCE, os.cpu_count() or 1)) as pool:
            probes = pool.map(lambda spec: probe_in_subprocess(spec, bench.shape, bench.batch_size, bench.seq_len,
                                                               threads=1), specs)
            for spec, probe in zip(specs, probes, strict=True):
                figures[spec.name]["memory"] = probe
                if "step_peak_bytes" in probe:
                    figures[spec.name]["peak_memory_bytes"] = probe["step_peak_bytes"]
    peak, frozen = (figures[name].get("peak_memory_bytes") for name in (REFERENCE, BASE))
    for values in figures.values():
        if peak and values.get("peak_memory_bytes") is not None:
            values["peak_memory_ratio"] = values["peak_memory_bytes"] / peak
        if peak and frozen and "optimizer_state_bytes" in values:
            values["peak_memory_floor"] = memory_floor(values, frozen) / peak


def memory_floor(values: dict, frozen_peak: int) -> int:
    """Bytes below which a variant's step peak cannot go: what backpropagating through the frozen model holds
    (``frozen_peak``, the measured peak of the ``base`` row), plus the variant's optimizer state and routing
    records (:func:`held_state_bytes`), which live through the whole step. Everything else an adapter keeps —
    the inputs of its A factors, dropout masks, the rank-r factors of every slot (T·k·r per expert projection),
    gradients during backward — depends on how it is computed and is left out: the floor is a lower bound, the
    gap to the measured peak what an implementation adds to it."""
    return frozen_peak + values["optimizer_state_bytes"] + values["routing_bytes"]


# -- inference latency ----------------------------------------------------------------------------------


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
    prefill = [Variant(name, model, prefill_step(model, prompt)) for name, model in models]
    decode = [Variant(name, model, decode_step(model, prompt, new_tokens, device)) for name, model in models]
    _timed_rounds(prefill, rounds, warmup, device)
    _timed_rounds(decode, rounds, warmup, device)
    return {"kind": "latency", "shape": shape, "batch_size": 1, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill": _report(prefill, "base", prompt_len), "decode_per_token": _report(decode, "base", 1)}


if __name__ == "__main__":  # the memory probe of one variant (probe_in_subprocess)
    print(json.dumps(memory_probe(json.loads(sys.argv[1]))))
