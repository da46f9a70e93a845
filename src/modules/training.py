"""One job, top to bottom: validate → load → inject → score base → fit → save → score → results.json.

``run(cfg)`` is what ``scripts/train.py`` calls for every Hydra job. It validates the adapter and data
configs before any model is loaded, always closes the loggers (a crashed job's W&B run is finished with
a non-zero exit code), and in a multirun writes a failed job's error into its own folder instead of
stopping the sweep.

A job folder is resumable (``resume``: ``auto`` by default): a folder whose ``results.json`` says ``ok`` is
skipped, one that holds ``checkpoints/last.ckpt`` continues from it bit for bit, so that re-running a
pre-empted sweep completes it. A lock file keeps two live runs out of one folder. SIGTERM, SIGINT and
SIGUSR2 save a checkpoint at the next step boundary, write ``results.json`` with status ``interrupted`` and
end the process with status 128 + signal (``checkpointing.py``).

Under several processes (DDP, FSDP; Lightning's launcher, torchrun or SLURM) every process runs this
function; only process 0 takes the lock, scores with lm-eval and writes files. Scoring runs on the trainer's
root device and precision after every process has finished training and the dev pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moelab.adapters import (
    AdapterConfig,
    AdapterConfigError,
    adapter_for,
    adapter_state_dict,
    config_from_dict,
    count_parameters,
    disable_adapters,
    inject,
    merge_and_unload,
)
from moelab.data.datamodule import SCORED_SPLITS
from moelab.data.files import atomic_write_text

from .budget import plan_budget
from .checkpointing import (
    CHECKPOINT_DIR,
    AtomicCheckpointIO,
    RunCheckpoint,
    RunInterrupted,
    RunLock,
    SignalGuard,
    checkpoint_step,
    resume_checkpoint,
)
from .console import Phases, ProgressLine, quiet_libraries, say
from .errors import TrainingDiverged
from .evaluation import (
    base_score_key,
    cached_scores,
    lm_eval_scores,
    mean_score,
    metric_label,
    write_predictions,
)
from .latency import measure_latency
from .launch import check_process_launch, decoder_layer_classes, process_rank
from .loggers import drop_rows_from
from .memory import PeakMemory
from .random_state import preserved_rng
from .validation import user_input, validate

RESULTS_FILE = "results.json"
ERROR_FILE = "error.txt"
VERSIONED_PACKAGES = ("torch", "transformers", "lightning", "hydra-core", "lm_eval", "peft", "wandb", "moelab")


def adapter_config(cfg: DictConfig) -> AdapterConfig:
    """The validated adapter config from ``cfg.adapter`` (``name`` picks the method); errors name the field
    as the command line does (``adapter.r``)."""
    values = OmegaConf.to_container(cfg.adapter, resolve=True)
    try:
        return config_from_dict(values.pop("name"), values)
    except AdapterConfigError as error:
        message = str(error)
        raise AdapterConfigError(message if message.startswith(("adapter", "unknown adapter")) else
                                 f"adapter.{message}") from None


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _group(cfg: DictConfig) -> str:
    if cfg.group:
        return cfg.group
    return Path(HydraConfig.get().sweep.dir).name if _multirun() else cfg.run_name


def configure_environment(cfg: DictConfig, out_dir: Path) -> None:
    """Process settings that must precede the first import of wandb and the first torch op."""
    quiet_libraries(bool(cfg.get("verbose")))
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is not None:
        # As an environment variable, not only the logger argument: wandb's telemetry reads the process
        # settings and would otherwise try to reach the network even for an offline run (assets.md §6).
        os.environ["WANDB_MODE"] = "offline" if wandb_cfg.get("offline", True) else "online"
        os.environ["WANDB_DIR"] = str(out_dir)
    threads = cfg.threads or _parallel_worker_threads()
    if threads:
        torch.set_num_threads(int(threads))


def _parallel_worker_threads() -> int | None:
    """One torch thread per job when a launcher runs jobs side by side (joblib's ``n_jobs``): more would
    oversubscribe the cores (assets.md §7)."""
    if not _multirun():
        return None
    return 1 if HydraConfig.get().launcher.get("n_jobs", 1) != 1 else None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; in a multirun a failure is recorded in the job folder and the sweep goes on."""
    out_dir = Path(cfg.paths.output_dir)
    check_process_launch(cfg, multirun=_multirun())
    finished = _finished_results(cfg, out_dir)
    if finished is not None:
        say(f"{out_dir} holds a finished run (results.json: ok); skipped")
        return finished
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = process_rank() == 0
    with ExitStack() as stack:
        if writer:
            stack.enter_context(RunLock(out_dir))
        guard = stack.enter_context(SignalGuard())
        try:
            return train(cfg, out_dir, guard)
        except RunInterrupted as stop:
            if writer:
                _write_results(out_dir, _status(cfg, "interrupted", error=str(stop), step=stop.step,
                                                 checkpoint=str(stop.checkpoint) if stop.checkpoint else None))
            say(f"{cfg.run_name}: {stop}; `resume=auto` (the default) continues it")
            guard.hand_on(stop.signum)
        except Exception as error:
            status = "diverged" if isinstance(error, TrainingDiverged) else "failed"
            if writer:
                (out_dir / ERROR_FILE).write_text(traceback.format_exc())
                _write_results(out_dir, _status(cfg, status, error=f"{type(error).__name__}: {error}"))
            if not _multirun():
                raise
            say(f"job {cfg.run_name} {status} ({type(error).__name__}: {error}); see {out_dir / ERROR_FILE}")
            return _status(cfg, status, error=f"{type(error).__name__}: {error}")


def _status(cfg: DictConfig, status: str, **details: Any) -> dict[str, Any]:
    return {"status": status, "run_name": cfg.run_name, "method": cfg.adapter.get("name"), "seed": cfg.seed,
            **details, "config": OmegaConf.to_container(cfg, resolve=False)}


def _write_results(out_dir: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2, default=str))


def _finished_results(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """The stored results of a finished run in ``out_dir`` (``resume=auto``); ``resume=never`` refuses a
    folder that holds a run, so that nothing is overwritten."""
    path = out_dir / RESULTS_FILE
    if cfg.resume == "never":
        if path.exists() or (out_dir / CHECKPOINT_DIR).exists():
            raise FileExistsError(f"{out_dir} already holds a run; resume=never starts afresh only in a new folder "
                                  "(another hydra.run.dir or hydra.sweep.dir), or use resume=auto to continue it")
        return None
    if cfg.resume != "auto" or not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        return None
    return stored if stored.get("status") == "ok" else None


def train(cfg: DictConfig, out_dir: Path, guard: SignalGuard | None = None) -> dict[str, Any]:
    import lightning as L

    started = time.perf_counter()
    phases = Phases()
    # 1. Everything that can be wrong with the configs or the data fails here, before a model is loaded.
    with user_input():
        validate(cfg)
        configure_environment(cfg, out_dir)
        L.seed_everything(cfg.seed, workers=True)
        method_config = adapter_config(cfg)
        adapter_for(method_config)(method_config).stage_schedule(cfg.trainer.max_steps)  # stage lengths
        budget = plan_budget(cfg.get("budget"), method_config)
        checkpoint = resume_checkpoint(cfg.resume, out_dir)
        datamodule = instantiate(cfg.data)
        split_report = datamodule.prepare_examples(out_dir / "data")
        module_factory = instantiate(cfg.module)

    # 2. The base model and the adapter.
    phases.begin(f"loading {cfg.model.name}")
    base = instantiate(cfg.model)
    with user_input():  # a protocol's answer labels the tokenizer cannot score as configured (data.label_scoring)
        datamodule.set_tokenizer(base.tokenizer)
    budget_report = None
    if budget is not None:  # sized on a weightless copy of the base model, before the real injection
        method_config, budget_report = budget.fit(base.model)
        say(f"budget: {budget_report['rule']}; {budget_report['sizing']}")
    adapter = inject(base.model, method_config)
    parameters = count_parameters(base.model)
    say(f"{adapter.label} on {base.name}: {parameters['trainable']:,} trainable parameters "
        f"({100 * parameters['trainable'] / parameters['base']:.3f}% of the base model)")
    timings = {"load_s": time.perf_counter() - started}

    with ExitStack() as stack:
        loggers = _loggers(cfg, stack, out_dir, checkpoint_step(checkpoint) if checkpoint else None)
        module = module_factory(model=base.model, adapter=adapter, num_tasks=len(datamodule.task_names))
        trainer = _trainer(cfg, base.model, loggers, guard, out_dir)
        hyperparameters = {**OmegaConf.to_container(cfg, resolve=True), "parameters": parameters,
                           "method_label": adapter.label, "budget": budget_report}
        for logger in loggers:
            logger.log_hyperparams(hyperparameters)
        scoring = Scoring(trainer, cfg)

        # 3. Base-model scores, with the adapter switched off (cached across runs), on each scored split.
        eval_tasks = {split: datamodule.lm_eval_tasks(split) for split in cfg.eval.splits} if cfg.eval.enabled else {}
        base_scored: dict[str, tuple[dict, dict, bool]] = {}
        if eval_tasks and cfg.eval.base and trainer.is_global_zero:
            tick = time.perf_counter()
            for split, tasks in eval_tasks.items():
                phases.begin(f"scoring the base model on {split} (lm-eval, {len(tasks)} tasks)")
                key = base_score_key(base.identity, tasks, cfg.eval.limit, cfg.eval.num_fewshot,
                                     max_length=cfg.eval.max_length, batch_size=cfg.eval.batch_size)
                with disable_adapters(base.model):
                    base_scored[split] = cached_scores(Path(cfg.paths.cache_dir) / "base_scores", key,
                                                       lambda tasks=tasks: scoring.scores(base.model, base.tokenizer,
                                                                                          tasks))
            timings["base_eval_s"] = time.perf_counter() - tick

        # 4. Fit (from the checkpoint when resuming), then one pass over the dev examples.
        tick = time.perf_counter()
        phases.begin(f"training: {cfg.trainer.max_steps} steps" if cfg.trainer.max_steps > 0 else "training")
        memory = PeakMemory(trainer.strategy.root_device)
        if checkpoint is not None:
            say(f"resuming from {checkpoint}")
        # weights_only=False: the checkpoint holds RNG states (NumPy arrays); it is this run folder's own file
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None,
                    weights_only=False)
        timings["train_s"] = time.perf_counter() - tick
        peak_memory = memory.report()
        checkpointer = next(c for c in trainer.callbacks if isinstance(c, RunCheckpoint))
        timings.update(checkpoint_s=checkpointer.seconds, checkpoints=checkpointer.saves)
        phases.begin("dev pass (validation loss, routing statistics)")
        validation = trainer.validate(module, datamodule=datamodule, verbose=False)
        with full_parameters(trainer):  # every process has finished; process 0 saves and scores
            if not trainer.is_global_zero:
                return {}
            # 5. Save the adapter and the routing statistics before anything is merged away.
            phases.begin(f"saving the adapter to {out_dir / 'adapter'}")
            save_adapter(out_dir / "adapter", base, adapter, cfg)
            torch.save({"tasks": datamodule.task_names, "method": adapter.label,
                        "train": module.routing["train"].state_dict(),
                        "dev": module.routing["dev"].state_dict()}, out_dir / "routing.pt")
            # 6. Score the trained model: merged into the base weights when the method allows it.
            tuned: dict[str, tuple[dict, dict]] = {}
            scored_as, latency = "none", None
            if eval_tasks:
                tick = time.perf_counter()
                model = base.model
                scored_as = "unmerged"
                if adapter.mergeable and cfg.eval.merge:
                    model, scored_as = merge_and_unload(base.model, safe_merge=True), "merged"
                for split, tasks in eval_tasks.items():
                    phases.begin(f"scoring the trained model on {split} ({scored_as}, lm-eval, {len(tasks)} tasks)")
                    tuned[split] = scoring.scores(model, base.tokenizer, tasks)
                timings["eval_s"] = time.perf_counter() - tick
                if cfg.eval.latency is not None:
                    phases.begin(f"inference latency ({scored_as})")
                    latency = {**scoring.latency(model, cfg.eval.latency), "model": scored_as}
            # the per-example records of the reported split, which paired tests between methods read
            write_predictions(out_dir, {"base": base_scored.get("test", ({}, {}, False))[1],
                                        "tuned": tuned.get("test", ({}, {}))[1]})
        timings["total_s"] = time.perf_counter() - started

        headline = {spec.name: spec.headline(cfg.eval.metric) for spec in datamodule.specs}
        evaluation = {split: split_scores(tuned.get(split, ({}, {}))[0], base_scored.get(split, ({}, {}, False)),
                                          headline) for split in SCORED_SPLITS}
        results = _results(cfg, adapter, base, parameters, split_report, evaluation, scored_as, validation, module,
                           timings, budget_report, headline)
        results["scoring"] = scoring.report()
        results["memory"] = peak_memory
        results["latency"] = latency
        results["resumed_from"] = str(checkpoint) if checkpoint else None
        _write_results(out_dir, results)
        for logger in loggers:
            logger.log_metrics(_flat_scores(results), step=trainer.global_step)
            logger.save()  # the trainer has finalised its loggers already; flush these rows too
        _print_summary(results, out_dir)
    return results


def _trainer(cfg: DictConfig, model, loggers: list, guard: SignalGuard | None, out_dir: Path):
    """The Lightning trainer of ``cfg.trainer``, with moelab's checkpointing and a strategy fitted to the model."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += [RunCheckpoint(out_dir / CHECKPOINT_DIR, cfg.checkpoint_every, guard),
                  ProgressLine(cfg.progress_every)]
    overrides: dict[str, Any] = {"logger": loggers or False, "callbacks": callbacks,
                                 "plugins": [AtomicCheckpointIO()]}
    strategy = fitted_strategy(cfg.trainer.get("strategy"), model)
    if strategy is not None:
        overrides["strategy"] = strategy
    return instantiate(cfg.trainer, **overrides)


def fitted_strategy(strategy: Any, model) -> Any | None:
    """FSDP without a configured ``auto_wrap_policy`` wraps the model's own decoder-layer class (Llama, Gemma,
    Qwen alike); None leaves the configured strategy as it is."""
    if isinstance(strategy, DictConfig) and strategy.get("_target_", "").endswith("FSDPStrategy") \
            and strategy.get("auto_wrap_policy") is None:
        return instantiate(strategy, auto_wrap_policy=decoder_layer_classes(model))
    return None


def full_parameters(trainer) -> contextlib.AbstractContextManager:
    """Every process enters; inside, process 0 sees whole parameters: FSDP gathers its shards there (what
    saving, merging and scoring read), every other strategy already has them. Verified on a GPU only
    (``scripts/gpu_check.sh``): Lightning's FSDP refuses a CPU accelerator."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True)


class Scoring:
    """lm-eval on the trainer's root device, in the run's precision (autocast for ``*-mixed``), whatever
    device the parameters were left on: Lightning's teardown moves the module back to the CPU after fit and
    validate, and scoring a 7B model there would take hours."""

    AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

    def __init__(self, trainer, cfg: DictConfig) -> None:
        self.device = trainer.strategy.root_device
        self.precision = str(trainer.precision)
        self.cfg = cfg
        self.dtype: str | None = None

    def scores(self, model, tokenizer, tasks: list[dict]) -> tuple[dict[str, dict[str, float]], dict[str, list]]:
        """Scores and per-example predictions (``lm_eval_scores`` with ``log_samples``)."""
        model.to(self.device)
        self.dtype = str(next(model.parameters()).dtype)
        evaluation = self.cfg.eval
        with self.run_precision():
            return lm_eval_scores(model, tokenizer, tasks, limit=evaluation.limit, batch_size=evaluation.batch_size,
                                  num_fewshot=evaluation.num_fewshot, bootstrap_iters=evaluation.bootstrap_iters,
                                  max_length=evaluation.max_length, device=self.device, log_samples=True)

    def latency(self, model, settings: DictConfig) -> dict[str, Any]:
        """Prefill and per-token decode time of ``model`` as scored (:func:`measure_latency`), in this precision."""
        with self.run_precision():
            return {**measure_latency(model.to(self.device), self.device, **settings), "precision": self.precision}

    @contextlib.contextmanager
    def run_precision(self) -> Iterator[None]:
        """The run's autocast (for ``*-mixed``), with the random streams left as they were."""
        autocast = self.AUTOCAST.get(self.precision)
        with preserved_rng(), torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            yield

    def report(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": self.precision, "parameter_dtype": self.dtype}


def _loggers(cfg: DictConfig, stack: ExitStack, out_dir: Path, resume_step: int | None) -> list:
    """Instantiate the configured loggers; the stack finishes the W&B run however the job ends. A resumed
    run continues its folder's logs: the CSV rows the interrupted run wrote after its checkpoint are dropped,
    and the W&B run keeps one id per folder (``resume="allow"``), so that both halves sync as one run."""
    loggers = []
    if resume_step is not None:
        drop_rows_from(out_dir / "csv" / "metrics.csv", resume_step)
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        overrides = {}
        if name == "wandb":
            overrides = {"group": _group(cfg), "id": hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16],
                         "resume": "allow"}
        logger = instantiate(logger_cfg, **overrides)
        loggers.append(logger)
        if name == "wandb":
            stack.push(_finish_wandb)
    return loggers


def _finish_wandb(exc_type, exc, tb) -> None:
    """Exit callback: close the W&B run, marked failed when the job raised."""
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=0 if exc_type is None else 1)


def save_adapter(folder: Path, base, adapter, cfg: DictConfig) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(base.model).items()}
    save_file(state, str(folder / "adapter_model.safetensors"))
    meta = {"method": adapter.name, "fidelity": adapter.fidelity, "config": adapter.config.to_dict(),
            "base_model": base.identity, "model": OmegaConf.to_container(cfg.model, resolve=True)}
    (folder / "adapter_config.json").write_text(json.dumps(meta, indent=2))


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def split_scores(scores: dict, base: tuple[dict, dict, bool], headline: dict[str, str]) -> dict[str, Any]:
    """The scores of one split, tuned and base, with their means over the tasks' headline metrics."""
    base_scores, _, base_cached = base
    return {"scores": scores, "mean": mean_score(scores, headline), "base_scores": base_scores,
            "base_mean": mean_score(base_scores, headline), "base_scores_cached": base_cached}


def _results(cfg, adapter, base, parameters, split_report, evaluation, scored_as, validation, module, timings,
             budget, headline) -> dict[str, Any]:
    """``metric`` is ``eval.metric`` as configured (``auto``: each task's convention); ``metrics`` the headline
    metric each task was given, which ``mean`` and ``base_mean`` average. ``scores``, ``mean`` and the base
    entries are the test split's (the tables'); ``dev`` holds the same entries for dev when it was scored."""
    throughput = module.throughput
    return {
        "status": "ok",
        "run_name": cfg.run_name,
        "method": adapter.name,
        "fidelity": adapter.fidelity,
        "label": adapter.label,
        "mergeable": adapter.mergeable,
        "placement": adapter.placement,
        "seed": cfg.seed,
        "model": base.name,
        "model_identity": base.identity,
        "parameters": {**parameters, "trainable_share": parameters["trainable"] / parameters["base"]},
        "budget": budget,
        "data": {"tasks": split_report},
        "metric": cfg.eval.metric,
        "metrics": headline,
        "scored_splits": list(cfg.eval.splits) if cfg.eval.enabled else [],
        **evaluation["test"],
        "dev": evaluation["dev"],
        "scored_as": scored_as,
        "validation": validation[0] if validation else {},
        "routing": {"train": module.routing["train"].summary(per_layer=True),
                    "dev": module.routing["dev"].summary(per_layer=True)},
        # tokens of every process; seconds of process 0
        "timings": {**timings, "train_steps": throughput["steps"], "train_tokens": throughput["tokens"],
                    "tokens_per_s": throughput["tokens"] / max(throughput["seconds"], 1e-9),
                    "torch_threads": torch.get_num_threads()},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": _git_commit(),
        "versions": _versions(),
    }


def _flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """Logger keys: ``eval/...`` and ``eval_base/...`` for test (the tables' split), ``dev/...`` for dev."""
    flat = {}
    label = metric_label(results["metrics"])
    for prefix, block in (("eval", results), ("dev", results["dev"])):
        for suffix, scores in (("", block["scores"]), ("_base", block["base_scores"])):
            for task, metrics in scores.items():
                flat.update({f"{prefix}{suffix}/{task}/{name}": value for name, value in metrics.items()})
        for key in ("mean", "base_mean"):
            if block[key] is not None:
                flat[f"{prefix}/{key}_{label}"] = block[key]
    return flat


def _print_summary(results: dict[str, Any], out_dir: Path) -> None:
    lines = [f"{results['label']} · {results['parameters']['trainable']:,} trainable parameters · "
             f"{results['timings']['tokens_per_s']:.0f} train tokens/s"]
    label = metric_label(results["metrics"])
    for split, block in (("dev", results["dev"]), ("test", results)):
        if split not in results["scored_splits"]:
            continue
        lines.append(f"  {split}")
        for task in block["scores"] or block["base_scores"]:
            metric = results["metrics"][task]
            base = block["base_scores"].get(task, {}).get(metric)
            tuned = block["scores"].get(task, {}).get(metric)
            lines.append(f"    {task:<20} base {metric} {_fmt(base)}   tuned ({results['scored_as']}) {_fmt(tuned)}")
        lines.append(f"    {'mean':<20} base {label:<4} {_fmt(block['base_mean'])}   tuned {_fmt(block['mean'])}")
    lines.append(f"results: {out_dir / RESULTS_FILE}")
    say("\n".join(lines))


def _fmt(value: float | None) -> str:
    return "  n/a " if value is None else f"{100 * value:6.2f}"
