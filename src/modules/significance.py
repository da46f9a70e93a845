"""Confidence intervals and paired tests on per-example correctness, for the comparison table.

A method's score on a task is the mean over its seeds of the mean over the task's examples of a 0/1
correctness. Two sources of error make it uncertain: which examples the test set happens to hold (with 70
examples per task, about ±12 points at 95 %), and which seed the training drew. The bootstrap here resamples
both: each replicate draws the examples of every task with replacement, and each method's seeds with
replacement, and recomputes the statistic.

* A **cell** (one method, one task or the average over tasks) is the percentile interval of its replicates.
* A **paired difference** (method − reference) draws the *same* examples for both methods in a replicate,
  so that what the two have in common cancels, and each method's own seeds; the seeds of two methods are not
  paired (seed 0 of one has nothing in common with seed 0 of the other beyond the data order).
* An **average** over tasks draws each task's examples separately and each method's seeds once for all tasks
  (a multi-task run is one draw of the seed for every task).
* Its **p-value** is the two-sided paired-bootstrap test of "no difference": the share of replicates whose
  distance from the observed difference is at least the observed difference (the replicates shifted to the
  null), counted as ``(1 + hits) / (1 + replicates)`` so that it is never 0. Identical methods get 1.
* :func:`holm` adjusts a family of p-values (the methods compared with one reference on one column) for
  multiple comparisons.

Every bootstrap takes an explicit seed: the same inputs give the same table.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# one method's correctness per task: seeds × examples (0/1), examples in doc-id order, seeds in one order for
# all tasks
Correctness = dict[str, np.ndarray]
# elements held in memory by one chunk of replicates (replicates × examples)
CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A statistic (in the units of the correctness, 0–1), its percentile interval, and a p-value for a
    difference (None for a plain cell)."""

    value: float
    low: float
    high: float
    p: float | None = None


def point_estimate(terms: list[tuple[float, Correctness]], tasks: list[str]) -> float:
    """``Σ sign · mean over tasks of (mean over seeds and examples)``: the statistic without resampling."""
    return float(np.mean([sum(sign * matrices[task].mean() for sign, matrices in terms) for task in tasks]))


def bootstrap(terms: list[tuple[float, Correctness]], tasks: list[str], iterations: int,
              rng: np.random.Generator) -> np.ndarray:
    """``iterations`` replicates of :func:`point_estimate`: each task's examples drawn once per replicate and
    shared by every term, each term's seeds drawn once per replicate and shared by every task."""
    sizes = {task: _examples(terms, task) for task in tasks}
    replicates = np.empty(iterations)
    chunk = max(1, CHUNK_ELEMENTS // max(sizes.values()))
    for start in range(0, iterations, chunk):
        count = min(chunk, iterations - start)
        seed_weights = [_weights(rng, next(iter(matrices.values())).shape[0], count) for _, matrices in terms]
        total = np.zeros(count)
        for task in tasks:
            example_weights = _weights(rng, sizes[task], count)
            for (sign, matrices), seeds in zip(terms, seed_weights, strict=True):
                per_example = seeds @ matrices[task]  # [replicates, examples]: the mean over drawn seeds
                total += sign * np.einsum("re,re->r", per_example, example_weights)
        replicates[start:start + count] = total / len(tasks)
    return replicates


def _examples(terms: list[tuple[float, Correctness]], task: str) -> int:
    sizes = {matrices[task].shape[1] for _, matrices in terms}
    if len(sizes) != 1:
        raise ValueError(f"{task}: the compared methods were scored on different numbers of examples {sorted(sizes)}")
    return sizes.pop()


def _weights(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """``count`` draws of ``size`` items with replacement, as weights that sum to 1 per draw (counted with one
    bincount over all draws: numpy's multinomial sampler is an order of magnitude slower)."""
    drawn = rng.integers(0, size, (count, size)) + size * np.arange(count)[:, None]
    return np.bincount(drawn.ravel(), minlength=count * size).reshape(count, size) / size


def interval(terms: list[tuple[float, Correctness]], tasks: list[str], iterations: int, seed: int, key: str,
             paired: bool = False, level: float = 0.95) -> Interval:
    """The estimate and its ``level`` percentile interval; with ``paired``, the test's p-value too. ``key``
    names the estimate, so that each one draws its own reproducible stream whatever else the table holds."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    value = point_estimate(terms, tasks)
    replicates = bootstrap(terms, tasks, iterations, rng)
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    p = None
    if paired:
        tolerance = 1e-12  # replicates equal to the observed distance count as hits
        hits = int(np.sum(np.abs(replicates - value) >= abs(value) - tolerance))
        p = (1 + hits) / (1 + iterations)
    return Interval(value, float(low), float(high), p)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment, in the order given: the k-th smallest p is multiplied by (m − k + 1),
    made monotone, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda index: p_values[index])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# ------------------------------------------------------------------------------------------- a table's cells


@dataclass(frozen=True)
class Resampling:
    """How many bootstrap replicates, and the seed that makes them reproducible."""

    iterations: int = 10_000
    seed: int = 0


class Evidence:
    """The per-example correctness of one table line: ``task -> seed -> (doc ids, 0/1 per example)``."""

    def __init__(self, name: str, table: dict[str, dict[int, tuple[list[int], np.ndarray]]]) -> None:
        self.name, self.table = name, table
        self.problems: list[str] = []  # why an interval or a difference is missing, for the table's notes

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def matrices(self, tasks: list[str]) -> tuple[Correctness, dict[str, list[int]]] | None:
        """Seeds × examples per task over the seeds that have every task of ``tasks``, and each task's doc
        ids; None without such a seed, or when the seeds were scored on different examples (noted)."""
        if not tasks or any(task not in self.table for task in tasks):
            return None
        seeds = sorted(set.intersection(*(set(self.table[task]) for task in tasks)))
        if not seeds:
            return None
        matrices, ids = {}, {}
        for task in tasks:
            found = {tuple(self.table[task][seed][0]) for seed in seeds}
            if len(found) > 1:
                self._problem(f"⚠ {self.name}: the seeds' predictions on {task} hold different examples (another "
                              "eval.limit or test split?): no interval")
                return None
            ids[task] = list(found.pop())
            matrices[task] = np.stack([self.table[task][seed][1] for seed in seeds])
        return matrices, ids

    def interval(self, tasks: list[str], resampling: Resampling) -> Interval | None:
        """The line's score on ``tasks`` (one task, or the average over several) with its interval."""
        found = self.matrices(tasks)
        if found is None:
            return None
        return interval([(1.0, found[0])], tasks, resampling.iterations, resampling.seed, f"{self.name}|{tasks}")

    def difference(self, reference: Evidence, tasks: list[str], resampling: Resampling) -> Interval | None:
        """``self − reference`` on ``tasks``, paired by example, with its interval and p-value; None when either
        lacks predictions, or when the two were scored on different examples."""
        ours, theirs = self.matrices(tasks), reference.matrices(tasks)
        if ours is None or theirs is None:
            return None
        if ours[1] != theirs[1]:
            self._problem(f"⚠ {self.name}: scored on other examples than {reference.name} on "
                          f"{', '.join(task for task in tasks if ours[1][task] != theirs[1][task])}: no paired "
                          "difference there")
            return None
        return interval([(1.0, ours[0]), (-1.0, theirs[0])], tasks, resampling.iterations, resampling.seed,
                        f"{self.name}−{reference.name}|{tasks}", paired=True)
