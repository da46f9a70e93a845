"""One W&B run that holds a sweep's comparison: the table as a ``wandb.Table`` and the figures as images.

It joins the sweep's W&B group (the group its runs logged to: ``group`` of their config, or the sweep
folder's name, as training chooses it), so that the summary sits next to the runs it summarises. Offline
by default, like every moelab run: the files land in ``<out>/wandb`` and ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .compare import Comparison, Run


def sweep_group(runs: list[Run], sweep_dir: Path) -> str:
    """The W&B group the runs logged to: their configured ``group``, else the sweep folder's name."""
    groups = {run.results.get("config", {}).get("group") for run in runs} - {None}
    return groups.pop() if len(groups) == 1 else Path(sweep_dir).resolve().name


def wandb_project(runs: list[Run]) -> str:
    """The runs' W&B project (``logger.wandb.project``), ``moelab`` when they logged to none."""
    projects = {((run.results.get("config", {}).get("logger") or {}).get("wandb") or {}).get("project")
                for run in runs} - {None}
    return sorted(projects)[0] if projects else "moelab"


def log_summary(comparison: Comparison, sweep_dir: Path, out_dir: Path, online: bool = False) -> Path | None:
    """Log the comparison to one W&B run of the sweep's group; the run's folder (None if wandb made none)."""
    os.environ["WANDB_MODE"] = "online" if online else "offline"
    import wandb

    header, body = comparison.table
    runs = comparison.runs
    images = {f"figures/{path.stem}": wandb.Image(str(path))
              for path in [*comparison.figures, comparison.figure] if path is not None and path.suffix == ".png"}
    run = wandb.init(project=wandb_project(runs), group=sweep_group(runs, sweep_dir), job_type="compare",
                     name=f"comparison-{Path(sweep_dir).resolve().name}", dir=str(out_dir), reinit=True)
    try:
        run.log({"comparison": wandb.Table(columns=header, data=body), **images})
        run.summary["comparison_markdown"] = comparison.text
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder if folder.exists() else None
