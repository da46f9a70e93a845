"""Benchmarks: train-step cost per method (ratios to LoRA r16, FLOP floors, peak memory) and inference latency.

    python scripts/bench.py                                     # the three real shapes, train step (make bench)
    python scripts/bench.py --shape llama3_2_3b --layers 2 --threads 2 --json out.json
    python scripts/bench.py --kind latency --shape smollm2_135m

Random-weight models of real shapes (src/modules/bench.py says what every figure means). Writes one JSON
and one Markdown table per run: --json PATH, or bench_results/bench_<shapes>_<device>_<time>.json and .md.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from moelab.adapters import registered_adapters
from moelab.modules.bench import (
    DEFAULT_LAYERS,
    DEFAULT_SEQ_LEN,
    SHAPES,
    ModelShape,
    TrainBench,
    latency_benchmark,
    markdown_table,
    train_step_benchmark,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
REAL_SHAPES = ["smollm2_135m", "llama3_2_3b", "llama2_7b"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["train", "latency", "both"], default="train")
    parser.add_argument("--shape", default=",".join(REAL_SHAPES),
                        help=f"comma-separated shapes among {sorted(SHAPES)}")
    parser.add_argument("--layers", type=int, default=None,
                        help=f"decoder layers to build (default per shape: {DEFAULT_LAYERS}; None = all)")
    parser.add_argument("--methods", default=",".join(m for m in registered_adapters() if m != "lora"),
                        help="comma-separated methods for the train-step benchmark (LoRA rows are always included)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default per shape: "
                                                                    f"{DEFAULT_SEQ_LEN})")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--json", type=Path, default=None, help="output path (the table goes next to it, .md)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for s in args.shape.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise SystemExit(f"--shape: unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    environment = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                   "dtype": str(dtype), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "command": " ".join(sys.argv)}
    results, tables = [], []
    for shape in shapes:
        layers = args.layers if args.layers is not None else DEFAULT_LAYERS[shape]
        if args.kind in ("train", "both"):
            seq_len = args.seq_len or DEFAULT_SEQ_LEN[shape]
            bench = TrainBench(ModelShape(shape, layers), args.batch_size, seq_len, args.rounds, args.warmup,
                               memory=not args.no_memory)
            result = train_step_benchmark(CONF, bench, [m for m in args.methods.split(",") if m], device, dtype)
            results.append(result)
            tables.append(markdown_table(result))
            print(tables[-1] + "\n", flush=True)
        if args.kind in ("latency", "both"):
            results.append(latency_benchmark(CONF, shape, args.prompt_len, args.new_tokens, args.rounds, args.warmup,
                                             device, dtype))
            print_latency(results[-1])
    path = args.json or Path("bench_results") / (f"bench_{'+'.join(shapes)}_{device.type}_"
                                                 f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment, "results": results}, indent=2))
    if tables:
        path.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    print(f"[moelab] wrote {path}" + (f" and {path.with_suffix('.md')}" if tables else ""))
    return 0


def print_latency(result: dict) -> None:
    for table in ("prefill", "decode_per_token"):
        for row in result[table]:
            print(f"latency {result['shape']:<14} {table:<16} {row['variant']:<18} {row['median_s'] * 1e3:9.2f} ms   "
                  f"x{row['ratio_to_base']:5.2f}")


if __name__ == "__main__":
    sys.exit(main())
