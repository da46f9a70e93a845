"""Comparison tables of a sweep: every ``results.json`` under a folder → a Markdown, a CSV and a LaTeX
(booktabs) table, figures of the learning curves and per-task accuracies (comparison_figures.py), and a
figure of the methods' expert activation maps.

Rows. One per method, named with its fidelity label. Runs of one method are split into several rows only
by overrides that vary between them other than the seed (an ablation such as ``adapter.top_k=1,2``), and by
the protocol when a sweep mixes single-task and multi-task runs. A base-model row comes first, then the
reference method (``reference``, default ``lora``); every other method's row is followed by its paired
difference to the reference.

Columns. One per evaluated task (headed with the task's headline metric) and the average, each the mean
over seeds with a 95 % bootstrap interval over examples and seeds from the runs' per-example predictions
(significance.py), or ± the sample standard deviation over seeds for runs that kept none; the number of
seeds when it differs from the row's. The average of a seed needs a score for every task column, so rows
with missing tasks get no average instead of an average over fewer tasks. In the single-task protocol (one
run per task and seed, as in the single-task paper tables) a method's runs fill the task columns of one
row. Paired differences carry their interval and a paired-bootstrap p-value, Holm-adjusted over the
methods compared in a column. Also: trainable parameters and their share of the base model, the size a
parameter budget chose, costs (train time, train tokens/s, peak memory), and routing statistics of the
dev pass (normalised entropy, coefficient of variation of the load, dead experts), averaged over
seeds. The table's "Columns" notes define each of them.

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

import numpy as np
import yaml

from moelab.adapters import registered_adapters

from .comparison_figures import write_figures
from .evaluation import metric_label, read_predictions
from .plots import DPI, ROUTING_FILE, comparison_figure, read_routing, tasks_without_data
from .significance import Evidence, Interval, Resampling, holm
from .training import RESULTS_FILE

ROUTING_COLUMNS = {"entropy": "routing/entropy", "load_cv": "routing/load_cv", "dead_experts": "routing/dead_experts"}
# cost columns: (name, header, path in results.json, decimals shown)
COST_COLUMNS = (("train_s", "Train s", "timings.train_s", 1), ("tokens_per_s", "Tokens/s", "timings.tokens_per_s", 0),
                ("peak_mib", "Peak MiB", "memory.peak_mib", 0), ("prefill_ms", "Prefill ms", "latency.prefill_ms", 1),
                ("decode_ms", "Decode ms/tok", "latency.decode_ms_per_token", 1))
SIGNIFICANCE = 0.05
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

    def metric(self, task: str) -> str:
        """The task's headline metric (``metrics``; runs written before it had one ``metric`` for all tasks)."""
        return (self.results.get("metrics") or {}).get(task) or self.results["metric"]

    def scores(self) -> dict[str, float]:
        """Held-out scores in percent, headline metric only."""
        return {task: 100 * values[self.metric(task)] for task, values in self.results["scores"].items()
                if self.metric(task) in values}

    def correctness(self, model: str = "tuned") -> dict[str, tuple[list[int], np.ndarray]]:
        """``task -> (doc ids, 0/1 per example)`` on the task's headline metric, from the run's predictions."""
        return {task: ([record["doc_id"] for record in records],
                       np.array([record[self.metric(task)] for record in records], dtype=float))
                for task, records in read_predictions(self.folder, model).items() if records}


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
    ci: Interval | None = None  # 95 % bootstrap interval over examples and seeds (0–1), where predictions exist


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

    def correctness(self) -> dict[str, dict[int, tuple[list[int], np.ndarray]]]:
        """``task -> seed -> (doc ids, 0/1 per example)`` from the runs' predictions of the tuned model."""
        table: dict[str, dict[int, tuple[list[int], np.ndarray]]] = defaultdict(dict)
        for run in self.runs:
            for task, values in run.correctness().items():
                table[task][run.results["seed"]] = values
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
    """One table line: ours, the base model, a published row, an "ours − published" row (``difference``) or
    a paired difference to the reference method (``paired``, cells are :class:`Paired`)."""

    kind: str
    name: str
    cells: dict[str, Stat | float | Paired | None]
    average: Stat | float | Paired | None = None
    seeds: int | None = None
    parameters: str = ""
    trainable: list[int] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    sized: str = ""
    routing: dict[str, Stat | None] = field(default_factory=dict)
    row: Row | None = None
    costs: dict[str, Stat | None] = field(default_factory=dict)
    evidence: Evidence | None = None


@dataclass
class Paired:
    """A paired difference to the reference (0–1 units) and its Holm-adjusted p-value."""

    ci: Interval
    p_holm: float | None = None

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < SIGNIFICANCE


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


def our_line(row: Row, tasks: list[str], split: str, show_protocol: bool, resampling: Resampling) -> Line:
    seeds = row.by_seed()
    evidence = Evidence(row.name(show_protocol), row.correctness())
    cells = {task: _with_ci(_stat([scores[task] for scores in seeds.values() if task in scores]),
                            evidence, [task], resampling) for task in tasks}
    complete = [scores for scores in seeds.values() if tasks and all(task in scores for task in tasks)]
    average = _with_ci(_stat([statistics.fmean(scores[task] for task in tasks) for scores in complete]),
                       evidence, tasks, resampling)
    routing = {name: _stat([run.results["routing"][split][key] for run in row.runs
                            if key in run.results["routing"][split]])
               for name, key in ROUTING_COLUMNS.items()}
    costs = {name: _stat([value for run in row.runs if (value := _lookup(run.results, path)) is not None])
             for name, _, path, _ in COST_COLUMNS}
    counts, shares, parameters = _parameters(row.runs)
    return Line("ours", row.name(show_protocol), cells, average, len(seeds), parameters, counts, shares,
                _sized(row.runs), routing, row, costs, evidence)


def _with_ci(stat: Stat | None, evidence: Evidence, tasks: list[str], resampling: Resampling) -> Stat | None:
    """``stat`` with the bootstrap interval of the same cell, where the runs kept predictions."""
    if stat is not None:
        stat.ci = evidence.interval(tasks, resampling)
    return stat


def paired_line(line: Line, reference: Line, tasks: list[str], resampling: Resampling) -> Line | None:
    """``line − reference`` per task and for the average, paired by example (p-values not yet adjusted)."""
    if line.evidence is None or reference.evidence is None:
        return None
    cells = {task: _paired(line.evidence.difference(reference.evidence, [task], resampling)) for task in tasks}
    average = _paired(line.evidence.difference(reference.evidence, tasks, resampling))
    if average is None and not any(cells.values()):
        return None
    return Line("paired", f"↳ − {reference.name}", cells, average, row=line.row)


def _paired(ci: Interval | None) -> Paired | None:
    return None if ci is None else Paired(ci)


def adjust_across_methods(lines: list[Line], tasks: list[str]) -> None:
    """Holm's adjustment per column, over the methods compared with the reference in that column."""
    paired = [line for line in lines if line.kind == "paired"]
    for column in [*tasks, None]:
        cells = [cell for line in paired if (cell := line.average if column is None else line.cells.get(column))]
        for cell, adjusted in zip(cells, holm([cell.ci.p for cell in cells]), strict=True):
            cell.p_holm = adjusted


def base_line(runs: list[Run], tasks: list[str], resampling: Resampling) -> tuple[Line, list[str]]:
    """The base model's scores (the same in every run that scored them, or a warning says otherwise), with
    intervals over its examples from the first run that kept its predictions."""
    values: dict[str, set[float]] = defaultdict(set)
    for run in runs:
        for task, scores in run.results["base_scores"].items():
            if run.metric(task) in scores:
                values[task].add(100 * scores[run.metric(task)])
    warnings = [f"base-model scores on {task} differ between runs ({', '.join(f'{v:.2f}' for v in sorted(found))}): "
                "different base models or test sets" for task, found in values.items() if len(found) > 1]
    name = f"base model ({', '.join(sorted({run.results['model'] for run in runs}))})"
    evidence = Evidence(name, _base_correctness(runs))
    cells = {task: _with_ci(_stat([statistics.fmean(values[task])] if values[task] else []), evidence, [task],
                            resampling) for task in tasks}
    average = None
    if tasks and all(cells.values()):
        average = _with_ci(_stat([statistics.fmean(cells[task].mean for task in tasks)]), evidence, tasks, resampling)
    return Line("base", name, cells, average, evidence=evidence), warnings


def _base_correctness(runs: list[Run]) -> dict[str, dict[int, tuple[list[int], np.ndarray]]]:
    """The base model's per-example correctness per task, from the first run that kept it (one "seed")."""
    table: dict[str, dict[int, tuple[list[int], np.ndarray]]] = {}
    for run in runs:
        for task, values in run.correctness("base").items():
            table.setdefault(task, {0: values})
    return table


def _mean(value: Stat | float | Paired | None) -> float | None:
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
                           for task in trained for kind in ("train", "dev", "test"))]
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
        notes.append("examples per task (train/dev/test): "
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




def column_notes(rows: list[Row], split: str, reference: Line | None, resampling: Resampling) -> list[str]:
    """What every column of the table means."""
    notes = [
        "Method: the method and its fidelity label (how closely it follows its paper); a variant names the "
        "overrides that differ between its runs. Trainable (share of base): trainable parameters, and their share "
        "of the base model's. Sized: the value a parameter budget chose.",
        "Task columns: 100 × the task's headline metric (named in the header: acc, the choice with the highest "
        "log-likelihood; acc_norm, the highest log-likelihood per character, which does not favour short answers) "
        "on its test examples, scored by lm-eval once after training (nothing was tuned on them); the mean over "
        "seeds, and in brackets its 95 % confidence "
        f"interval from a bootstrap over examples and seeds ({resampling.iterations:,} replicates, seed "
        f"{resampling.seed}); ± the standard deviation over seeds where the runs kept no per-example predictions; "
        "the number of seeds in parentheses where it differs from the row's.",
        "Average: the mean over the task columns of each seed, then over seeds (a seed needs every task); its "
        "interval draws each task's examples separately and the seeds once for all tasks.",
        "Seeds: runs per row. Train s: wall-clock seconds of the fit. Tokens/s: training tokens (every process's) "
        "per second of process 0. Peak MiB: peak memory (see the note on its measure). Prefill ms, Decode ms/tok: "
        "inference latency of the trained model as it was scored (merged where the method merges), batch 1, on the "
        "run's device and precision: one forward over the prompt, and each greedy token after it with the KV cache "
        "(the note on latency gives the lengths). Means over seeds.",
        f"Entropy, Load CV, Dead experts: routing in the {split} pass, averaged over routing sites and seeds: the "
        "routing distribution's entropy per token divided by log(experts) (1 = uniform), the coefficient of "
        "variation of the experts' shares of the selected slots (0 = balanced), and experts that received no "
        "slot. '–' for methods that do not route.",
    ]
    if reference is not None:
        notes.append(f"↳ − {reference.name}: the row's paired difference to the reference, in points, per task "
                     "and for the average, with its 95 % interval (the same examples drawn for both in each "
                     "replicate, each method's own seeds) and the p-value of the paired-bootstrap test of no "
                     "difference, Holm-adjusted over the methods compared with the reference in that column; "
                     f"* marks an adjusted p below {SIGNIFICANCE}. Intervals are not adjusted.")
    notes += [text for method in sorted({row.method for row in rows})
              if (text := getattr(registered_adapters().get(method), "routing_meaning", None))]
    return notes


def cost_notes(rows: list[Row]) -> list[str]:
    """Which measure the peak-memory column holds and how latency was timed; a warning when runs differ."""
    runs = [run.results for row in rows for run in row.runs]
    notes = []
    measures = {results["memory"]["measure"] for results in runs if results.get("memory")}
    descriptions = {"cuda_max_allocated": "CUDA max allocated during the fit",
                    "peak_rss": "the process's peak resident set size up to the end of the fit"}
    if measures:
        text = "; ".join(descriptions.get(measure, measure) for measure in sorted(measures))
        notes.append(("⚠ runs measured peak memory differently: " if len(measures) > 1 else "Peak MiB: ") + text)
    settings = {f"{latency['prompt_tokens']}-token prompt, {latency['new_tokens']} new tokens, on "
                f"{latency['device']} in {latency.get('precision', '?')}" for results in runs
                if (latency := results.get("latency"))}
    if settings:
        text = "; ".join(sorted(settings))
        notes.append(("⚠ runs timed latency differently: " if len(settings) > 1 else "Latency: ") + text
                     + " (on a shared CPU the absolute times are rough; compare rows measured together)")
    return notes


def prediction_notes(lines: list[Line], tasks: list[str]) -> list[str]:
    """Lines whose cells have no interval because their runs kept no per-example predictions, and the
    intervals and differences that their predictions could not give (examples that do not match)."""
    lacking = [line.name for line in lines if line.kind in ("ours", "base") and line.evidence is not None
               and any(isinstance(cell, Stat) and task not in line.evidence.table for task, cell in line.cells.items())]
    notes = [f"{name}: no per-example predictions for some tasks (runs from before they were kept): no interval "
             "and no paired difference there" for name in lacking]
    return notes + [problem for line in lines if line.evidence is not None for problem in line.evidence.problems]


# ------------------------------------------------------------------------------------------------ output


def _p(value: float) -> str:
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def _cell(value: Stat | float | Paired | None, kind: str, seeds: int | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, Paired):
        ci = value.ci
        text = f"{100 * ci.value:+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] {_p(value.p_holm)}"
        return text + (" *" if value.significant else "")
    if isinstance(value, Stat):
        if value.ci is not None:
            text = f"{value.mean:.1f} [{100 * value.ci.low:.1f}, {100 * value.ci.high:.1f}]"
        else:
            text = f"{value.mean:.1f}" + (f" ± {value.std:.1f}" if value.std is not None else "")
        return text + (f" ({value.n})" if seeds is not None and value.n != seeds else "")
    return f"{value:+.1f}" if kind == "difference" else f"{value:.1f}"


def _number(value: Stat | None, digits: int) -> str:
    return "–" if value is None else f"{value.mean:,.{digits}f}"


def table(lines: list[Line], tasks: list[str], metrics: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """The header and the text cells of every line: what the Markdown and the LaTeX table both show."""
    sized = any(line.sized for line in lines)
    header = (["Method", "Trainable (share of base)"] + (["Sized"] if sized else [])
              + [f"{task} ({metrics[task]})" for task in tasks] + [f"Average ({metric_label(metrics)})", "Seeds"]
              + [title for _, title, *_ in COST_COLUMNS] + ["Entropy", "Load CV", "Dead experts"])
    body = []
    for line in lines:
        cells = [line.name, line.parameters or "–"] + ([line.sized or "–"] if sized else [])
        cells += [_cell(line.cells.get(task), line.kind, line.seeds) for task in tasks]
        cells += [_cell(line.average, line.kind, line.seeds), str(line.seeds) if line.seeds else "–"]
        cells += [_number(line.costs.get(name), decimals) for name, _, _, decimals in COST_COLUMNS]
        cells += [_number(line.routing.get(name), digits)
                  for name, digits in (("entropy", 3), ("load_cv", 3), ("dead_experts", 1))]
        body.append(cells)
    return header, body


def render_markdown(title: str, header: list[str], body: list[list[str]], notes: dict[str, list[str]]) -> str:
    out = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    for heading, items in notes.items():
        if items:
            out += ["", f"## {heading}", ""] + [f"- {item}" for item in items]
    return "\n".join(out) + "\n"


LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "−": "$-$", "–": "--",
         "↳": r"$\hookrightarrow$", "<": r"$<$", "·": r"$\cdot$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX.get(character, character) for character in text)


def render_latex(header: list[str], body: list[list[str]], caption: str) -> str:
    """The table as a LaTeX ``table`` with booktabs rules (``\\usepackage{booktabs}``)."""
    rows = [" & ".join(latex_escape(cell) for cell in cells) + r" \\" for cells in body]
    return "\n".join([r"\begin{table}", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
                      r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                      " & ".join(latex_escape(cell) for cell in header) + r" \\", r"\midrule", *rows,
                      r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def write_csv(path: Path, lines: list[Line], tasks: list[str]) -> None:
    """Every number of the table, unrounded: scores and differences in points, intervals, p-values."""
    stat_columns = [*tasks, "average"]
    suffixes = ("", "_std", "_n", "_low", "_high", "_p", "_p_holm")
    header = (["kind", "name", "method", "fidelity", "variant", "protocol", "trainable", "trainable_share", "sized",
               "seeds"] + [f"{c}{suffix}" for c in stat_columns for suffix in suffixes]
              + [name for name, *_ in COST_COLUMNS] + list(ROUTING_COLUMNS))
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
                values += _csv_values(line.average if column == "average" else line.cells.get(column))
            values += ["" if line.costs.get(name) is None else line.costs[name].mean for name, *_ in COST_COLUMNS]
            values += ["" if line.routing.get(name) is None else line.routing[name].mean for name in ROUTING_COLUMNS]
            writer.writerow(values)


def _csv_values(value: Stat | float | Paired | None) -> list:
    """value, std, n, low, high, p, p_holm of one cell (in points; blanks where a cell has no such part)."""
    if isinstance(value, Paired):
        ci = value.ci
        return [100 * ci.value, "", "", 100 * ci.low, 100 * ci.high, ci.p, value.p_holm]
    if isinstance(value, Stat):
        ci = value.ci
        return [value.mean, "" if value.std is None else value.std, value.n,
                "" if ci is None else 100 * ci.low, "" if ci is None else 100 * ci.high, "", ""]
    return ["" if value is None else value, "", "", "", "", "", ""]


@dataclass
class Comparison:
    markdown: Path
    csv: Path
    figure: Path | None
    text: str
    unfinished: list[str] = field(default_factory=list)  # failed or interrupted jobs, folders without results
    latex: Path | None = None
    figures: list[Path] = field(default_factory=list)  # learning curves and accuracies, PNG and PDF
    table: tuple[list[str], list[list[str]]] = field(default_factory=lambda: ([], []))  # header, text cells
    runs: list[Run] = field(default_factory=list)


def compare(sweep_dir: str | Path, out_dir: str | Path | None = None, split: str = "dev",
            reference: str = "lora", resampling: Resampling | None = None) -> Comparison:
    """Write ``comparison.md``, ``comparison.csv``, ``comparison.tex``, the learning-curve and accuracy
    figures and ``expert_maps.png`` (when a method routes) for the runs under ``sweep_dir``, into ``out_dir``
    (default: ``sweep_dir``). ``reference`` (a method name or a row's label) is the row every other row is
    compared with."""
    resampling = resampling or Resampling()
    sweep = read_sweep(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = group_rows(sweep.runs)
    tasks = sorted({task for run in sweep.runs for task in run.scores()})
    metrics, metric_warnings = task_metrics(sweep.runs, tasks)
    show_protocol = len({row.protocol for row in rows}) > 1
    rows, reference_notes = pin_reference(rows, reference)

    base, base_warnings = base_line(sweep.runs, tasks, resampling)
    papers = list({json.dumps(p, sort_keys=True): p for run in sweep.runs
                   if (p := run.results["config"].get("paper"))}.values())
    lines = []
    if any(value is not None for value in base.cells.values()):
        lines.append(base)
        for paper in papers[:1]:
            lines += published_lines(base, paper.get("base"), paper, tasks)
    reference_line = None
    for index, row in enumerate(rows):
        ours = our_line(row, tasks, split, show_protocol, resampling)
        paper = row.runs[0].results["config"].get("paper") or {}
        lines += [ours, *published_lines(ours, (paper.get("methods") or {}).get(row.method), paper, tasks)]
        if index == 0 and reference_notes is not None:
            reference_line = ours
        elif reference_line is not None and (paired := paired_line(ours, reference_line, tasks, resampling)):
            lines.append(paired)
    adjust_across_methods(lines, tasks)

    failures = [f"`{run.folder.relative_to(sweep_dir)}` ({run.results.get('method')}, seed {run.results.get('seed')}) "
                f"{run.results.get('status', 'failed')}: {run.results.get('error')}" for run in sweep.failed]
    notes = {
        "Columns": column_notes(rows, split, reference_line, resampling),
        "Notes": (reference_notes or []) + metric_warnings + protocol_notes(rows) + cost_notes(rows)
                 + budget_notes(rows) + routing_coverage_notes(rows, split)
                 + base_warnings + prediction_notes(lines, tasks) + paper_notes(rows, papers, tasks),
        "Missing or failed runs": failures + sweep.problems + incomplete_cells(rows, tasks, sweep),
    }
    header, body = table(lines, tasks, metrics)
    title = f"moelab comparison: {Path(sweep_dir).resolve().name}"
    text = render_markdown(title, header, body, notes)
    markdown, table_csv, latex = out_dir / "comparison.md", out_dir / "comparison.csv", out_dir / "comparison.tex"
    markdown.write_text(text)
    write_csv(table_csv, lines, tasks)
    latex.write_text(render_latex(header, body, title))
    figures = write_figures(rows, lines, tasks, metrics, out_dir)
    return Comparison(markdown, table_csv, write_comparison_figure(rows, out_dir, split), text,
                      failures + sweep.problems, latex, figures, (header, body), sweep.runs)


def pin_reference(rows: list[Row], reference: str | None) -> tuple[list[Row], list[str] | None]:
    """The rows with the reference first, and a note on the choice; None as the note when no row matches."""
    matches = [row for row in rows if reference in (row.method, row.label, row.name(True))]
    if not matches:
        return rows, None
    notes = [f"Reference: {matches[0].name(False)}; every other row is followed by its paired difference to it."]
    if len(matches) > 1:
        notes.append(f"⚠ {len(matches)} rows match the reference {reference!r}; the first is used, pass a row's "
                     "full name to choose another")
    return [matches[0], *(row for row in rows if row is not matches[0])], notes


def task_metrics(runs: list[Run], tasks: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each task's headline metric, and a warning for every task the runs scored with different metrics."""
    found = {task: sorted({run.metric(task) for run in runs if task in run.scores()}) for task in tasks}
    warnings = [f"⚠ runs differ in the headline metric of {task}: {', '.join(names)}"
                for task, names in found.items() if len(names) > 1]
    return {task: "/".join(names) for task, names in found.items()}, warnings


def routing_coverage_notes(rows: list[Row], split: str) -> list[str]:
    """A warning for every run whose routing statistics of ``split`` hold no tokens of one of its tasks: its
    routing columns and the pooled expert maps then describe only the other tasks."""
    notes = []
    for row in rows:
        for run in row.runs:
            if not (run.folder / ROUTING_FILE).exists():
                continue
            routing = read_routing(run.folder)
            missing = tasks_without_data(routing.stats[split], routing.tasks)
            if missing:
                notes.append(f"⚠ {row.name(False)}, seed {run.results.get('seed')}: the {split} routing pass "
                             f"counted no tokens of {', '.join(missing)}; its Entropy / Load CV / Dead experts and "
                             "the expert maps describe the other tasks only")
    return notes


def write_comparison_figure(rows: list[Row], out_dir: Path, split: str) -> Path | None:
    figure = comparison_figure([(row.name(False), [read_routing(run.folder).stats[split] for run in row.runs
                                                   if (run.folder / ROUTING_FILE).exists()]) for row in rows], split)
    if figure is None:
        return None
    path = out_dir / "expert_maps.png"
    figure.savefig(path, dpi=DPI)
    return path
