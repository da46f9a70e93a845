"""Expert activation maps: layer × expert heatmaps per task, drawn from saved routing statistics.

A run folder's ``routing.pt`` holds the :class:`~moelab.adapters.routing.RoutingStatistics` of the training
run and of the dev pass (examples held out from training) as raw sums per routing site × expert × task. The
maps regroup those sums before any ratio is formed, so a layer's map is exact over all of its sites' tokens:

* per decoder layer (default): the sums of the sites inside one layer (``model.layers.3.self_attn.q_proj``
  and ``model.layers.3.mlp`` both belong to ``model.layers.3``) are added up; ``per_site`` keeps every site;
* ``kind="load"``: each expert's share of the routed (top-k) slots; ``kind="importance"``: its mean
  routing probability.

One figure per kind: the top row has one panel per task; below it, each task's map minus the mean of the
task maps (the difference between tasks, on a symmetric diverging scale). A task of which the pass counted
no token (a pass cut short before it reached the task) is drawn as a hatched "no data" panel and left out
of the mean, never as zero load; :func:`tasks_without_data` names such tasks so that the scripts warn.
Every title carries the method's fidelity label.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moelab.adapters.routing import RoutingStatistics

ROUTING_FILE = "routing.pt"
KINDS = ("load", "importance")
SPLITS = ("train", "dev")
DPI = 100


@dataclass
class RunRouting:
    """The routing statistics a run saved: method label, task names, statistics per split."""

    label: str
    tasks: list[str]
    stats: dict[str, RoutingStatistics]


def read_routing(run_dir: str | Path) -> RunRouting:
    path = Path(run_dir) / ROUTING_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished moelab run folder?")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return RunRouting(state["method"], list(state["tasks"]),
                      {split: RoutingStatistics.from_state_dict(state[split]) for split in SPLITS})


# ------------------------------------------------------------------------------------------- regrouping


def layer_of(site: str) -> str:
    """The decoder layer of a routing site: its path up to the first numeric part, or the site itself."""
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", site)
    return match.group(1) if match else site


def by_layer(stats: RoutingStatistics, pool_tasks: bool = False) -> RoutingStatistics:
    """The statistics with the raw sums of each decoder layer's sites added up (and of all tasks when
    ``pool_tasks``): ratios read from the result are exact over the grouped tokens."""
    layers = list(dict.fromkeys(layer_of(site) for site in stats.sites))
    index = torch.tensor([layers.index(layer_of(site)) for site in stats.sites], dtype=torch.long)
    sums = {}
    for name, value in stats.sums.items():
        grouped = value.new_zeros(len(layers), *value.shape[1:]).index_add_(0, index.to(value.device), value)
        sums[name] = grouped.sum(dim=-1, keepdim=True) if pool_tasks else grouped
    num_tasks = 1 if pool_tasks else stats.num_tasks
    return RoutingStatistics.from_state_dict({"sites": layers, "num_tasks": num_tasks, "sums": sums})


def short_names(names: list[str]) -> list[str]:
    """Row labels without the path prefix all rows share (``model.layers.3.mlp`` → ``3.mlp``)."""
    if len(names) < 2:
        return [name.rsplit(".", 1)[-1] for name in names]
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind(".") + 1
    return [name[cut:] or name for name in names]


def tasks_without_data(stats: RoutingStatistics, tasks: list[str]) -> list[str]:
    """The tasks of which ``stats`` counted no token; none when the method does not route."""
    if stats.empty:
        return []
    counted = stats.sums["tokens"].sum(dim=0).tolist()
    return [task for task, tokens in zip(tasks, counted, strict=True) if tokens == 0]


# -------------------------------------------------------------------------------------------- drawing


def _figure(rows: int, columns: int, size: tuple[float, float]):
    """A figure with a grid of axes, built without pyplot: no global state, no display backend."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False)


def _heatmap(ax, values: Tensor, rows: list[str], title: str, **style):
    image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", **style)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(len(rows)), rows, fontsize=max(4, 8 - len(rows) // 16))
    ax.tick_params(axis="x", labelsize=7)
    return image


def _no_data(ax, title: str) -> None:
    """A hatched grey panel that says the task has no tokens in this pass (distinct from zero load)."""
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="0.92", edgecolor="0.6", hatch="//"))
    ax.text(0.5, 0.5, "no data\n(no tokens of this task\nin this pass)", transform=ax.transAxes, ha="center",
            va="center", fontsize=8, backgroundcolor="white")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def panel_size(num_rows: int, num_experts: int) -> tuple[float, float]:
    """Inches per heatmap panel, growing with the number of experts and rows."""
    return max(2.6, 0.35 * num_experts + 1.2), max(2.4, 0.22 * num_rows + 1.0)


def expert_map_figure(stats: RoutingStatistics, tasks: list[str], label: str, kind: str, split: str,
                      per_site: bool = False):
    """Rows × expert maps of one run: a panel per task and, with several tasks, each task minus their mean."""
    if stats.empty:
        raise ValueError(f"{label}: no routing statistics ({split}); the method does not route")
    rows = stats if per_site else by_layer(stats)
    maps = rows.activation(kind)  # [rows, experts, tasks]
    missing = set(tasks_without_data(stats, tasks))
    if len(missing) == len(tasks):
        raise ValueError(f"{label}: the {split} routing statistics hold no tokens of any task")
    counted = [column for column, task in enumerate(tasks) if task not in missing]
    names = short_names(rows.sites)
    width, height = panel_size(len(names), maps.shape[1])
    grid_rows = 1 if len(tasks) == 1 else 2
    figure, axes = _figure(grid_rows, len(tasks), (width * len(tasks), height * grid_rows))
    scale = {"cmap": "viridis", "vmin": 0.0, "vmax": float(maps[:, :, counted].max()) or 1.0}
    deviation = maps - maps[:, :, counted].mean(dim=2, keepdim=True)
    limit = float(deviation[:, :, counted].abs().max()) or 1e-6
    for column, task in enumerate(tasks):
        if task in missing:
            for row in range(grid_rows):
                _no_data(axes[row, column], task)
            continue
        image = _heatmap(axes[0, column], maps[:, :, column], names, task, **scale)
        if grid_rows == 2:
            difference = _heatmap(axes[1, column], deviation[:, :, column], names, f"{task} − mean of tasks",
                                  cmap="RdBu_r", vmin=-limit, vmax=limit)
    figure.colorbar(image, ax=axes[0, :].tolist(), label=f"expert {kind}")
    if grid_rows == 2:
        figure.colorbar(difference, ax=axes[1, :].tolist(), label=f"{kind} difference")
    unit = "site" if per_site else "layer"
    for axis in axes[:, 0]:
        axis.set_ylabel(unit, fontsize=8)
    figure.suptitle(f"{label} · {unit} × expert {kind} · {split}", fontsize=10)
    return figure


def write_expert_maps(run_dir: str | Path, out_dir: str | Path | None = None, split: str = "dev",
                      per_site: bool = False) -> list[Path]:
    """One PNG per kind from ``run_dir/routing.pt`` into ``out_dir`` (default ``run_dir/plots``); none when
    the method does not route."""
    if split not in SPLITS:
        raise ValueError(f"split ({split!r}) must be one of {SPLITS}")
    routing = read_routing(run_dir)
    if routing.stats[split].empty:
        return []
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in KINDS:
        figure = expert_map_figure(routing.stats[split], routing.tasks, routing.label, kind, split, per_site)
        path = out_dir / f"expert_map_{kind}_{split}{'_per_site' if per_site else ''}.png"
        figure.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def merged_layers(runs: list[RoutingStatistics]) -> RoutingStatistics:
    """Per-layer statistics of several runs of one method (seeds), all tasks pooled, sums added up."""
    merged = RoutingStatistics(num_tasks=1)
    for stats in runs:
        merged.merge(by_layer(stats, pool_tasks=True))
    return merged


def comparison_figure(panels: list[tuple[str, list[RoutingStatistics]]], split: str):
    """Layer × expert maps of several methods side by side, all tasks and seeds pooled: one column per
    method, one row per kind; None when no method routes. ``panels`` pairs a row name with the statistics
    of its runs."""
    pooled = [(name, merged_layers(runs)) for name, runs in panels if any(not stats.empty for stats in runs)]
    if not pooled:
        return None
    widths = [panel_size(len(stats.sites), stats.activation("load").shape[1]) for _, stats in pooled]
    figure, axes = _figure(len(KINDS), len(pooled), (sum(w for w, _ in widths), max(h for _, h in widths) * len(KINDS)))
    for row, kind in enumerate(KINDS):
        for column, ((name, stats), (width, _)) in enumerate(zip(pooled, widths, strict=True)):
            values = stats.activation(kind)[:, :, 0]
            title = textwrap.fill(f"{name} · {kind}", width=int(10 * width))
            image = _heatmap(axes[row, column], values, short_names(stats.sites), title, cmap="viridis", vmin=0.0)
            figure.colorbar(image, ax=axes[row, column])
        axes[row, 0].set_ylabel("layer", fontsize=8)
    figure.suptitle(f"expert activation maps · layer × expert · all tasks · {split}", fontsize=10)
    return figure
