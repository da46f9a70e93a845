"""Lightning callbacks of the training pipeline."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from .plots import KINDS, expert_map_figure


class ExpertMapLogger(L.Callback):
    """Logs the layer × expert activation maps of the training run to W&B when fit ends: one image per kind
    (``<key>_load``, ``<key>_importance``), drawn from the module's cumulative ``routing["train"]``
    statistics (already summed over processes).

    Does nothing without a WandbLogger, for methods that do not route, and on ranks other than zero.
    """

    def __init__(self, key: str = "routing/expert_map", per_site: bool = False) -> None:
        self.key, self.per_site = key, per_site

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        stats = pl_module.routing["train"]
        if not loggers or stats.empty or not trainer.is_global_zero:
            return
        import wandb

        datamodule = trainer.datamodule
        tasks = datamodule.task_names if datamodule is not None else [f"task {i}" for i in range(stats.num_tasks)]
        images = {f"{self.key}_{kind}": wandb.Image(expert_map_figure(stats, tasks, pl_module.adapter.label, kind,
                                                                      "train", self.per_site))
                  for kind in KINDS}
        for logger in loggers:
            logger.log_metrics(images, step=trainer.global_step)
