"""scripts/gpu_check.sh --dry-run: the GPU check's steps on the CPU, so that the script a GPU session runs
is itself tested: every step passes and the summary JSON describes every method's run."""

import json
import subprocess
import sys

from probes import ROOT, TEST_ENV

from moelab.adapters import registered_adapters


def test_the_gpu_check_runs_its_steps_on_the_cpu(tmp_path):
    completed = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                               env={**TEST_ENV, "OUT": str(tmp_path), "PYTHON": sys.executable}, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(summary["steps"]) == {"tests", "methods", "ddp_one_device", "bench"}
    assert all(step["exit"] == 0 for step in summary["steps"].values())
    methods = {run["method"].split(" ")[0].split("/")[0] for run in summary["runs"].values()}
    assert methods == set(registered_adapters())
    assert all(run["scoring"]["device"] == "cpu" and run["scoring"]["precision"] == "bf16-mixed"
               for run in summary["runs"].values())
    assert summary["bench"] is not None
