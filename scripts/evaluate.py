"""Score a saved adapter with lm-eval on the test (or dev) examples of its run, or a subset of them.

    python scripts/evaluate.py RUN_DIR [--split test|dev] [--limit N] [--num-fewshot K] [--max-length L]
                               [--batch-size B] [--unmerged]

By default the run's own eval protocol is used (``config.eval`` of RUN_DIR/results.json: limit, few-shot
count, maximum length, batch size), so that the scores compare with the ones the run reported; each option
overrides one setting. A folder without results.json (an adapter converted by scripts/convert_mixlora.py)
gets the defaults of conf/eval/default.yaml. Prints the scores and writes RUN_DIR/evaluation.json
(evaluation_dev.json for dev).
"""

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from moelab.adapters import MergeError, merge_and_unload
from moelab.modules.evaluation import lm_eval_scores, mean_score, metric_label
from moelab.modules.runs import load_trained, split_tasks

EVAL_DEFAULTS = Path(__file__).resolve().parents[1] / "conf" / "eval" / "default.yaml"
# the lm_eval_scores arguments that change the scores (bootstrap_iters changes only the dropped stderr)
PROTOCOL = ("limit", "num_fewshot", "max_length", "batch_size")


def run_protocol(run_dir: Path) -> dict:
    """The eval settings ``run_dir`` was scored with: its results.json's ``config.eval``, else conf's defaults."""
    results = run_dir / "results.json"
    if results.exists():
        settings = json.loads(results.read_text()).get("config", {}).get("eval")
        if settings is None:
            raise ValueError(f"{results} holds no config.eval: pass every eval setting on the command line")
    else:
        settings = OmegaConf.to_container(OmegaConf.load(EVAL_DEFAULTS))
    return {name: settings.get(name) for name in PROTOCOL}


def run_metrics(run_dir: Path) -> dict[str, str] | str:
    """The headline metric of each task as the run recorded it (results.json's ``metrics``), so that the mean
    compares with the run's; ``acc`` for a folder without one."""
    results = run_dir / "results.json"
    return (json.loads(results.read_text()).get("metrics") if results.exists() else None) or "acc"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="the run's test examples (its reported scores) or its dev examples")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: the run's)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the run's)")
    parser.add_argument("--max-length", type=int, default=None, help="context length (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    parser.add_argument("--unmerged", action="store_true", help="score without merging a mergeable adapter")
    args = parser.parse_args()

    overrides = {name: getattr(args, name) for name in PROTOCOL if getattr(args, name) is not None}
    protocol = {**run_protocol(args.run_dir), **overrides}
    base, adapter = load_trained(args.run_dir)
    model, scored_as = base.model, "unmerged"
    if adapter.mergeable and not args.unmerged:
        try:
            model, scored_as = merge_and_unload(base.model, safe_merge=True), "merged"
        except MergeError as error:
            print(f"[moelab] {error}", file=sys.stderr)
            return 1
    scores = lm_eval_scores(model, base.tokenizer, split_tasks(args.run_dir, args.split), **protocol)
    metrics = run_metrics(args.run_dir)
    report = {"label": adapter.label, "split": args.split, "scored_as": scored_as, "protocol": protocol,
              "overridden": sorted(overrides),
              "scores": scores, "metrics": metrics, "mean": mean_score(scores, metrics)}
    name = "evaluation.json" if args.split == "test" else f"evaluation_{args.split}.json"
    (args.run_dir / name).write_text(json.dumps(report, indent=2))
    for task, values in scores.items():
        print(f"{task:<20} " + "  ".join(f"{k} {100 * v:.2f}" for k, v in values.items()))
    label = metrics if isinstance(metrics, str) else metric_label(metrics)
    mean = "n/a (no scored task has the run's headline metric)" if report["mean"] is None else \
        f"{100 * report['mean']:.2f}"
    print(f"{adapter.label} ({scored_as}, {args.split}): mean {label} {mean}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
