"""Benchmarks: train-step time per method (ratios to LoRA r16) and inference latency (ratios to the base).

    python scripts/bench.py                                   # CPU, SmolLM2-135M shapes, all methods
    python scripts/bench.py --shape llama3_2_3b --batch-size 8 --seq-len 512   # on a GPU machine
    python scripts/bench.py --kind latency

Random-weight models of real shapes; one JSON per run under --out (default bench_results/).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from moelab.adapters import registered_adapters
from moelab.modules.bench import SHAPES, latency_benchmark, train_step_benchmark

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["train", "latency", "both"], default="both")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    parser.add_argument("--methods", default=",".join(m for m in registered_adapters() if m != "lora"),
                        help="comma-separated methods for the train-step benchmark (LoRA r16 is always included)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    environment = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                   "dtype": str(dtype), "threads": torch.get_num_threads(), "torch": torch.__version__}
    results = []
    if args.kind in ("train", "both"):
        methods = [m for m in args.methods.split(",") if m]
        results.append(train_step_benchmark(CONF, args.shape, methods, args.batch_size, args.seq_len, args.rounds,
                                            args.warmup, device, dtype))
    if args.kind in ("latency", "both"):
        results.append(latency_benchmark(CONF, args.shape, args.prompt_len, args.new_tokens, args.rounds, args.warmup,
                                         device, dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_{args.shape}_{device.type}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"environment": environment, "results": results}, indent=2))
    for result in results:
        for table in ("rows", "prefill", "decode_per_token"):
            for row in result.get(table, []):
                ratio = next(v for k, v in row.items() if k.startswith("ratio_to_"))
                print(f"{result['kind']:<10} {table:<16} {row['variant']:<18} {row['median_s'] * 1e3:9.2f} ms   "
                      f"x{ratio:5.2f}")
    print(f"[moelab] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
