"""Which examples each process trains on at each optimiser step, and how the step's loss is normalised.

A *step* consumes one global batch of ``batch_size × processes × accumulate_grad_batches`` examples. The
global batches of an epoch are drawn exactly as a single process with that batch size would draw them, and
each global batch is dealt into ``processes × accumulate`` micro-batches: process ``p`` takes micro-batches
``a · processes + p`` for ``a = 0 … accumulate − 1``. So 2 processes × batch b, 1 process × batch 2b and
1 process × batch b with 2 accumulated micro-batches see the same examples at every step.

Every example carries the number of supervised targets of its whole step (all processes, all micro-batches),
so that the LightningModule can divide the summed token cross-entropy by it: the gradient is then that of
the step's mean token loss however the step is split (the accumulation normalisation that transformers
adopted in 4.46, here across processes too).

The sampler is resumable: it starts at any step of any epoch (:meth:`StepBatches.start_at`), which is how a
resumed run continues mid-epoch with the very batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def supervised_targets(labels: list[int]) -> int:
    """Targets an example contributes to the loss: labels that are not −100, after the causal shift."""
    return sum(label != -100 for label in labels[1:])


class StepBatches(Sampler[list[tuple[int, int]]]):
    """This process's micro-batches, as lists of ``(example index, supervised targets of the step)``.

    With ``group_by_length`` the epoch's shuffled order is cut into windows of ``window`` global batches,
    each window is sorted by length and split into global batches, and the global batches are shuffled
    again (like HF Trainer's ``group_by_length``): padding, which costs full compute on a CPU, nearly
    vanishes while every batch stays a random draw from a window. A global batch is dealt round-robin, so
    that its micro-batches hold similar lengths. A last global batch too small to give every micro-batch an
    example is dropped, so that every process takes the same number of steps.
    """

    def __init__(self, lengths: list[int], targets: list[int], batch_size: int, seed: int, *,
                 num_processes: int = 1, rank: int = 0, accumulate: int = 1, group_by_length: bool = True,
                 window: int = 16) -> None:
        if len(lengths) != len(targets):
            raise ValueError("lengths and targets must describe the same examples")
        if not 0 <= rank < num_processes:
            raise ValueError(f"rank ({rank}) must be in [0, {num_processes})")
        self.lengths, self.targets, self.seed = lengths, targets, seed
        self.num_processes, self.rank, self.accumulate = num_processes, rank, accumulate
        self.global_batch = batch_size * num_processes * accumulate
        self.group_by_length, self.window = group_by_length, window
        self.epoch, self.skip = 0, 0
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(lengths)} training examples cannot fill one step of {self.global_batch} "
                             f"(data.batch_size {batch_size} × {num_processes} processes × {accumulate} accumulated)")

    @property
    def micro_batches(self) -> int:
        return self.num_processes * self.accumulate

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(len(self.lengths), self.global_batch)
        return full + (rest >= self.micro_batches)

    def __len__(self) -> int:
        """Micro-batches of this process in a whole epoch."""
        return self.steps_per_epoch * self.accumulate

    def start_at(self, step: int) -> None:
        """Continue with optimiser step ``step`` (0-based, counted from the first epoch)."""
        self.epoch, self.skip = divmod(step, self.steps_per_epoch)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (example indices), the same for any number of processes."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            batches = [order[i:i + self.global_batch] for i in range(0, len(order), self.global_batch)]
        else:
            span, batches = self.global_batch * self.window, []
            for start in range(0, len(order), span):
                chunk = sorted(order[start:start + span], key=self.lengths.__getitem__, reverse=True)
                batches += [chunk[i:i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [batch for batch in batches if len(batch) >= self.micro_batches]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.global_batches(self.epoch)[self.skip:]
        self.epoch, self.skip = self.epoch + 1, 0  # the next iteration is the next epoch
        return self._micro_batches(batches)

    def _micro_batches(self, batches: list[list[int]]) -> Iterator[list[tuple[int, int]]]:
        for batch in batches:
            step_targets = sum(self.targets[i] for i in batch)
            for accumulated in range(self.accumulate):
                micro = batch[accumulated * self.num_processes + self.rank::self.micro_batches]
                yield [(index, step_targets) for index in micro]


class StepExamples(Dataset):
    """Tokenised examples looked up by ``(index, step targets)``: each item learns its step's target count."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, step_targets = key
        return {**self.items[index], "step_targets": step_targets}
