"""How a job's processes come to be: who launches them, which process this is, what FSDP wraps.

Three ways start several processes for one job, and moelab supports each:

* Lightning's own launcher (``trainer=ddp`` with ``devices: N`` in a plain run): process 0 re-runs the
  command for the others, with the run folder fixed;
* ``torchrun --nproc-per-node N scripts/train.py ... trainer=ddp``: every process runs the command, and the
  run folder's time stamp is the launching agent's start time (:func:`launch_time`), the same in each;
* SLURM with ``tasks_per_node: N`` (``hydra/launcher=slurm``): SLURM starts one task per device.

Lightning's launcher re-runs ``sys.argv``, which inside a local multirun (``-m``) would start the whole sweep
again in every process. :func:`check_process_launch` refuses that before anything runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig

DISTRIBUTED_STRATEGIES = ("DDPStrategy", "FSDPStrategy", "ddp", "fsdp")


def process_rank() -> int:
    """This process's global rank, from the variables every launcher sets (0 when there is one process)."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if variable in os.environ and (variable != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
            return int(os.environ[variable])
    return 0


def launched_externally() -> bool:
    """Whether torchrun or SLURM started this job's processes (Lightning then launches none)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def launches_processes(trainer: DictConfig) -> bool:
    """Whether Lightning would start processes of its own for this trainer config."""
    strategy = trainer.get("strategy")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    distributed = any(name.endswith(s) or name.startswith(s) for s in DISTRIBUTED_STRATEGIES)
    devices = trainer.get("devices", 1)
    return distributed and str(devices) not in ("1", "[0]") and not launched_externally()


def check_process_launch(cfg: DictConfig, multirun: bool) -> None:
    if multirun and launches_processes(cfg.trainer):
        raise ValueError(
            "trainer.strategy: a multi-process trainer (trainer=ddp or fsdp with trainer.devices "
            f"{cfg.trainer.get('devices')}) cannot run inside a local multirun (-m): Lightning would start the "
            "whole sweep again in every process. Use hydra/launcher=slurm with hydra.launcher.tasks_per_node="
            "<devices> (one process group per job), or run each job alone: "
            "torchrun --nproc-per-node <devices> scripts/train.py ... trainer=ddp")


def launch_time(pattern: str) -> str:
    """``now`` formatted with ``pattern``; under torchrun the start time of the launching agent instead, which
    every process of the job shares, so that they all pick the same run folder."""
    started = _parent_start_time() if "TORCHELASTIC_RUN_ID" in os.environ else None
    return time.strftime(pattern, time.localtime(started if started is not None else time.time()))


def _parent_start_time() -> float | None:
    """The parent process's start time in seconds since the epoch (Linux ``/proc``), or None."""
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, StopIteration, ValueError):
        return None


def decoder_layer_classes(model) -> set[type]:
    """The classes FSDP should wrap one unit each: the model's own decoder layers, which transformers names
    in ``_no_split_modules`` (``LlamaDecoderLayer``, ``Gemma2DecoderLayer``, ``Qwen2DecoderLayer``, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        raise ValueError(f"trainer.strategy.auto_wrap_policy: {type(model).__name__} names no decoder-layer class "
                         "(_no_split_modules); set the classes to wrap in the FSDP config")
    return classes
