"""Train and evaluate one adapter (or a sweep with -m): the Hydra entry point.

    python scripts/train.py model=tiny_random data=tiny adapter=lora trainer.max_steps=5
    python scripts/train.py -m adapter=lora,mixlora,furina seed=0,1,2
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from moelab.modules.launch import launch_time
from moelab.modules.training import run

OmegaConf.register_new_resolver("moelab_launch_time", launch_time, replace=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the mean held-out score, so that hyper-parameter sweepers can optimise it."""
    return run(cfg).get("mean")


if __name__ == "__main__":
    main()
