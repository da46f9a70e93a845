"""The comparison's figures besides the expert maps: learning curves and per-task accuracy, as PNG and PDF.

* ``learning_curves``: the training loss per step of each method (the mean over seeds at each step, and a
  band from the lowest to the highest seed), and the dev cross-entropy wherever the runs logged it
  (once, after the fit, unless validation ran during training), with the same band as error bars. Both come
  from each run's ``csv/metrics.csv`` (the CSV logger); runs without it are left out, and a row
  without any such run has no curve.
* ``accuracy``: per task and for the average, the base model's score and each method's, as bars with the
  table's 95 % bootstrap intervals as error bars.

The figures are built without pyplot (no global state, no display backend), like the expert maps.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from .plots import DPI, _figure

if TYPE_CHECKING:
    from .compare import Line, Row

METRICS_CSV = Path("csv") / "metrics.csv"
CURVES = (("train/loss", "training loss"), ("val/ce", "dev cross-entropy"))
FORMATS = ("png", "pdf")


def read_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """``column -> step -> value`` for the columns of CURVES in a run's CSV log; ``{}`` without one."""
    path = run_dir / METRICS_CSV
    if not path.exists():
        return {}
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            for column, _ in CURVES:
                if record.get(column) and record.get("step"):
                    curves[column][int(float(record["step"]))] = float(record[column])
    return dict(curves)


def seed_band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean over seeds, lowest and highest seed, at the steps every seed logged."""
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    values = [[curve[step] for curve in curves] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def learning_curve_figure(rows: list[Row]):
    """Two panels (training loss, dev loss) with one curve per row; None when no run has a CSV log."""
    curves = [(row.name(False), [read_curves(run.folder) for run in row.runs]) for row in rows]
    curves = [(name, [run for run in runs if run]) for name, runs in curves]
    if not any(runs for _, runs in curves):
        return None
    figure, axes = _figure(1, len(CURVES), (6.0 * len(CURVES), 4.0))
    for axis, (column, title) in zip(axes[0], CURVES, strict=True):
        for name, runs in curves:
            steps, mean, low, high = seed_band([run[column] for run in runs if column in run])
            if not steps:
                continue
            if len(steps) == 1:  # logged once (after the fit): a point with the range over seeds
                axis.errorbar(steps, mean, yerr=[[mean[0] - low[0]], [high[0] - mean[0]]], fmt="o", capsize=4,
                              label=name)
            else:
                line, = axis.plot(steps, mean, label=name)
                axis.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
        axis.set_title(f"{title} · mean, band = range over seeds", fontsize=9)
        axis.set_xlabel("optimiser step")
        axis.set_ylabel(title)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return figure


def accuracy_figure(lines: list[Line], tasks: list[str], metrics: dict[str, str]):
    """Grouped bars: per task and the average, the base model and each method, with 95 % intervals."""
    from .compare import Stat

    shown = [line for line in lines if line.kind in ("base", "ours")]
    columns = [*tasks, "average"]
    if not shown or not columns:
        return None
    figure, axes = _figure(1, 1, (max(6.0, 1.2 * len(columns) * math.sqrt(len(shown))) + 3.0, 4.5))
    axis = axes[0, 0]
    width = 0.8 / len(shown)
    for index, line in enumerate(shown):
        cells = [line.average if column == "average" else line.cells.get(column) for column in columns]
        positions = [c + (index - (len(shown) - 1) / 2) * width for c in range(len(columns))]
        heights = [cell.mean if isinstance(cell, Stat) else math.nan for cell in cells]
        errors = [[_below(cell) for cell in cells], [_above(cell) for cell in cells]]
        axis.bar(positions, heights, width, yerr=errors, capsize=2, label=line.name)
    axis.set_xticks(range(len(columns)), [f"{task}\n({metrics[task]})" for task in tasks] + ["average"], fontsize=8)
    axis.set_ylabel("score × 100 (bars: mean over seeds; whiskers: 95 % bootstrap interval)", fontsize=8)
    axis.set_title("base model and tuned methods per task", fontsize=10)
    axis.set_ylim(0, 100)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def _below(cell) -> float:
    ci = getattr(cell, "ci", None)
    return 0.0 if ci is None else max(0.0, cell.mean - 100 * ci.low)


def _above(cell) -> float:
    ci = getattr(cell, "ci", None)
    return 0.0 if ci is None else max(0.0, 100 * ci.high - cell.mean)


def save(figure, out_dir: Path, stem: str) -> list[Path]:
    """The figure as ``stem.png`` and ``stem.pdf``."""
    paths = []
    for suffix in FORMATS:
        path = out_dir / f"{stem}.{suffix}"
        figure.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def write_figures(rows: list[Row], lines: list[Line], tasks: list[str], metrics: dict[str, str],
                  out_dir: Path) -> list[Path]:
    """``learning_curves`` and ``accuracy``, each as PNG and PDF, into ``out_dir`` (the ones there is data for)."""
    paths = []
    for stem, figure in (("learning_curves", learning_curve_figure(rows)),
                         ("accuracy", accuracy_figure(lines, tasks, metrics))):
        if figure is not None:
            paths += save(figure, out_dir, stem)
    return paths
