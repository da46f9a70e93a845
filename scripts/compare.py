"""Compare the runs of a sweep: a paper-style table (Markdown and CSV) and a figure of the expert maps.

    python scripts/compare.py SWEEP_DIR [--out DIR] [--split heldout|train] [--strict]

Reads every results.json under SWEEP_DIR (a Hydra multirun folder, or any folder of run folders) and writes
comparison.md, comparison.csv and expert_maps.png into SWEEP_DIR (or --out). See moelab/modules/compare.py.
With --strict it exits 1 when a job failed, was interrupted or left no results.json.
"""

import argparse
import sys
from pathlib import Path

from moelab.modules.compare import compare
from moelab.modules.plots import SPLITS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR)")
    parser.add_argument("--split", choices=SPLITS, default="heldout",
                        help="routing statistics of the held-out pass (default) or of the training run")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a job failed, was interrupted or left no results.json")
    args = parser.parse_args()

    result = compare(args.sweep_dir, args.out, args.split)
    print(result.text)
    for path in (result.markdown, result.csv, result.figure):
        if path is not None:
            print(f"[moelab] {path}")
    return 1 if args.strict and result.unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
