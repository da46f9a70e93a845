"""What a run tells the person who started it.

* ``[moelab]`` lines through the ``moelab`` logger: on the console and, under Hydra, in the job's
  ``train.log`` too (``conf/hydra/default.yaml`` formats the console plainly and the file with times).
* A header before each phase (base scoring, training, dev pass, scoring, saving) with the time since
  the job started, and a plain progress line every ``progress_every`` steps (or minute) while training,
  which reads the same in a terminal and in a SLURM log file.
* Third-party chatter (tips, deprecation warnings, per-task INFO lines, progress bars) is silenced unless
  ``verbose=true``.
"""

from __future__ import annotations

import logging
import time
import warnings

import lightning as L

from .quiet import quiet_environment

log = logging.getLogger("moelab")
NOISY = ("lightning.pytorch", "lightning.fabric", "lm_eval", "datasets", "transformers", "wandb", "urllib3",
         "httpx", "filelock", "evaluate")


def say(message: str) -> None:
    """``[moelab]`` lines (indented lines as they are): logged in a Hydra job, whose logging writes them to the
    console and train.log; printed when moelab runs as a library."""
    from hydra.core.hydra_config import HydraConfig

    for line in message.splitlines():
        text = line if line.startswith(" ") else f"[moelab] {line}"
        if HydraConfig.initialized():
            log.info(text)
        else:
            print(text, flush=True)


def elapsed(since: float) -> str:
    seconds = int(time.perf_counter() - since)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Phases:
    """Headers before each phase of a job, with the time since it started."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def begin(self, phase: str) -> None:
        say(f"── {phase} · {elapsed(self.started)}")


def quiet_libraries(verbose: bool) -> None:
    """Leave moelab's own lines and the libraries' warnings worth acting on; everything when ``verbose``."""
    log.setLevel(logging.INFO)
    quiet_environment(verbose)
    if verbose:
        return
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="moelab")


class ProgressLine(L.Callback):
    """``step 20/50 · loss 2.345 · 930 tokens/s · 0:01:12`` every ``every_n_steps`` steps or every minute."""

    def __init__(self, every_n_steps: int, every_seconds: float = 60.0) -> None:
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self.started = self.last = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, now = trainer.global_step, time.perf_counter()
        due = step % self.every_n_steps == 0 or now - self.last >= self.every_seconds or step == trainer.max_steps
        if not trainer.is_global_zero or not due or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.last = now
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps if trainer.max_steps > 0 else '?'}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "train/tokens_per_s" in metrics:
            parts.append(f"{float(metrics['train/tokens_per_s']):.0f} tokens/s")
        say(" · ".join([*parts, elapsed(self.started)]))
