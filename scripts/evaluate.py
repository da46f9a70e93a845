"""Score a saved adapter with lm-eval on the held-out examples of its run (or a subset of them).

    python scripts/evaluate.py RUN_DIR [--limit N] [--unmerged]

Prints the scores and writes RUN_DIR/evaluation.json.
"""

import argparse
import json
import sys
from pathlib import Path

from moelab.adapters import MergeError, merge_and_unload
from moelab.modules.evaluation import lm_eval_scores, mean_score
from moelab.modules.runs import heldout_tasks, load_trained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--unmerged", action="store_true", help="score without merging a mergeable adapter")
    args = parser.parse_args()

    base, adapter = load_trained(args.run_dir)
    model, scored_as = base.model, "unmerged"
    if adapter.mergeable and not args.unmerged:
        try:
            model, scored_as = merge_and_unload(base.model, safe_merge=True), "merged"
        except MergeError as error:
            print(f"[moelab] {error}", file=sys.stderr)
            return 1
    scores = lm_eval_scores(model, base.tokenizer, heldout_tasks(args.run_dir), limit=args.limit,
                            batch_size=args.batch_size)
    report = {"label": adapter.label, "scored_as": scored_as, "limit": args.limit, "scores": scores,
              "mean": mean_score(scores)}
    (args.run_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
    for task, metrics in scores.items():
        print(f"{task:<20} " + "  ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    print(f"{adapter.label} ({scored_as}): mean acc {100 * report['mean']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
