"""Export a trained run as a plain transformers checkpoint (mergeable methods: LoRA, FURINA).

    python scripts/export_merged.py RUN_DIR OUT_DIR [--peft]

OUT_DIR then loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``, without moelab. With --peft,
OUT_DIR/peft also holds the whole adapter as one PEFT LoRA (rank = total rank, lora_alpha = rank).
"""

import argparse
import sys
from pathlib import Path

from moelab.adapters import MergeError
from moelab.modules.export import PEFT_FOLDER, export_merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--peft", action="store_true", help="also write the adapter in PEFT's LoRA format")
    args = parser.parse_args()
    try:
        out = export_merged(args.run_dir, args.out_dir, peft=args.peft)
    except MergeError as error:
        print(f"[moelab] {error}", file=sys.stderr)
        return 1
    print(f"[moelab] merged model: {out}")
    if args.peft:
        print(f"[moelab] PEFT LoRA: {out / PEFT_FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
