"""Reading a finished run folder back: the trained model (base + adapter) and its dev and test task files.

A run folder holds ``adapter/adapter_config.json`` (method, config, the resolved base-model config) and
``adapter/adapter_model.safetensors`` (adapter tensors only), and ``data/<task>.{dev,test}.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.utils import instantiate
from safetensors.torch import load_file

from moelab.adapters import Adapter, config_from_dict, inject, load_adapter_state_dict
from moelab.data.datamodule import lm_eval_task_configs

from .models import BaseModel


def read_adapter_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "adapter" / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished moelab run folder?")
    return json.loads(path.read_text())


def load_trained(run_dir: str | Path) -> tuple[BaseModel, Adapter]:
    """The run's base model with its trained adapter injected and loaded (unmerged)."""
    meta = read_adapter_meta(run_dir)
    base = instantiate(meta["model"])
    if base.identity != meta["base_model"]:
        raise ValueError(f"{run_dir}: the base model now loads as {base.identity!r}, but the adapter was trained "
                         f"on {meta['base_model']!r}")
    adapter = inject(base.model, config_from_dict(meta["method"], meta["config"]))
    weights = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    load_adapter_state_dict(base.model, load_file(str(weights)), source=str(weights))
    base.model.eval()
    return base, adapter


def split_tasks(run_dir: str | Path, split: str = "test") -> list[dict]:
    """lm-eval configs for the ``dev`` or ``test`` files the run wrote (the examples it was scored on)."""
    files = {path.name.removesuffix(f".{split}.jsonl"): path
             for path in sorted((Path(run_dir) / "data").glob(f"*.{split}.jsonl"))}
    if not files:
        raise FileNotFoundError(f"{run_dir}/data holds no *.{split}.jsonl files")
    return lm_eval_task_configs(files)
