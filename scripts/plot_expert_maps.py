"""Draw expert activation maps (layer × expert, per task, and the difference between tasks) of finished runs.

    python scripts/plot_expert_maps.py RUN_DIR [RUN_DIR ...] [--split train|dev] [--per-site] [--out DIR]

Reads RUN_DIR/routing.pt and writes one PNG per kind ("load", "importance") into RUN_DIR/plots (or --out).
Runs of methods that do not route, and folders without routing statistics (a failed job), are reported and
skipped; the exit status is 1 only when no folder could be read.
"""

import argparse
import sys
from pathlib import Path

from moelab.modules.plots import SPLITS, read_routing, tasks_without_data, write_expert_maps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--split", choices=SPLITS, default="dev",
                        help="statistics of the training run or of the dev pass after it (default)")
    parser.add_argument("--per-site", action="store_true", help="one row per routing site instead of per layer")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/plots)")
    args = parser.parse_args()
    if args.out is not None and len(args.run_dirs) > 1:
        parser.error("--out takes one RUN_DIR; with several runs the maps go into each RUN_DIR/plots")

    unreadable = 0
    for run_dir in args.run_dirs:
        try:
            paths = write_expert_maps(run_dir, args.out, args.split, args.per_site)
        except FileNotFoundError as error:  # a failed job of a sweep: its folder says why; go on with the others
            print(f"[moelab] {run_dir}: skipped, {error}", file=sys.stderr)
            unreadable += 1
            continue
        if not paths:
            print(f"[moelab] {run_dir}: no routing statistics ({args.split}); the method does not route")
        routing = read_routing(run_dir)
        missing = tasks_without_data(routing.stats[args.split], routing.tasks)
        if missing:
            print(f"[moelab] warning: {run_dir}: the {args.split} pass counted no tokens of {', '.join(missing)}; "
                  "their panels say 'no data' (a pass cut short by trainer.limit_val_batches?)", file=sys.stderr)
        for path in paths:
            print(f"[moelab] expert map: {path}")
    return 1 if unreadable == len(args.run_dirs) else 0


if __name__ == "__main__":
    sys.exit(main())
