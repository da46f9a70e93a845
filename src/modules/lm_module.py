"""The LightningModule: a causal LM with an adapter, trained on ``CE + Σ aux losses``.

It never names a method. Everything method-specific comes through the :class:`~moelab.adapters.Adapter`
contract: which parameters train, training stages, auxiliary losses, routing records. What it adds:

* the loss ``CE + Σ_name aux_name`` (each aux loss already weighted by its method). CE is the summed token
  loss divided by the supervised targets of the whole optimiser step, over all processes and accumulated
  micro-batches (``batch["step_targets"]``, from the data module's sampler), so that 2 processes × batch b,
  1 × 2b and 1 × b with 2 accumulated micro-batches take the same step. Balance losses use batch statistics
  of this process's micro-batch, or of all processes with ``aux_loss_scope: global``;
* a divergence guard: a non-finite loss or gradient norm, or adapter weights that are not finite or exceed
  ``divergence_factor`` × the largest base weight, stop the run at that step (:class:`TrainingDiverged`):
  a loss can stay finite while the weights run away (LLaMA's RMSNorm rescales them), so the weights are
  watched too;
* a failure on any process — a non-finite loss or an exception in the forward — stops every process at the
  same step with the same error, instead of leaving the others waiting in the gradient all-reduce;
* training stages that never change ``requires_grad`` (DDP fixes that set): the parameters a stage freezes
  lose their gradients before each optimiser step (``Adapter.frozen_parameters``);
* routing statistics from every routed module's last forward, summed per site × expert × task (so they
  reduce exactly across batches and DDP ranks), logged every ``routing_log_every`` steps as a bounded set
  of W&B keys (per-site detail behind ``routing_per_layer``); the cumulative training tensor (of the last
  training stage, for methods trained in stages) and the dev tensor are kept for results.json and the
  activation maps;
* tokens/s, step time, learning rate; adapter-only checkpoints (the frozen base is never written) that also
  hold, per process, the RNG states, routing sums and throughput counters, so that a resumed run continues
  bit for bit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.adapters import Adapter, adapter_state_dict, load_adapter_state_dict, routed_modules
from moelab.adapters.routing import RoutingStatistics, global_token_statistics

from .console import say
from .distributed import all_reduce, any_process, gather_objects, num_processes, rank
from .errors import TrainingDiverged
from .random_state import rng_states, set_rng_states


class AdapterLM(L.LightningModule):
    def __init__(self, model: nn.Module, adapter: Adapter, optimizer: Callable, scheduler: Callable | None = None,
                 num_tasks: int = 1, routing_log_every: int = 50, routing_per_layer: bool = False,
                 routing_tokens: str = "attention", activation_checkpointing: bool = False,
                 divergence_factor: float = 1000.0) -> None:
        super().__init__()
        if routing_tokens not in ("attention", "answer"):
            raise ValueError(f"module.routing_tokens ({routing_tokens!r}) must be 'attention' or 'answer'")
        self.model = model
        self.adapter = adapter
        if activation_checkpointing:  # recomputes decoder layers in backward; routing is recorded once per step
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.routing_log_every, self.routing_per_layer = routing_log_every, routing_per_layer
        self.routing_tokens = routing_tokens
        self.routing = {"train": RoutingStatistics(num_tasks), "window": RoutingStatistics(num_tasks),
                        "dev": RoutingStatistics(num_tasks)}
        self.stage: str | None = None
        self.throughput = {"tokens": 0, "seconds": 0.0, "steps": 0}
        self._step_started = 0.0
        self._step_tokens = 0
        self._restored_rng: dict[str, Any] | None = None
        self.divergence_factor = divergence_factor
        self._weight_limit = float("inf")
        self.strict_loading = False  # checkpoints hold adapter tensors only; on_load_checkpoint checks them

    # -- forward ------------------------------------------------------------------------------------------

    def _token_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Tokens that count for balance losses and routing statistics: all real tokens, or answers only."""
        if self.routing_tokens == "answer":
            return batch["labels"] != -100
        return batch["attention_mask"].bool()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """The token cross-entropy of the batch (mean over supervised tokens, as transformers computes it)."""
        total, targets = self.cross_entropy_sum(batch)
        return total / targets.clamp_min(1)

    def cross_entropy_sum(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(summed token cross-entropy, number of supervised targets)`` of the batch.

        The LM head runs only at positions whose next token is a target in some row (``logits_to_keep``):
        with the loss on answers only, most positions are prompt, and the head (49k–128k outputs per token)
        and its [batch, seq, vocab] logits are a large share of a small model's step and memory."""
        self.adapter.set_context(self.model, batch["task_ids"], self._token_mask(batch), batch["prompt_mask"])
        targets = batch["labels"][:, 1:]
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            logits_to_keep=keep).logits
        kept = targets[:, keep].flatten()
        total = F.cross_entropy(logits.flatten(0, 1).float(), kept, ignore_index=-100, reduction="sum")
        return total, (kept != -100).sum()

    def _record_routing(self, batch: dict[str, Tensor], *stats: RoutingStatistics) -> None:
        records = [(name, module.routing) for name, module in routed_modules(self.model)]
        if not records:
            return
        mask = self._token_mask(batch).reshape(-1)
        tasks = batch["task_ids"].repeat_interleave(batch["input_ids"].shape[1])
        for stat in stats:
            stat.update(records, mask, tasks)

    # -- training -----------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._enter_scheduled_stage()
        self._step_started = time.perf_counter()
        self._step_tokens = int(batch["attention_mask"].sum())
        # counted here, not at the batch's end: a checkpoint written at the end of this step (callbacks run
        # before the module's hooks) must include its tokens
        self.throughput["tokens"] += self._step_tokens

    def _enter_scheduled_stage(self) -> None:
        schedule = self.adapter.stage_schedule(self.trainer.max_steps)
        due = [stage for start, stage in schedule if start <= self.global_step]
        if due and due[-1] != self.stage:
            self.stage = due[-1]
            self.adapter.enter_stage(self.model, self.stage)
            # Training statistics describe the current stage only: a stage that forces the routing (hard
            # routing by task id) would otherwise swamp the routing the next stage learns.
            for stats in (self.routing["train"], self.routing["window"]):
                stats.reset()
            if self.trainer.is_global_zero:
                say(f"step {self.global_step}: adapter stage {self.stage!r}")

    def _aux_statistics(self) -> contextlib.AbstractContextManager:
        """Balance losses over this process's micro-batch, or over all processes (``aux_loss_scope``)."""
        if self.adapter.config.aux_loss_scope == "global":
            return global_token_statistics(all_reduce, num_processes())
        return contextlib.nullcontext()

    def _training_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(loss to differentiate, the micro-batch's mean token CE, aux losses)``. The differentiated CE is divided by
        the step's supervised targets and multiplied by the processes × micro-batches that DDP and Lightning
        average over, which makes it the step's token mean however the step is split."""
        with self._aux_statistics():
            total, targets = self.cross_entropy_sum(batch)
            aux = self.adapter.aux_losses(self.model)
        step_targets = batch.get("step_targets")
        if step_targets is None:  # a loader that is not moelab's: the micro-batch's own mean
            scaled = total / targets.clamp_min(1)
        else:
            scaled = total * (num_processes() * self.trainer.accumulate_grad_batches) / step_targets.clamp_min(1)
        aux_total = sum(aux.values(), torch.zeros((), device=total.device))
        return scaled + aux_total, total.detach() / targets.clamp_min(1), aux

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        failure = None
        try:
            loss, cross_entropy, aux = self._training_loss(batch)
            if not torch.isfinite(loss):
                parts = {"cross-entropy": cross_entropy.item(), **{k: v.item() for k, v in aux.items()}}
                failure = TrainingDiverged(f"non-finite training loss ({loss.item()}) at step {self.global_step}: "
                                             f"{parts}")
        except Exception as error:  # noqa: BLE001 - every process must learn of it before the backward pass
            failure = error
        self._stop_if_any_process_failed(failure)
        batch_size = batch["input_ids"].shape[0]
        reported = cross_entropy + sum(aux.values(), torch.zeros((), device=loss.device)).detach()
        self.log("train/loss", reported, prog_bar=True, batch_size=batch_size)
        self.log("train/ce", cross_entropy, batch_size=batch_size)
        for name, value in aux.items():
            self.log(f"train/aux/{name}", value, batch_size=batch_size)
        self._record_routing(batch, self.routing["train"], self.routing["window"])
        if self.routing_log_every and (self.global_step + 1) % self.routing_log_every == 0:
            self._log_routing_window()
        return loss

    def _stop_if_any_process_failed(self, failure: BaseException | None) -> None:
        """Raise on every process when the step failed on any: one process alone would leave the others waiting
        in the gradient all-reduce forever. The error names the first failing process."""
        if num_processes() == 1:
            if failure is not None:
                raise failure
            return
        if not any_process(failure is not None, self.device):
            return
        reports = gather_objects(None if failure is None else (type(failure).__name__, str(failure)))
        first, (kind, message) = next((r, report) for r, report in enumerate(reports) if report is not None)
        error_class = TrainingDiverged if kind == TrainingDiverged.__name__ else RuntimeError
        raise error_class(f"process {first} of {len(reports)} failed at step {self.global_step}: {kind}: {message}") \
            from failure

    def on_before_optimizer_step(self, optimizer) -> None:
        for parameter in self.adapter.frozen_parameters(self.model):
            parameter.grad = None  # AdamW skips a parameter without a gradient: no moment, no weight decay
        if str(self.trainer.precision) == "16-mixed":
            return  # fp16's loss scaler skips steps with inf gradients by design
        norms = [p.grad.detach().norm() for p in self.adapter.trainable_parameters(self.model) if p.grad is not None]
        if norms and not torch.isfinite(torch.stack(norms).norm()):
            raise TrainingDiverged(f"non-finite gradient norm at step {self.global_step}")

    def _check_weights(self) -> None:
        """After an optimiser step: every adapter weight finite and within the limit (identical on every
        process, so every process decides alike)."""
        largest = max(p.detach().abs().max() for p in self.adapter.trainable_parameters(self.model))
        if not torch.isfinite(largest) or largest > self._weight_limit:
            raise TrainingDiverged(
                f"adapter weights reached {largest.item():.3g} after optimiser step {self.global_step + 1}, beyond "
                f"module.divergence_factor ({self.divergence_factor:g}) × the largest base weight: lower the "
                "learning rate")

    def optimizer_step(self, *args, **kwargs) -> None:
        try:
            super().optimizer_step(*args, **kwargs)
        except RuntimeError as error:  # Adam's step size lr / (1 − β₁ᵗ) beyond the float range
            if "overflow" not in str(error):
                raise
            raise TrainingDiverged(f"optimiser step {self.global_step + 1} overflowed ({error}): lower the "
                                   "learning rate") from error
        self._check_weights()  # before any callback could checkpoint the weights of this step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_started
        self.throughput["seconds"] += seconds
        self.log("train/tokens_per_s", self._step_tokens / max(seconds, 1e-9))
        self.log("train/step_time_s", seconds)
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/lr", optimizer.param_groups[0]["lr"])

    def _reduced(self, stats: RoutingStatistics) -> RoutingStatistics:
        """A copy whose sums are added up over all processes (identity on one device)."""
        copy = RoutingStatistics(stats.num_tasks)
        copy.merge(stats)
        if self.trainer.world_size > 1:
            copy.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        return copy

    def _log_routing_window(self) -> None:
        window = self.routing["window"]
        if window.empty:
            return
        summary = self._reduced(window).summary(per_layer=self.routing_per_layer)
        self.log_dict({f"train/{k}": v for k, v in summary.items()}, rank_zero_only=True)
        window.reset()

    def on_train_start(self) -> None:
        adapter_ids = {id(p) for p in self.adapter.trainable_parameters(self.model)}
        base = [p.detach().abs().max() for p in self.model.parameters()
                if id(p) not in adapter_ids and p.is_floating_point() and p.numel()]
        self._weight_limit = self.divergence_factor * float(torch.stack(base).max())
        if self._restored_rng is not None:  # now, after everything that set up the run drew its random numbers
            set_rng_states(self._restored_rng)
            self._restored_rng = None

    def on_train_end(self) -> None:
        self.routing["train"] = self._reduced(self.routing["train"])
        self.throughput = {"tokens": int(all_reduce(torch.tensor(self.throughput["tokens"], device=self.device))),
                           "seconds": self.throughput["seconds"], "steps": self.global_step}
        self._forget_batch()

    def _forget_batch(self) -> None:
        """After fit and validate the model is scored by lm-eval, where adapters must see no batch context
        (BatchContext's contract), not the last batch's task ids and masks."""
        self.adapter.set_context(self.model, None, None, None)

    # -- dev pass -----------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        cross_entropy = self(batch)
        self.log("val/ce", cross_entropy, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        self._record_routing(batch, self.routing["dev"])
        return cross_entropy

    def on_validation_epoch_start(self) -> None:
        self.routing["dev"] = RoutingStatistics(self.routing["dev"].num_tasks)

    def on_validation_epoch_end(self) -> None:
        self.routing["dev"] = self._reduced(self.routing["dev"])
        summary = self.routing["dev"].summary()
        if summary:
            self.log_dict({f"val/{k}": v for k, v in summary.items()}, rank_zero_only=True)

    def on_validation_end(self) -> None:
        self._forget_batch()

    # -- optimisation and checkpoints -----------------------------------------------------------------

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.adapter.trainable_parameters(self.model))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in adapter_state_dict(self.model).items()}
        checkpoint["adapter_stage"] = self.stage
        # every process's own state, in rank order: each has its own RNG streams and routing sums
        checkpoint["moelab_processes"] = gather_objects(self._process_state())

    def _process_state(self) -> dict[str, Any]:
        return {"rng": rng_states(), "throughput": dict(self.throughput),
                "routing": {split: self.routing[split].state_dict() for split in ("train", "window")}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stage = checkpoint.get("adapter_stage")
        if stage is not None:  # before the tensors: entering a stage may capture weights (LoRA-Mixer's anchors),
            self.adapter.enter_stage(self.model, stage)  # which the checkpoint's values then replace
        self.stage = stage
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        load_adapter_state_dict(self.model, state, source="checkpoint")
        checkpoint["state_dict"] = {}  # loaded and checked above; nothing left for Lightning's own load
        processes = checkpoint.get("moelab_processes")
        if processes is None:
            return
        if len(processes) != num_processes():
            raise ValueError(f"the checkpoint was written by {len(processes)} process(es), this run has "
                             f"{num_processes()}: resume with the same number of devices")
        own = processes[rank()]
        self.throughput = dict(own["throughput"])
        for split, stats in own["routing"].items():
            self.routing[split] = RoutingStatistics.from_state_dict(stats)
        self._restored_rng = own["rng"]
