"""What the multi-process and resume tests share: per-method overrides, and callbacks that a run loads from
its config (``+callbacks.<name>._target_=probes.<Class>``) to pause, fail or record itself at a given step.
Subprocesses find this module through PYTHONPATH (``TEST_ENV``)."""

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TEST_ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
    "PYTHONPATH", "")])}
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]

# Per method: dropout off, and balance losses off (the equivalence of split steps holds for the CE alone).
NO_DROPOUT = {
    "lora": ["adapter.lora_dropout=0"],
    "mole": ["adapter.experts.lora_dropout=0"],
    "mixlora": ["adapter.lora_dropout=0"],
    "mor": ["+adapter.host_config.lora_dropout=0"],
    "lora_mixer": ["adapter.experts.lora_dropout=0"],
    "furina": ["adapter.lora_dropout=0"],
}
NO_BALANCE = {
    "lora": [],
    "mole": ["adapter.balance_coef=0"],
    "mixlora": ["adapter.router_aux_loss_coef=0"],
    "mor": ["+adapter.host_config.router_aux_loss_coef=0"],
    "lora_mixer": ["adapter.rsl_alpha=0", "adapter.rsl_lambda=0"],
    "furina": ["adapter.aux_loss_coef=0"],
}
STAGED = ("mole", "lora_mixer")


class PauseAt(L.Callback):
    """Waits at the start of step ``step`` (after the checkpoint of the step before was written), so that a
    test can kill or signal the process at a known point; a stop signal ends the wait."""

    def __init__(self, step: int, seconds: float = 120.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        (Path(trainer.default_root_dir) / f"paused_at_{self.step}").touch()
        guards = [c.guard for c in trainer.callbacks if getattr(c, "guard", None) is not None]
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline and not any(g.received for g in guards):
            time.sleep(0.02)


class FailAt(L.Callback):
    """Makes the forward of process ``rank`` fail at step ``step``: an ``exception``, or a ``non_finite`` loss."""

    def __init__(self, step: int, rank: int, kind: str = "exception") -> None:
        self.step, self.rank, self.kind = step, rank, kind

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            pl_module.model.register_forward_hook(self._fail)

    def _fail(self, module, args, output):
        if self.kind == "exception":
            raise RuntimeError("injected failure")
        output.logits = output.logits * float("nan")
        return output


class StageProbe(L.Callback):
    """Records every adapter tensor of this process when each training stage begins and at the end, into
    ``probe_rank<r>.pt`` in the run folder: ``{"stage <first step>": ..., "end": ...}``."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, torch.Tensor]] = {}

    def _snapshot(self, pl_module) -> dict[str, torch.Tensor]:
        from moelab.adapters import adapter_state_dict

        return {k: v.detach().clone() for k, v in adapter_state_dict(pl_module.model).items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        starts = [start for start, _ in pl_module.adapter.stage_schedule(trainer.max_steps)]
        key = f"stage {trainer.global_step}"
        if trainer.global_step in starts and key not in self.records:
            self.records[key] = self._snapshot(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.records["end"] = self._snapshot(pl_module)
        torch.save(self.records, Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.pt")
