"""Runs that survive pre-emption: periodic atomic checkpoints, resume, signals and a lock on the run folder.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file beside its target and renames it into
  place, so that a kill at any moment leaves the previous ``last.ckpt`` intact.
* :class:`RunCheckpoint` saves ``checkpoints/last.ckpt`` every ``every_n_steps`` optimiser steps, at the
  end of training, and when a signal asks the run to stop. The checkpoint holds what a bit-for-bit resume
  needs (adapter tensors, optimiser, scheduler, loops, stage, sampler position, every process's RNG states,
  routing sums and throughput counters; see ``AdapterLM.on_save_checkpoint`` and the data module).
* :class:`SignalGuard` turns SIGTERM, SIGINT and SIGUSR2 (what SLURM and submitit send before a time limit
  or a pre-emption) into :class:`RunInterrupted`: during training at the next optimiser-step boundary, after
  the checkpoint is written (on every process at once), and at once outside training. The handler that was
  installed before (submitit's requeue, for instance) gets the signal after moelab has saved.
* :func:`resume_checkpoint` reads ``resume`` (``auto``, ``never`` or a path); :class:`RunLock` keeps two live
  runs out of one folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .distributed import any_process

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
LOCK_FILE = "run.lock"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks (temporary file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(checkpoint, temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)


class RunInterrupted(Exception):  # noqa: N818 - a stop on request, not an error
    """A signal stopped the run; ``checkpoint`` is where it can continue from (None before training)."""

    def __init__(self, signum: int, step: int | None, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"at step {step}, checkpoint {checkpoint}" if checkpoint else "before training saved anything"
        super().__init__(f"interrupted by {signal.Signals(signum).name} {where}")


class SignalGuard:
    """Catches the stop signals for the duration of a run (``with SignalGuard() as guard``).

    While ``deferred`` (training) a signal is only recorded, and :class:`RunCheckpoint` acts on it at the next
    step boundary; otherwise it raises :class:`RunInterrupted` where the program is.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferred = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        for signum in SIGNALS:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def reinstall(self) -> None:
        """Take the signals back from whoever installed handlers since (Lightning does, when fit starts)."""
        for signum in SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if not self.deferred:
            raise RunInterrupted(signum, None, None)

    def hand_on(self, signum: int) -> None:
        """After moelab has saved: give the signal to the handler installed before the run (submitit requeues
        the job there), then end the process with the conventional status 128 + signal."""
        previous = self.previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:  # Python's own raises Ctrl-C
            previous(signum, None)
        raise SystemExit(128 + signum)


class RunCheckpoint(L.Callback):
    """``last.ckpt`` every ``every_n_steps`` optimiser steps, at the end of training and on a stop signal."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, guard: SignalGuard | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"checkpoint_every ({every_n_steps}) must be >= 1")
        self.path = Path(dirpath) / LAST
        self.every_n_steps, self.guard = every_n_steps, guard
        self.saved_step: int | None = None
        self.saves, self.seconds = 0, 0.0  # what checkpointing cost this process (results.json timings)

    def save(self, trainer: L.Trainer) -> None:
        """On every process (the state of each goes in); rank 0 writes."""
        started = time.perf_counter()
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step
        self.saves += 1
        self.seconds += time.perf_counter() - started

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.guard is not None:
            self.guard.reinstall()
            self.guard.deferred = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the state between two micro-batches is not a step boundary
        step = trainer.global_step
        stop = self.guard is not None and any_process(self.guard.received is not None, pl_module.device)
        if stop or (step % self.every_n_steps == 0 and step != self.saved_step):
            self.save(trainer)
        if stop:
            raise RunInterrupted(self.guard.received or signal.SIGTERM, step, self.path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.saved_step:
            self.save(trainer)
        if self.guard is not None:
            self.guard.deferred = False


def resume_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint a run continues from: ``auto`` — the folder's own ``last.ckpt`` if there is one;
    ``never`` — none; anything else — that file, which must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        last = out_dir / CHECKPOINT_DIR / LAST
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume ({resume!r}) must be 'auto', 'never' or an existing checkpoint file")
    return path


def checkpoint_step(path: Path) -> int:
    """The optimiser step a checkpoint was written at."""
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


class RunLock:
    """A lock file in the run folder holding the owner's pid and host. A second live run refuses the folder;
    a lock left by a dead process (same host, pid gone) is taken over, as after a kill."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise RuntimeError(f"{self.path.parent} is in use by a live run (pid {holder['pid']} on "
                                       f"{holder['host']}): give this run its own folder (hydra.run.dir=...), or "
                                       f"stop the other one") from None
                self.path.unlink(missing_ok=True)  # a dead run's lock
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.owner, handle)
            return self

    def __exit__(self, *exc_info) -> None:
        if self._holder() == self.owner:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: a writer died mid-write

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") != self.owner["host"]:
            return True  # another machine's run: cannot tell, so assume it lives
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
