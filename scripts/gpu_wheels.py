"""Download the wheels that scripts/gpu_check.sh needs on a GPU machine without network access.

    python scripts/gpu_wheels.py [--dest .whl]

Such a machine has torch, Lightning, transformers, peft, pandas and pyarrow but not Hydra or lm-eval. Each
package below is fetched at the version installed here, as a CPython 3.12 wheel (pure Python where the
project ships one, built here from its source archive where it ships none), with ``--no-deps``. W&B is left
out: the check logs to CSV. The folder must stay under the 64 MiB that travel with a checkout.
"""

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "lm_eval", "datasets", "evaluate", "dill",
            "multiprocess", "pytablewriter", "DataProperty", "mbstrdecoder", "pathvalidate", "tabledata", "tcolorpy",
            "typepy", "chardet", "rouge-score", "nltk", "sqlitedict", "word2number", "more-itertools"]
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
            *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                          "any")]]
LIMIT_MB = 64


def fetch(requirement: str, dest: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--quiet"]
    binary = subprocess.run([*pip, "download", "--no-deps", *PLATFORM, "-d", str(dest), requirement])
    if binary.returncode != 0:  # a project that publishes only a source archive: build its (pure) wheel here
        subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), requirement], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        fetch(f"{name}=={metadata.version(name)}", args.dest)
    size = sum(path.stat().st_size for path in args.dest.glob("*.whl")) / 2**20
    print(f"[moelab] {len(list(args.dest.glob('*.whl')))} wheels, {size:.1f} MiB in {args.dest}")
    if size > LIMIT_MB:
        print(f"[moelab] more than {LIMIT_MB} MiB: they will not travel with the checkout", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
