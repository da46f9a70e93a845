"""Comparison tables from run folders written here by hand: rows, mean ± std over seeds, the base model,
published numbers and differences, the single-task protocol, variants, budgets, and what is missing."""

import csv
import json
import os
import runpy
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from test_plots import routed_stats, stats_missing_beta

from moelab.modules.compare import compare
from moelab.modules.comparison_figures import read_curves, seed_band
from moelab.modules.evaluation import write_predictions
from moelab.modules.significance import Resampling
from moelab.modules.summary_run import log_summary, sweep_group

TASKS = ("arc_easy", "piqa")
PAPER = {"source": "Some paper", "table": "Table 1", "model": "Big-LM", "tasks": list(TASKS), "note": "accuracy",
         "base": {"scores": {"arc_easy": 20.0, "piqa": 30.0}},
         "methods": {"lora": {"params": "2.9%", "scores": {"arc_easy": 70.0, "piqa": 80.0}, "average": 74.0},
                     "mor": {"scores": {"arc_easy": 60.0}}}}


def write_run(root, name, method, seed, scores, fidelity="official-code-parity", overrides=(), paper=PAPER,
              routing=None, max_steps=10, budget=None, trainable=1000, lr=2e-4, correct=None, metrics=None,
              costs=None, losses=None):
    """A run folder as training writes it: results.json, .hydra/overrides.yaml, routing.pt when it routes; with
    ``correct`` (task -> 0/1 per example) the predictions of the tuned model, and the base model's (from
    BASE_CORRECT); with ``losses`` (step -> training loss) a CSV log whose last row holds the dev loss."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    summary = ({"routing/entropy": 0.5 + 0.1 * seed, "routing/load_cv": 0.2, "routing/dead_experts": float(seed)}
               if routing else {})
    results = {"status": "ok", "run_name": name, "method": method, "fidelity": fidelity,
               "label": f"{method} [{fidelity}]", "seed": seed, "model": "tiny_random", "model_identity": "tiny:1",
               "parameters": {"base": 100_000, "adapter": trainable, "trainable": trainable,
                              "trainable_share": trainable / 100_000},
               "budget": budget, "data": {"tasks": {task: {"train": 60, "dev": 10, "test": 20} for task in scores}},
               "metric": "auto" if metrics else "acc", "metrics": metrics or dict.fromkeys(scores, "acc"),
               "scores": {task: {"acc": value, "acc_norm": value} for task, value in scores.items()},
               "base_scores": {"arc_easy": {"acc": 0.25, "acc_norm": 0.25}, "piqa": {"acc": 0.5, "acc_norm": 0.5}},
               "routing": {"train": summary, "dev": summary},
               "config": {"trainer": {"max_steps": max_steps}, "data": {"batch_size": 8}, "paper": paper,
                          "module": {"optimizer": {"lr": lr}}}}
    if costs is not None:
        results["timings"] = {"train_s": costs[0], "tokens_per_s": costs[1]}
        results["memory"] = {"peak_mib": costs[2], "measure": "peak_rss"}
        results["latency"] = {"prefill_ms": costs[0] / 10, "decode_ms_per_token": 2.0 * seed, "prompt_tokens": 128,
                              "new_tokens": 16, "device": "cpu", "precision": "32-true"}
    (folder / "results.json").write_text(json.dumps(results))
    if correct is not None:
        write_predictions(folder, {"base": {task: records(BASE_CORRECT[task]) for task in correct},
                                   "tuned": {task: records(values) for task, values in correct.items()}})
    if losses is not None:
        (folder / "csv").mkdir()
        rows = ["step,train/loss,val/ce", *(f"{step},{loss}," for step, loss in losses.items()),
                f"{max(losses)},,{min(losses.values()) + 0.5}"]
        (folder / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}", *overrides]))
    if routing is not None:
        torch.save({"tasks": list(scores), "method": results["label"], "train": routing.state_dict(),
                    "dev": routing.state_dict()}, folder / "routing.pt")
    return folder


def records(correct: list[int]) -> list[dict]:
    """Prediction records with a given correctness (both metrics), as the run folder holds them."""
    return [{"doc_id": index, "gold": 0, "choice": 1 - value, "acc": value, "acc_norm": value}
            for index, value in enumerate(correct)]


N = 60
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BASE_CORRECT = {"arc_easy": [1] * 15 + [0] * 45, "piqa": [1] * 30 + [0] * 30}
LORA = {0: (0.60, 0.70), 1: (0.64, 0.74), 2: (0.62, 0.78)}
MIXLORA = {0: (0.70, 0.80), 1: (0.72, 0.82)}


@pytest.fixture
def sweep(tmp_path):
    for seed, values in LORA.items():
        write_run(tmp_path, f"{seed}_lora-seed{seed}", "lora", seed, dict(zip(TASKS, values, strict=True)))
    for seed, values in MIXLORA.items():
        write_run(tmp_path, f"{3 + seed}_mixlora-seed{seed}", "mixlora", seed, dict(zip(TASKS, values, strict=True)),
                  routing=routed_stats(tasks=2))
    write_run(tmp_path, "5_mor-seed0", "mor", 0, {"arc_easy": 0.5, "piqa": 0.6}, fidelity="reconstruction",
              routing=routed_stats(tasks=2))
    failed = tmp_path / "6_mixlora-seed2"
    failed.mkdir()
    (failed / "results.json").write_text(json.dumps({"status": "failed", "method": "mixlora", "seed": 2,
                                                     "error": "AdapterConfigError: r (0) must be a positive integer"}))
    (tmp_path / "7_mor-seed1" / ".hydra").mkdir(parents=True)  # a killed job: no results.json
    return tmp_path


def csv_lines(path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def table_rows(path) -> dict[str, dict[str, str]]:
    """CSV lines by ``kind:method`` (``kind:name`` for the base model's lines)."""
    return {f"{row['kind']}:{row['method'] or row['name']}": row for row in csv_lines(path)}


def test_rows_hold_mean_and_std_over_seeds(sweep):
    result = compare(sweep)
    rows = table_rows(result.csv)
    lora = rows["ours:lora"]
    arc = [100 * values[0] for values in LORA.values()]
    assert float(lora["arc_easy"]) == pytest.approx(statistics.fmean(arc))
    assert float(lora["arc_easy_std"]) == pytest.approx(statistics.stdev(arc)) and lora["arc_easy_n"] == "3"
    averages = [100 * statistics.fmean(values) for values in LORA.values()]
    assert float(lora["average"]) == pytest.approx(statistics.fmean(averages))
    assert float(lora["average_std"]) == pytest.approx(statistics.stdev(averages))
    assert lora["trainable"] == "1000" and float(lora["trainable_share"]) == pytest.approx(0.01)
    mixlora = rows["ours:mixlora"]
    assert mixlora["seeds"] == "2" and float(mixlora["entropy"]) == pytest.approx(0.55)
    assert float(mixlora["dead_experts"]) == pytest.approx(0.5) and lora["entropy"] == ""
    assert float(rows["base:base model (tiny_random)"]["piqa"]) == pytest.approx(50.0)
    row = next(line for line in result.text.splitlines() if line.startswith("| lora"))
    assert f"{statistics.fmean(arc):.1f} ± {statistics.stdev(arc):.1f}" in row and "1,000 (1%)" in row


def test_published_numbers_sit_under_their_method_with_the_difference(sweep):
    result = compare(sweep)
    rows = table_rows(result.csv)
    assert float(rows["published:lora"]["arc_easy"]) == 70.0 and float(rows["published:lora"]["average"]) == 74.0
    ours = float(rows["ours:lora"]["arc_easy"])
    assert float(rows["difference:lora"]["arc_easy"]) == pytest.approx(ours - 70.0)
    assert float(rows["difference:lora"]["average"]) == pytest.approx(float(rows["ours:lora"]["average"]) - 74.0)
    assert "published:mixlora" not in rows, "no published numbers, no published row"
    assert rows["published:mor"]["average"] == "", "one published task of two: no published average"
    base_published = next(line for line in result.text.splitlines() if line.startswith("| ↳ published"))
    assert "| 20.0 | 30.0 | 25.0 |" in base_published
    lines = result.text.splitlines()
    mor_published = lines[lines.index(next(line for line in lines if line.startswith("| mor"))) + 1]
    assert "not a reproduction" in mor_published
    assert "`reconstruction` methods" in result.text and "mor [reconstruction]" in result.text
    assert "Published numbers: Some paper, Table 1, Big-LM. accuracy" in result.text


def test_failed_killed_and_missing_runs_are_listed(sweep):
    text = compare(sweep).text
    missing = text.split("## Missing or failed runs")[1]
    assert "6_mixlora-seed2` (mixlora, seed 2) failed: AdapterConfigError: r (0) must be a positive integer" in missing
    assert "7_mor-seed1` has no results.json" in missing
    assert "mixlora [official-code-parity]: no arc_easy score for seed(s) 2" in missing
    assert "mor [reconstruction]: no piqa score for seed(s) 1, 2" in missing
    assert "- lora [official-code-parity]: no" not in missing


def test_the_figure_shows_every_routed_method(sweep, tmp_path):
    result = compare(sweep, tmp_path / "out")
    assert result.figure == tmp_path / "out" / "expert_maps.png" and result.figure.stat().st_size > 0
    assert result.markdown.parent == tmp_path / "out"


def test_single_task_runs_fill_one_row_and_a_seed_needs_every_task_for_its_average(tmp_path):
    for seed in (0, 1):
        for task, value in zip(TASKS, (0.5 + seed / 10, 0.7), strict=True):
            write_run(tmp_path, f"{task}-{seed}", "mixlora", seed, {task: value}, paper=None,
                      overrides=[f"data.tasks=[{task}]", "adapter=mixlora"])
    write_run(tmp_path, "arc_easy-2", "mixlora", 2, {"arc_easy": 0.9}, paper=None,
              overrides=["data.tasks=[arc_easy]", "adapter=mixlora"])
    rows = table_rows(compare(tmp_path).csv)
    assert list(rows) == ["base:base model (tiny_random)", "ours:mixlora"], "one row, no per-task variants"
    row = rows["ours:mixlora"]
    assert row["protocol"] == "single-task" and row["arc_easy_n"] == "3" and row["piqa_n"] == "2"
    assert row["average_n"] == "2", "seed 2 has no piqa run"
    assert float(row["average"]) == pytest.approx(statistics.fmean([60.0, 65.0]))


def test_overrides_that_vary_split_a_method_into_rows(tmp_path):
    for top_k in (1, 2):
        for seed in (0, 1):
            write_run(tmp_path, f"k{top_k}-{seed}", "mixlora", seed, {"arc_easy": 0.5}, max_steps=10 * top_k,
                      paper=None, overrides=["experiment=demo", f"adapter.top_k={top_k}"])
    result = compare(tmp_path)
    names = [row["name"] for row in csv_lines(result.csv) if row["kind"] == "ours"]
    assert names == [f"mixlora [official-code-parity] · adapter.top_k={top_k}" for top_k in (1, 2)]
    assert "⚠ runs differ in training steps: 10 (mixlora); 20 (mixlora)" in result.text


def test_runs_that_differ_in_learning_rate_are_flagged(tmp_path):
    write_run(tmp_path, "lora", "lora", 0, {"arc_easy": 0.5}, paper=None, lr=2e-4)
    write_run(tmp_path, "mixlora", "mixlora", 0, {"arc_easy": 0.6}, paper=None, lr=6e-4)
    assert "⚠ runs differ in learning rate: 0.0002 (lora); 0.0006 (mixlora)" in compare(tmp_path).text


def test_budgets_show_the_size_chosen_and_the_rule(tmp_path):
    rule = "trainable parameters matched to lora(r=80) = 1,000"
    for method, value, error in (("lora", 80, 0.0), ("mixlora", 17, 0.01), ("furina", 1, 1.13)):
        write_run(tmp_path, method, method, 0, {"arc_easy": 0.5}, paper=None,
                  budget={"rule": rule, "sized": True, "field": "r", "value": value, "relative_error": error,
                          "sizing": f"{method}.r = {value}: {error:+.0%} of the target"})
    result = compare(tmp_path)
    rows = table_rows(result.csv)
    assert rows["ours:lora"]["sized"] == "r=80" and rows["ours:mixlora"]["sized"] == "r=17"
    assert f"parameter budget: {rule}" in result.text and "| Sized |" in result.text
    warnings = [line for line in result.text.splitlines() if "off the budget" in line]
    assert warnings == ["- ⚠ furina [official-code-parity]: furina.r = 1: +113% of the target: off the budget by "
                        "more than 5%"]
    assert "published" not in result.text.lower()


def test_an_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        compare(tmp_path)


# -- intervals, paired differences to the reference, costs, LaTeX and figures -----------------------------

REFERENCE = [1] * 48 + [0] * 12  # 80 % right


def flip(values: list[int], indices) -> list[int]:
    return [1 - value if index in indices else value for index, value in enumerate(values)]


@pytest.fixture
def paired_sweep(tmp_path):
    """lora (the reference), its exact opposite, an identical copy and one that is right on one more example,
    two seeds each, every one with the same predictions on both tasks."""
    methods = {"lora": REFERENCE, "opposite": [1 - v for v in REFERENCE], "same": REFERENCE,
               "one_more": flip(REFERENCE, {59})}
    for method, correct in methods.items():
        for seed in (0, 1):
            write_run(tmp_path, f"{method}-{seed}", method, seed, dict.fromkeys(TASKS, statistics.fmean(correct)),
                      paper=None, correct=dict.fromkeys(TASKS, correct), costs=(100.0 + seed, 50.0, 600.0),
                      metrics={"arc_easy": "acc", "piqa": "acc_norm"},
                      losses={step: 3.0 - 0.1 * step - 0.05 * seed for step in range(5)})
    return tmp_path


def test_the_reference_comes_first_and_every_other_method_gets_a_paired_difference(paired_sweep):
    result = compare(paired_sweep, resampling=Resampling(2000, 0))
    lines = csv_lines(result.csv)
    assert [(line["kind"], line["method"]) for line in lines[:2]] == [("base", ""), ("ours", "lora")]
    paired = {previous["method"]: line for previous, line in zip(lines, lines[1:], strict=False)
              if line["kind"] == "paired"}
    assert set(paired) == {"opposite", "same", "one_more"} and "lora" not in paired
    for column in ("arc_easy", "piqa", "average"):
        assert float(paired["opposite"][column]) == pytest.approx(-60.0)
        assert float(paired["opposite"][f"{column}_high"]) < 0 and float(paired["opposite"][f"{column}_p_holm"]) < 0.05
        assert float(paired["same"][column]) == 0.0 and float(paired["same"][f"{column}_p_holm"]) == 1.0
        assert float(paired["one_more"][column]) == pytest.approx(100 / N)
        assert float(paired["one_more"][f"{column}_low"]) <= 0 and float(paired["one_more"][f"{column}_p_holm"]) > 0.3
        p, adjusted = float(paired["opposite"][f"{column}_p"]), float(paired["opposite"][f"{column}_p_holm"])
        assert adjusted == pytest.approx(min(1.0, 3 * p)), "the smallest of three p-values: times three"
    rows = [row for row in result.text.splitlines() if row.startswith("| ↳ − lora")]
    assert len(rows) == 3 and sum(row.count(" *") for row in rows) == 3, "only the opposite method is marked"


def test_cells_carry_bootstrap_intervals_and_the_header_names_each_tasks_metric(paired_sweep):
    result = compare(paired_sweep, resampling=Resampling(2000, 0))
    rows = table_rows(result.csv)
    lora = rows["ours:lora"]
    assert float(lora["arc_easy"]) == pytest.approx(80.0)
    assert 65 < float(lora["arc_easy_low"]) < 80 < float(lora["arc_easy_high"]) < 92
    base = rows["base:base model (tiny_random)"]
    assert float(base["arc_easy_low"]) < 25.0 < float(base["arc_easy_high"])
    assert "| arc_easy (acc) | piqa (acc_norm) | Average (headline) |" in result.text
    assert "bootstrap over examples and seeds (2,000 replicates, seed 0)" in result.text
    assert compare(paired_sweep, resampling=Resampling(2000, 0)).text == result.text, "seeded: reproducible"


def test_cost_columns_and_the_latex_table(paired_sweep):
    result = compare(paired_sweep, resampling=Resampling(200, 0))
    lora = table_rows(result.csv)["ours:lora"]
    assert float(lora["train_s"]) == pytest.approx(100.5) and float(lora["peak_mib"]) == 600.0
    assert "| Train s | Tokens/s | Peak MiB | Prefill ms | Decode ms/tok |" in result.text
    assert "Peak MiB: the process's peak resident" in result.text
    assert float(lora["prefill_ms"]) == pytest.approx(10.05) and float(lora["decode_ms"]) == pytest.approx(1.0)
    assert "Latency: 128-token prompt, 16 new tokens, on cpu in 32-true" in result.text
    latex = result.latex.read_text()
    assert latex.count(r"\toprule") == latex.count(r"\midrule") == latex.count(r"\bottomrule") == 1
    assert r"arc\_easy (acc)" in latex and r"$\hookrightarrow$ $-$ lora" in latex
    assert latex.count(r" \\") == 1 + len(csv_lines(result.csv))


def test_learning_curves_and_accuracy_figures_as_png_and_pdf(paired_sweep, tmp_path):
    result = compare(paired_sweep, tmp_path / "out", resampling=Resampling(200, 0))
    names = sorted(path.name for path in result.figures)
    assert names == ["accuracy.pdf", "accuracy.png", "learning_curves.pdf", "learning_curves.png"]
    assert all(path.stat().st_size > 0 and path.parent == tmp_path / "out" for path in result.figures)


def test_a_missing_reference_gives_no_paired_rows(paired_sweep):
    result = compare(paired_sweep, reference="mixlora", resampling=Resampling(200, 0))
    assert not [line for line in csv_lines(result.csv) if line["kind"] == "paired"]
    assert "Reference:" not in result.text


def test_routing_columns_say_what_routing_means_for_router_free_and_dense_gate_methods(tmp_path):
    for method in ("furina", "mole"):
        write_run(tmp_path, method, method, 0, {"arc_easy": 0.5}, paper=None)
    text = compare(tmp_path).text
    assert "FURINA has no router" in text and "MoLE's gate is dense" in text


def test_a_routing_pass_that_missed_a_task_is_warned_about(tmp_path, capsys, monkeypatch):
    scores = {"alpha": 0.5, "beta": 0.6, "gamma": 0.7}
    folder = write_run(tmp_path, "mixlora", "mixlora", 0, scores, paper=None, routing=stats_missing_beta())
    write_run(tmp_path, "mor", "mor", 0, scores, paper=None, routing=routed_stats(tasks=3))
    notes = [line for line in compare(tmp_path).text.splitlines() if "counted no tokens" in line]
    assert len(notes) == 1 and "mixlora" in notes[0] and "tokens of beta" in notes[0]
    monkeypatch.setattr("sys.argv", ["plot_expert_maps.py", str(folder)])
    runpy.run_path(str(SCRIPTS / "plot_expert_maps.py"), run_name="not_main")["main"]()
    assert "counted no tokens of beta" in capsys.readouterr().err


def test_the_summary_wandb_run_holds_the_table_and_figures_offline(paired_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # offline unless asked for: the flag decides, not the shell
    out = tmp_path / "out"
    result = compare(paired_sweep, out, resampling=Resampling(100, 0))
    folder = log_summary(result, paired_sweep, out)
    assert folder is not None and folder.parent == out / "wandb" and folder.name.startswith("offline-run-")
    assert list(folder.glob("run-*.wandb")) and os.environ["WANDB_MODE"] == "offline"
    assert sweep_group(result.runs, paired_sweep) == paired_sweep.name


def test_predictions_on_other_examples_give_no_interval_or_difference_and_say_why(tmp_path):
    write_run(tmp_path, "lora", "lora", 0, {"arc_easy": 0.8}, paper=None, correct={"arc_easy": REFERENCE})
    write_run(tmp_path, "mixlora", "mixlora", 0, {"arc_easy": 0.8}, paper=None, correct={"arc_easy": REFERENCE[:30]})
    write_run(tmp_path, "mor-0", "mor", 0, {"arc_easy": 0.8}, paper=None, correct={"arc_easy": REFERENCE})
    write_run(tmp_path, "mor-1", "mor", 1, {"arc_easy": 0.8}, paper=None, correct={"arc_easy": REFERENCE[:30]})
    write_run(tmp_path, "furina", "furina", 0, {"arc_easy": 0.5}, paper=None)  # no predictions kept
    result = compare(tmp_path, resampling=Resampling(100, 0))
    rows = table_rows(result.csv)
    assert rows["ours:mixlora"]["arc_easy_low"] != "" and rows["ours:mor"]["arc_easy_low"] == ""
    assert [line["name"] for line in csv_lines(result.csv) if line["kind"] == "paired"] == []
    assert "⚠ mixlora [official-code-parity]: scored on other examples than lora [official-code-parity] on " \
           "arc_easy: no paired difference there" in result.text
    assert "⚠ mor [official-code-parity]: the seeds' predictions on arc_easy hold different examples" in result.text
    assert "furina [official-code-parity]: no per-example predictions for some tasks" in result.text
    assert "lora [official-code-parity]: no per-example" not in result.text


def test_curves_average_the_seeds_at_the_steps_all_of_them_logged(tmp_path):
    for seed, losses in ((0, {0: 3.0, 1: 2.0, 2: 1.0}), (1, {0: 5.0, 1: 4.0})):
        write_run(tmp_path, f"lora-{seed}", "lora", seed, {"arc_easy": 0.5}, paper=None, losses=losses)
    curves = [read_curves(tmp_path / f"lora-{seed}") for seed in (0, 1)]
    assert curves[0] == {"train/loss": {0: 3.0, 1: 2.0, 2: 1.0}, "val/ce": {2: 1.5}}
    assert seed_band([curve["train/loss"] for curve in curves]) == ([0, 1], [4.0, 3.0], [3.0, 2.0], [5.0, 4.0])
    assert read_curves(tmp_path / "no-such-run") == {}
