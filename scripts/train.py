"""Train and evaluate one adapter (or a sweep with -m): the Hydra entry point.

    python scripts/train.py model=tiny_random data=tiny adapter=lora trainer.max_steps=5
    python scripts/train.py -m adapter=lora,mixlora,furina seed=0,1,2

A mistake in the input (a bad field, a folder in use) or a run that diverged ends with one line on stderr
that names the field or the step; the traceback is in the run's error.txt, and HYDRA_FULL_ERROR=1 prints it.
"""

import os
import sys
from pathlib import Path

from moelab.modules.quiet import quiet_environment

quiet_environment("verbose=true" in sys.argv)  # before the libraries below read their settings

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from moelab.adapters import ConfigError  # noqa: E402
from moelab.modules.errors import TrainingDiverged  # noqa: E402
from moelab.modules.launch import launch_time  # noqa: E402
from moelab.modules.training import ERROR_FILE, run  # noqa: E402

OmegaConf.register_new_resolver("moelab_launch_time", launch_time, replace=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the mean dev score (scored when eval.splits lists dev), so that hyper-parameter sweepers optimise
    on dev and never on the test split the tables report."""
    try:
        return (run(cfg).get("dev") or {}).get("mean")
    except (ConfigError, TrainingDiverged) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        trace = Path(cfg.paths.output_dir) / ERROR_FILE
        where = f" (traceback: {trace}; HYDRA_FULL_ERROR=1 prints it)" if trace.exists() else ""
        message = " ".join(str(error).split())
        print(f"[moelab] error: {message}{where}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
