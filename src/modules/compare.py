"""Comparison tables of a sweep: every ``results.json`` under a folder → a Markdown and a CSV table, plus a
figure of the methods' expert activation maps.

Rows. One per method, named with its fidelity label. Runs of one method are split into several rows only
by overrides that vary between them other than the seed (an ablation such as ``adapter.top_k=1,2``), and by
the protocol when a sweep mixes single-task and multi-task runs. A base-model row comes first.

Columns. One per evaluated task and the average, each the mean ± sample standard deviation over seeds (the
number of seeds when it differs from the row's); the average of a seed needs a score for every task
column, so rows with missing tasks get no average instead of an average over fewer tasks. In the
single-task protocol (one run per task and seed, as in the single-task paper tables) a method's runs fill
the task columns of one row. Also: trainable parameters and their share of the base model, the size a
parameter budget chose, and routing statistics of the held-out pass (normalised entropy, coefficient of
variation of the load, dead experts), averaged over seeds.

Published numbers come from the ``paper:`` block the runs' experiment config carries (conf/experiment/):
under each method it lists, a published row and an "ours − published" row. Rows of ``reconstruction``
methods are marked: their published numbers are context, never a reproduction target. Failed runs, job
folders without results, and missing (task, seed) cells are listed, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .plots import DPI, ROUTING_FILE, comparison_figure, read_routing
from .training import RESULTS_FILE

ROUTING_COLUMNS = {"entropy": "routing/entropy", "load_cv": "routing/load_cv", "dead_experts": "routing/dead_experts"}
RECONSTRUCTION = "reconstruction"
# settings that must agree between the runs of a fair comparison: (description, path in results.json)
PROTOCOL = (("base model", "model_identity"), ("metric", "metric"), ("training steps", "config.trainer.max_steps"),
            ("epochs", "config.trainer.max_epochs"), ("learning rate", "config.module.optimizer.lr"),
            ("batch size", "config.data.batch_size"),
            ("gradient accumulation", "config.trainer.accumulate_grad_batches"),
            ("maximum length", "config.data.max_length"), ("evaluation limit", "config.eval.limit"),
            ("few-shot examples", "config.eval.num_fewshot"), ("parameter budget", "budget.rule"))


def _lookup(values: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(values, dict):
            return None
        values = values.get(part)
    return values


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    folder: Path
    results: dict[str, Any]
    overrides: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.results.get("status") == "ok"

    @property
    def trained_tasks(self) -> list[str]:
        return list(self.results["data"]["tasks"])

    @property
    def protocol(self) -> str:
        return "single-task" if len(self.trained_tasks) == 1 else "multi-task"

    def scores(self) -> dict[str, float]:
        """Held-out scores in percent, headline metric only."""
        metric = self.results["metric"]
        return {task: 100 * values[metric] for task, values in self.results["scores"].items() if metric in values}


def _overrides(folder: Path) -> dict[str, str]:
    """The job's command-line overrides (Hydra's ``.hydra/overrides.yaml``), ``key -> value``."""
    path = folder / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    pairs = (item.split("=", 1) for item in yaml.safe_load(path.read_text()) or [] if "=" in item)
    return {key.lstrip("+~"): value for key, value in pairs}


@dataclass
class Sweep:
    runs: list[Run]
    failed: list[Run]
    problems: list[str]  # folders without results, unreadable files


def read_sweep(sweep_dir: str | Path) -> Sweep:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder")
    runs, failed, problems = [], [], []
    for path in sorted(sweep_dir.rglob(RESULTS_FILE)):
        try:
            run = Run(path.parent, json.loads(path.read_text()), _overrides(path.parent))
        except json.JSONDecodeError as error:
            problems.append(f"`{path.relative_to(sweep_dir)}` is not valid JSON ({error})")
            continue
        (runs if run.ok else failed).append(run)
    done = {run.folder for run in runs + failed}
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        if hydra_dir.parent not in done:
            folder = hydra_dir.parent.relative_to(sweep_dir)
            problems.append(f"`{folder}` has no {RESULTS_FILE} (killed, or still running)")
    if not runs and not failed and not problems:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {sweep_dir}")
    return Sweep(runs, failed, problems)


# ------------------------------------------------------------------------------------------------ rows


@dataclass
class Stat:
    mean: float
    std: float | None
    n: int


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Row:
    label: str
    variant: str
    protocol: str
    runs: list[Run] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.runs[0].results["method"]

    @property
    def fidelity(self) -> str:
        return self.runs[0].results["fidelity"]

    def name(self, show_protocol: bool) -> str:
        extras = [text for text in (self.variant, self.protocol if show_protocol else "") if text]
        return self.label + (f" · {' · '.join(extras)}" if extras else "")

    def by_seed(self) -> dict[int, dict[str, float]]:
        """``seed -> task -> score``: a multi-task run fills all its tasks, a single-task run one."""
        table: dict[int, dict[str, float]] = defaultdict(dict)
        for run in self.runs:
            table[run.results["seed"]].update(run.scores())
        return dict(table)


def _varying_keys(runs: list[Run]) -> list[str]:
    """Overrides whose value differs between runs, ignoring the seed (and the task of single-task runs)."""
    def relevant(run: Run) -> dict[str, str]:
        ignored = {"seed"} | ({"data.tasks"} if run.protocol == "single-task" else set())
        return {k: v for k, v in run.overrides.items() if k not in ignored}

    keys = sorted({key for run in runs for key in relevant(run)})
    return [key for key in keys if len({relevant(run).get(key) for run in runs}) > 1]


def group_rows(runs: list[Run]) -> list[Row]:
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_label[run.results["label"]].append(run)
    rows: dict[tuple[str, str, str], Row] = {}
    for label, label_runs in sorted(by_label.items()):
        varying = _varying_keys(label_runs)
        for run in label_runs:
            variant = ", ".join(f"{key}={run.overrides[key]}" for key in varying if key in run.overrides)
            key = (label, variant, run.protocol)
            rows.setdefault(key, Row(*key)).runs.append(run)
    return [rows[key] for key in sorted(rows)]


# ------------------------------------------------------------------------------------------------ table


@dataclass
class Line:
    """One table line: ours, the base model, a published row or a difference row."""

    kind: str
    name: str
    cells: dict[str, Stat | float | None]
    average: Stat | float | None = None
    seeds: int | None = None
    parameters: str = ""
    trainable: list[int] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    sized: str = ""
    routing: dict[str, Stat | None] = field(default_factory=dict)
    row: Row | None = None


def _parameters(runs: list[Run]) -> tuple[list[int], list[float], str]:
    """The distinct trainable counts and shares of a row's runs, and how the table shows them."""
    counts = sorted({run.results["parameters"]["trainable"] for run in runs})
    shares = sorted({run.results["parameters"]["trainable_share"] for run in runs})
    count_text = f"{counts[0]:,}" + (f"–{counts[-1]:,}" if len(counts) > 1 else "")
    share_text = f"{100 * shares[0]:.3g}" + (f"–{100 * shares[-1]:.3g}" if len(shares) > 1 else "")
    return counts, shares, f"{count_text} ({share_text}%)"


def _sized(runs: list[Run]) -> str:
    reports = [run.results.get("budget") for run in runs if run.results.get("budget")]
    values = sorted({f"{b['field']}={b['value']}" if b.get("sized") else "not sized" for b in reports})
    return ", ".join(values)


def our_line(row: Row, tasks: list[str], split: str, show_protocol: bool) -> Line:
    seeds = row.by_seed()
    cells = {task: _stat([scores[task] for scores in seeds.values() if task in scores]) for task in tasks}
    complete = [scores for scores in seeds.values() if tasks and all(task in scores for task in tasks)]
    average = _stat([statistics.fmean(scores[task] for task in tasks) for scores in complete])
    routing = {name: _stat([run.results["routing"][split][key] for run in row.runs
                            if key in run.results["routing"][split]])
               for name, key in ROUTING_COLUMNS.items()}
    counts, shares, parameters = _parameters(row.runs)
    return Line("ours", row.name(show_protocol), cells, average, len(seeds), parameters, counts, shares,
                _sized(row.runs), routing, row)


def base_line(runs: list[Run], tasks: list[str]) -> tuple[Line, list[str]]:
    """The base model's scores (the same in every run that scored them, or a warning says otherwise)."""
    values: dict[str, set[float]] = defaultdict(set)
    for run in runs:
        metric = run.results["metric"]
        for task, scores in run.results["base_scores"].items():
            if metric in scores:
                values[task].add(100 * scores[metric])
    cells = {task: statistics.fmean(values[task]) if values[task] else None for task in tasks}
    warnings = [f"base-model scores on {task} differ between runs ({', '.join(f'{v:.2f}' for v in sorted(found))}): "
                "different base models or held-out sets" for task, found in values.items() if len(found) > 1]
    average = statistics.fmean(cells.values()) if tasks and None not in cells.values() else None
    models = sorted({run.results["model"] for run in runs})
    return Line("base", f"base model ({', '.join(models)})", cells, average), warnings


def _mean(value: Stat | float | None) -> float | None:
    return value.mean if isinstance(value, Stat) else value


def published_lines(ours: Line, entry: dict | None, paper: dict, tasks: list[str]) -> list[Line]:
    """A published row and an "ours − published" row under ``ours``, from the paper block's ``entry``."""
    if not entry:
        return []
    published = published_values(entry, paper, tasks)
    caveat = " — not a reproduction" if ours.row is not None and ours.row.fidelity == RECONSTRUCTION else ""
    source = ", ".join(str(paper[key]) for key in ("source", "table", "model") if paper.get(key))
    difference = {task: _mean(ours.cells.get(task)) - published[task] for task in tasks
                  if _mean(ours.cells.get(task)) is not None and published[task] is not None}
    average, our_average = published.get("average"), _mean(ours.average)
    return [Line("published", f"↳ published ({source}){caveat}", {t: published[t] for t in tasks}, average,
                 parameters=str(entry.get("params", "")), row=ours.row),
            Line("difference", "↳ ours − published", difference,
                 our_average - average if our_average is not None and average is not None else None, row=ours.row)]


def published_values(entry: dict, paper: dict, tasks: list[str]) -> dict[str, float | None]:
    """Published per-task numbers on our task columns, and the published average: the paper's own when it
    averages over exactly our tasks, otherwise the mean of its numbers on our tasks when all are given."""
    scores = entry.get("scores") or {}
    values: dict[str, float | None] = {task: scores.get(task) for task in tasks}
    if entry.get("average") is not None and set(paper.get("tasks") or []) == set(tasks):
        values["average"] = entry["average"]
    elif tasks and all(values[task] is not None for task in tasks):
        values["average"] = statistics.fmean(values[task] for task in tasks)
    return values


# ------------------------------------------------------------------------------------------------ notes


def protocol_notes(rows: list[Row]) -> list[str]:
    """The settings of PROTOCOL and each task's example counts, with a warning wherever runs disagree."""
    runs = [(row.method, run) for row in rows for run in row.runs]
    trained = sorted({task for _, run in runs for task in run.trained_tasks})
    checks = [*PROTOCOL, *((f"{kind} examples of {task}", f"data.tasks.{task}.{kind}", task)
                           for task in trained for kind in ("train", "heldout"))]
    notes, counts = [], defaultdict(list)
    for description, path, *task in checks:
        found: dict[str, set[str]] = defaultdict(set)
        for method, run in runs:
            if not task or task[0] in run.trained_tasks:
                found[json.dumps(_lookup(run.results, path))].add(method)
        if len(found) > 1:
            detail = "; ".join(f"{json.loads(value)} ({', '.join(sorted(methods))})"
                               for value, methods in found.items())
            notes.append(f"⚠ runs differ in {description}: {detail}")
        elif task:
            counts[task[0]].append(str(json.loads(next(iter(found)))))
        elif found and json.loads(next(iter(found))) is not None:
            notes.append(f"{description}: {json.loads(next(iter(found)))}")
    if counts:
        notes.append("examples per task (train/held-out): "
                     + ", ".join(f"{task} {'/'.join(values)}" for task, values in counts.items()))
    return notes


def budget_notes(rows: list[Row], tolerance: float = 0.05) -> list[str]:
    """Rows that a budget could not bring within ``tolerance`` of its target (rank 1 already too big, say)."""
    notes = []
    for row in rows:
        reports = [run.results["budget"] for run in row.runs if run.results.get("budget")]
        worst = max(reports, key=lambda report: abs(report["relative_error"]), default=None)
        if worst is not None and abs(worst["relative_error"]) > tolerance:
            notes.append(f"⚠ {row.name(False)}: {worst['sizing']}: off the budget by more than "
                         f"{100 * tolerance:.0f}%")
    return notes


def incomplete_cells(rows: list[Row], tasks: list[str], sweep: Sweep) -> list[str]:
    """(row, task) pairs that lack a score for a seed some run of the sweep used."""
    expected = sorted({run.results.get("seed") for run in sweep.runs + sweep.failed} - {None})
    notes = []
    for row in rows:
        seeds = row.by_seed()
        for task in tasks:
            missing = [seed for seed in expected if task not in seeds.get(seed, {})]
            if missing:
                notes.append(f"{row.name(False)}: no {task} score for seed(s) {', '.join(map(str, missing))}")
    return notes


def paper_notes(rows: list[Row], papers: list[dict], tasks: list[str]) -> list[str]:
    notes = []
    for paper in papers:
        notes.append(f"Published numbers: {paper.get('source', '?')}, {paper.get('table', '?')}, "
                     f"{paper.get('model', '?')}. {paper.get('note', '')}".strip())
        absent = [task for task in paper.get("tasks") or [] if task not in tasks]
        if absent:
            notes.append(f"Published columns not in this table (not evaluated here): {', '.join(absent)}.")
    recon = sorted({row.label for row in rows if row.fidelity == RECONSTRUCTION})
    if papers and recon:
        notes.append(f"{', '.join(recon)}: `{RECONSTRUCTION}` methods fill in what their papers leave undefined with "
                     "moelab's own design; their numbers are not reproductions of the published ones.")
    return notes


# ------------------------------------------------------------------------------------------------ output


def _cell(value: Stat | float | None, kind: str, seeds: int | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, Stat):
        text = f"{value.mean:.1f}" + (f" ± {value.std:.1f}" if value.std is not None else "")
        return text + (f" ({value.n})" if seeds is not None and value.n != seeds else "")
    return f"{value:+.1f}" if kind == "difference" else f"{value:.1f}"


def _routing_cell(value: Stat | None, digits: int) -> str:
    return "–" if value is None else f"{value.mean:.{digits}f}"


def render_markdown(title: str, lines: list[Line], tasks: list[str], notes: dict[str, list[str]]) -> str:
    sized = any(line.sized for line in lines)
    header = (["Method", "Trainable (share of base)"] + (["Sized"] if sized else []) + tasks
              + ["Average", "Seeds", "Entropy", "Load CV", "Dead experts"])
    out = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines:
        cells = [line.name, line.parameters or "–"] + ([line.sized or "–"] if sized else [])
        cells += [_cell(line.cells.get(task), line.kind, line.seeds) for task in tasks]
        cells += [_cell(line.average, line.kind, line.seeds), str(line.seeds) if line.seeds else "–"]
        cells += [_routing_cell(line.routing.get(name), digits)
                  for name, digits in (("entropy", 3), ("load_cv", 3), ("dead_experts", 1))]
        out.append("| " + " | ".join(cells) + " |")
    for heading, items in notes.items():
        if items:
            out += ["", f"## {heading}", ""] + [f"- {item}" for item in items]
    return "\n".join(out) + "\n"


def write_csv(path: Path, lines: list[Line], tasks: list[str]) -> None:
    stat_columns = [*tasks, "average"]
    header = ["kind", "name", "method", "fidelity", "variant", "protocol", "trainable", "trainable_share", "sized",
              "seeds"] + [f"{c}{suffix}" for c in stat_columns for suffix in ("", "_std", "_n")] + list(ROUTING_COLUMNS)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for line in lines:
            row = line.row
            values = [line.kind, line.name, row.method if row else "", row.fidelity if row else "",
                      row.variant if row else "", row.protocol if row else "",
                      line.trainable[0] if len(line.trainable) == 1 else "",
                      line.shares[0] if len(line.shares) == 1 else "", line.sized, line.seeds or ""]
            for column in stat_columns:
                value = line.average if column == "average" else line.cells.get(column)
                values += ([value.mean, "" if value.std is None else value.std, value.n] if isinstance(value, Stat)
                           else ["" if value is None else value, "", ""])
            values += ["" if line.routing.get(name) is None else line.routing[name].mean for name in ROUTING_COLUMNS]
            writer.writerow(values)


@dataclass
class Comparison:
    markdown: Path
    csv: Path
    figure: Path | None
    text: str
    unfinished: list[str] = field(default_factory=list)  # failed or interrupted jobs, folders without results


def compare(sweep_dir: str | Path, out_dir: str | Path | None = None, split: str = "heldout") -> Comparison:
    """Write ``comparison.md``, ``comparison.csv`` and ``expert_maps.png`` (when a method routes) for the
    runs under ``sweep_dir``, into ``out_dir`` (default: ``sweep_dir``)."""
    sweep = read_sweep(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = group_rows(sweep.runs)
    tasks = sorted({task for run in sweep.runs for task in run.scores()})
    show_protocol = len({row.protocol for row in rows}) > 1

    base, base_warnings = base_line(sweep.runs, tasks)
    papers = list({json.dumps(p, sort_keys=True): p for run in sweep.runs
                   if (p := run.results["config"].get("paper"))}.values())
    lines = []
    if any(value is not None for value in base.cells.values()):
        lines.append(base)
        for paper in papers[:1]:
            lines += published_lines(base, paper.get("base"), paper, tasks)
    for row in rows:
        ours = our_line(row, tasks, split, show_protocol)
        paper = row.runs[0].results["config"].get("paper") or {}
        lines += [ours, *published_lines(ours, (paper.get("methods") or {}).get(row.method), paper, tasks)]

    failures = [f"`{run.folder.relative_to(sweep_dir)}` ({run.results.get('method')}, seed {run.results.get('seed')}) "
                f"{run.results.get('status', 'failed')}: {run.results.get('error')}" for run in sweep.failed]
    metric = sweep.runs[0].results["metric"] if sweep.runs else "?"
    notes = {
        "Notes": [f"Scores: {metric} × 100 on each task's held-out examples (lm-eval); mean ± sample standard "
                  "deviation over seeds, the number of seeds in brackets where it differs from the row's. A seed's "
                  "average needs every task column. Routing columns: the "
                  f"{split} pass, averaged over routing sites and seeds."]
                 + protocol_notes(rows) + budget_notes(rows) + base_warnings + paper_notes(rows, papers, tasks),
        "Missing or failed runs": failures + sweep.problems + incomplete_cells(rows, tasks, sweep),
    }
    text = render_markdown(f"moelab comparison: {Path(sweep_dir).resolve().name}", lines, tasks, notes)
    markdown, table = out_dir / "comparison.md", out_dir / "comparison.csv"
    markdown.write_text(text)
    write_csv(table, lines, tasks)
    return Comparison(markdown, table, write_comparison_figure(rows, out_dir, split), text,
                      failures + sweep.problems)


def write_comparison_figure(rows: list[Row], out_dir: Path, split: str) -> Path | None:
    figure = comparison_figure([(row.name(False), [read_routing(run.folder).stats[split] for run in row.runs
                                                   if (run.folder / ROUTING_FILE).exists()]) for row in rows], split)
    if figure is None:
        return None
    path = out_dir / "expert_maps.png"
    figure.savefig(path, dpi=DPI)
    return path
