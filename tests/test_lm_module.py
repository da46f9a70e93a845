"""The LightningModule's objective: cross-entropy on supervised tokens only, computed from kept logits."""

import functools

import torch
from conftest import tiny_model, token_batch

from moelab.adapters import inject
from moelab.adapters.lora import LoraConfig
from moelab.modules.lm_module import AdapterLM


def test_loss_from_kept_logits_equals_the_full_model_loss():
    model, _ = tiny_model()
    adapter = inject(model, LoraConfig(init_lora_weights="random"))
    module = AdapterLM(model, adapter, optimizer=functools.partial(torch.optim.AdamW))
    batch = token_batch(batch=3, seq=14)
    batch["labels"][:, :6] = -100  # prompt tokens
    batch["labels"][1, :10] = -100  # rows with different prompt lengths
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    torch.testing.assert_close(module(batch), expected, rtol=1e-6, atol=1e-6)
