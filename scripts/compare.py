"""Compare the runs of a sweep: a paper-style table with confidence intervals and paired differences to a
reference method (Markdown, CSV, LaTeX), learning curves, per-task accuracies and the expert maps.

    python scripts/compare.py SWEEP_DIR [--out DIR] [--split dev|train] [--reference lora]
                              [--bootstrap 10000] [--bootstrap-seed 0] [--wandb [--wandb-online]] [--strict]

Reads every results.json under SWEEP_DIR (a Hydra multirun folder, or any folder of run folders) and writes
comparison.md, comparison.csv, comparison.tex, learning_curves.{png,pdf}, accuracy.{png,pdf} and
expert_maps.png into SWEEP_DIR (or --out). See moelab/modules/compare.py. With --strict it exits 1 when a
job failed, was interrupted or left no results.json. With --wandb the table and the figures also go to one
W&B run in the sweep's group, offline (files under OUT/wandb, for `wandb sync`) unless --wandb-online.
"""

import argparse
import sys
from pathlib import Path

from moelab.modules.compare import compare
from moelab.modules.plots import SPLITS
from moelab.modules.significance import Resampling
from moelab.modules.summary_run import log_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR)")
    parser.add_argument("--split", choices=SPLITS, default="dev",
                        help="routing statistics of the dev pass (default) or of the training run")
    parser.add_argument("--reference", default="lora",
                        help="the method (or a row's label) listed first and compared with every other row "
                             "(default: lora)")
    parser.add_argument("--bootstrap", type=int, default=Resampling.iterations,
                        help=f"bootstrap replicates for intervals and tests (default: {Resampling.iterations})")
    parser.add_argument("--bootstrap-seed", type=int, default=Resampling.seed,
                        help="seed of the bootstrap: the same seed gives the same table (default: 0)")
    parser.add_argument("--wandb", action="store_true",
                        help="log the table and figures to one W&B run in the sweep's group (offline by default)")
    parser.add_argument("--wandb-online", action="store_true", help="with --wandb: log online (needs an account)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a job failed, was interrupted or left no results.json")
    args = parser.parse_args()

    if args.wandb_online and not args.wandb:
        parser.error("--wandb-online needs --wandb")
    if args.bootstrap < 1:
        parser.error(f"--bootstrap ({args.bootstrap}) must be at least 1")
    result = compare(args.sweep_dir, args.out, args.split, args.reference,
                     Resampling(args.bootstrap, args.bootstrap_seed))
    print(result.text)
    if args.wandb:
        folder = log_summary(result, args.sweep_dir, args.out or args.sweep_dir, online=args.wandb_online)
        print(f"[moelab] W&B summary run: {folder}")
    for path in (result.markdown, result.csv, result.latex, *result.figures, result.figure):
        if path is not None:
            print(f"[moelab] {path}")
    return 1 if args.strict and result.unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
