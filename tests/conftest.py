"""Shared fixtures: offline environment, the tiny random LLaMA, composed configs, a token batch."""

import os

# Before anything imports huggingface_hub, datasets or wandb (assets.md §5, §6).
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"})

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def tiny_model(seed: int = 0, **sizes):
    """A fresh tiny random LLaMA (same weights for the same seed) and its byte tokenizer."""
    from moelab.modules.models import build_tiny_random

    base = build_tiny_random(seed=seed, **sizes)
    return base.model, base.tokenizer


def randomize_adapter(model, scale: float = 0.3, seed: int = 1) -> None:
    """Random values in every adapter tensor, so that equivalence checks compare non-trivial updates."""
    from moelab.adapters import adapter_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in adapter_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def token_batch(batch: int = 2, seq: int = 12, vocab: int = 260, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, -3:] = 0  # some padding, so masked code paths run
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    prompt_mask = torch.zeros(batch, seq, dtype=torch.bool)
    prompt_mask[:, : seq // 2] = True  # the first half of every row is its prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "task_ids": torch.arange(batch) % 3, "prompt_mask": prompt_mask}


def compose_config(*overrides: str, config_name: str = "train"):
    """The real configs composed as `scripts/train.py` composes them. Without a Hydra run there is no
    `hydra:runtime.output_dir`: tests that run a job override `paths.output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture
def batch():
    return token_batch()
