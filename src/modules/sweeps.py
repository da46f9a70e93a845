"""Hydra callbacks of a multirun (``hydra.callbacks`` in ``conf/hydra/default.yaml``).

* Before any job starts, every job's composed config is checked for a trainer that would launch processes
  of its own inside the local multirun (see :func:`moelab.modules.launch.check_process_launch`), and a
  hyper-parameter search for an objective on dev (:func:`moelab.modules.validation.check_objective`).
* After the last job, the comparison table is written and the sweep's outcome becomes the process's exit
  status: 1, with the list printed, when any job failed, was interrupted or left no results. Re-running the
  same command with the same ``hydra.sweep.dir`` skips the finished jobs and resumes the others.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .launch import check_process_launch
from .validation import check_objective


class SweepOutcome(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning; SystemExit is what stops the sweep
        try:
            check_objective(str(config.hydra.sweeper.get("_target_", "")),
                            OmegaConf.to_container(config.eval, resolve=True))
            for job in _job_configs(config):
                check_process_launch(job, multirun=True)
        except ValueError as error:
            print(f"[moelab] {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .compare import compare

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            result = compare(sweep_dir)
        except FileNotFoundError as error:
            print(f"[moelab] no comparison table: {error}", flush=True)
            raise SystemExit(1) from None
        print(f"[moelab] comparison table: {result.markdown}", flush=True)
        if result.unfinished:
            print("[moelab] unfinished jobs (re-run the same command to resume them):\n    "
                  + "\n    ".join(result.unfinished), flush=True)
            raise SystemExit(1)


def _job_configs(config: DictConfig) -> list[DictConfig]:
    """The composed config of every job of a basic-sweeper multirun (other sweepers choose their jobs as they
    go; their jobs are checked when they start)."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    loader = GlobalHydra.instance().config_loader()
    return [loader.load_sweep_config(config, list(job))
            for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
