"""Export a trained run of a mergeable method (its class says ``mergeable``) as checkpoints that load without
moelab.

    OUT_DIR/        the merged model, ``W0 + ΔW`` in every adapted layer: a plain transformers checkpoint
                    (``save_pretrained``) with its tokenizer, for ``AutoModelForCausalLM.from_pretrained``
    OUT_DIR/peft/   with ``peft=True``: the whole adapter as one PEFT LoRA, for ``PeftModel.from_pretrained``
                    on the base model

The PEFT LoRA of each layer is its :meth:`~moelab.adapters.AdapterLayer.low_rank_factors` ``(A, B)``, whose
product is exactly the merged ``ΔW``: rank R = the layer's total rank (r for one LoRA, N·r for N experts of rank r,
methods.md §6.4) with ``lora_alpha = R``, so that PEFT's scaling ``α/R`` is 1. Methods that route on the input have no
such ``ΔW`` and are refused before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moelab.adapters import MergeError, adapter_layers, get_adapter_class, merge_and_unload
from moelab.adapters.base import base_modules

from .runs import load_trained, read_adapter_meta

PEFT_FOLDER = "peft"


def export_merged(run_dir: str | Path, out_dir: str | Path, peft: bool = False) -> Path:
    """Write the run's merged model (and, with ``peft``, its PEFT LoRA) to ``out_dir``; returns ``out_dir``.

    Fails with :class:`MergeError` for methods that cannot merge, and before writing anything when an
    adapter tensor holds NaN or Inf.
    """
    meta = read_adapter_meta(run_dir)
    adapter_cls = get_adapter_class(meta["method"])
    if not adapter_cls.mergeable:
        raise MergeError(f"{meta['method']} [{adapter_cls.fidelity}] cannot be exported as a merged model: "
                         f"{adapter_cls.merge_refusal} (input-dependent routing), so no single weight update "
                         f"exists. Score it unmerged instead (scripts/evaluate.py RUN_DIR --unmerged).")
    base, _ = load_trained(run_dir)
    out_dir = Path(out_dir)
    peft_files = peft_lora(base.model, meta["model"].get("pretrained")) if peft else None
    model = merge_and_unload(base.model, safe_merge=True)
    model.save_pretrained(out_dir)
    base.tokenizer.save_pretrained(out_dir)
    if peft_files is not None:
        config, tensors = peft_files
        config.save_pretrained(out_dir / PEFT_FOLDER)
        save_file(tensors, str(out_dir / PEFT_FOLDER / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def peft_lora(model: nn.Module, base_model_name_or_path: str | None):
    """``(peft.LoraConfig, tensors)`` equivalent to every adapter layer of ``model``, keyed as PEFT saves
    them (``base_model.model.<module path>.lora_{A,B}.weight``)."""
    from peft import LoraConfig as PeftLoraConfig

    tensors, ranks = {}, {}
    for name, layer in adapter_layers(model):
        lora_A, lora_B = layer.low_rank_factors()
        for kind, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not torch.isfinite(tensor).all():
                raise MergeError(f"PEFT export: {kind} of {name} contains NaN or Inf; nothing was written")
            tensors[f"base_model.model.{name}.{kind}.weight"] = tensor.detach().contiguous().cpu()
        ranks[name] = lora_A.shape[0]
    if len(set(ranks.values())) != 1:
        raise MergeError(f"PEFT export needs one total rank for all layers, got {sorted(set(ranks.values()))}")
    rank = next(iter(ranks.values()))
    config = PeftLoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                            target_modules=_peft_targets(model, list(ranks)), inference_mode=True,
                            base_model_name_or_path=base_model_name_or_path)
    return config, tensors


def _peft_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Short module names (``q_proj``) as PEFT configs usually hold them, unless an unadapted linear shares
    one (PEFT matches by suffix and would adapt it too); then the full module paths."""
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    shared = any(isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in short
                 for name, module in base_modules(model))
    return sorted(names) if shared else short
