"""Train and evaluate one adapter (or a sweep with -m): the Hydra entry point.

    python scripts/train.py model=tiny_random data=tiny adapter=lora trainer.max_steps=5
    python scripts/train.py -m adapter=lora,mixlora,furina seed=0,1,2

A mistake in the input (a bad field, a folder in use) or a run that diverged ends with one line on stderr
that names the field or the step; the traceback is in the run's error.txt, and HYDRA_FULL_ERROR=1 prints it.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moelab.adapters import ConfigError
from moelab.modules.errors import TrainingDiverged
from moelab.modules.launch import launch_time
from moelab.modules.training import ERROR_FILE, run

OmegaConf.register_new_resolver("moelab_launch_time", launch_time, replace=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the mean held-out score, so that hyper-parameter sweepers can optimise it."""
    try:
        return run(cfg).get("mean")
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
