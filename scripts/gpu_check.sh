#!/usr/bin/env bash
# The accelerator path in one prepared run (make gpu-check): the GPU-marked tests (among them the grouped experts'
# torch._grouped_mm against their torch.mm loop), the tiny command for every method on the GPU (bf16-mixed,
# lm-eval on the GPU), DDP and FSDP with one device, and the speed benchmark at Llama-3.2-3B shapes. Everything
# lands in $OUT (default gpu_check_out/), summed up in gpu_check.json.
#
#   scripts/gpu_check.sh             on a GPU machine (about 5 minutes on one H100/H200)
#   scripts/gpu_check.sh --dry-run   the same steps on the CPU, small: what CI runs to test this script
#
# On a machine without network access but with torch, Lightning and transformers, the missing packages come
# from the wheels in .whl/ (make gpu-wheels), installed into a private folder with --no-deps; moelab itself
# is imported from this checkout, with whatever torch the machine has.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

# moelab and the packages this machine lacks
if ! "$PY" -c "import moelab, hydra, lm_eval" 2>/dev/null; then
  site=/tmp/moelab_site
  mkdir -p "$site"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  fi
  ln -sfn "$PWD/src" "$site/moelab"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ((dry_run)); then  # the same steps, as small as they go: CI runs this
  accelerator=cpu steps=2 limit=4 bench=(--shape tiny --rounds 1 --threads 1 --no-memory)
else
  accelerator=gpu steps=5 limit=8 bench=(--shape llama3_2_3b --layers 4 --batch-size 8 --seq-len 512)
fi
methods=$("$PY" -c "from moelab.adapters import registered_adapters as r; print(','.join(sorted(r())))")
tiny=(model=tiny_random data=tiny trainer.max_steps=$steps eval.limit=$limit logger=csv paths.cache_dir="$OUT/cache")

steps=()
step() {  # step NAME COMMAND...: run it, log it, remember its status and time
  local name=$1; shift
  local started=$SECONDS
  echo "[gpu_check] $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  steps+=("$name:$status:$((SECONDS - started))")
  echo "[gpu_check] $name: exit $status after $((SECONDS - started)) s"
}

step tests env MOELAB_TEST_ACCELERATOR=$accelerator "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step methods "$PY" scripts/train.py -m "adapter=$methods" trainer=gpu "trainer.accelerator=$accelerator" "${tiny[@]}" \
  "hydra.sweep.dir=$OUT/methods"
step ddp_one_device "$PY" scripts/train.py adapter=mixlora trainer=ddp "trainer.accelerator=$accelerator" \
  trainer.devices=1 "${tiny[@]}" "hydra.run.dir=$OUT/ddp_one_device"
if ((dry_run)); then
  echo "[gpu_check] fsdp_one_device: skipped on the CPU (Lightning's FSDP needs a GPU)"
else  # FSDP gathers whole parameters on process 0 for saving, merging and scoring: only a GPU exercises it
  step fsdp_one_device "$PY" scripts/train.py adapter=furina trainer=fsdp trainer.devices=1 "${tiny[@]}" \
    "hydra.run.dir=$OUT/fsdp_one_device"
fi
step bench "$PY" scripts/bench.py "${bench[@]}" --json "$OUT/bench.json"

"$PY" - "$OUT" "${steps[@]}" <<'EOF'
import json, sys
from pathlib import Path

out, steps = Path(sys.argv[1]), sys.argv[2:]
summary = {"steps": {}, "runs": {}}
for entry in steps:
    name, status, seconds = entry.split(":")
    summary["steps"][name] = {"exit": int(status), "seconds": int(seconds)}
for results in sorted(out.glob("*/**/results.json")):
    r = json.loads(results.read_text())
    summary["runs"][str(results.parent.relative_to(out))] = {
        "status": r.get("status"), "method": r.get("label"), "scoring": r.get("scoring"),
        "tokens_per_s": (r.get("timings") or {}).get("tokens_per_s"), "mean": r.get("mean")}
bench = out / "bench.json"
summary["bench"] = json.loads(bench.read_text()) if bench.exists() else None
try:
    import torch
    summary["torch"] = torch.__version__
    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception as error:  # noqa: BLE001 - the summary is written whatever failed
    summary["torch"] = f"unavailable: {error}"
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
failed = [name for name, step in summary["steps"].items() if step["exit"]]
bad = [name for name, run in summary["runs"].items() if run["status"] != "ok"]
print(f"[gpu_check] {out / 'gpu_check.json'}: {len(summary['steps']) - len(failed)} of {len(summary['steps'])} "
      f"steps passed, {len(summary['runs']) - len(bad)} of {len(summary['runs'])} runs ok")
sys.exit(1 if failed or bad else 0)
EOF
