"""bf16-mixed precision: every method trains end to end under the real bf16-mixed trainer on CPU, and what
the docs call fp32 — routers, gates, FURINA's norms and selection loss, aux losses, routing statistics — is
computed in fp32 inside the autocast region, checked on dtypes and on values (bf16 arithmetic would be off
by about 1e-2; fp32 agrees to 1e-6)."""

import math

import pytest
import torch
from conftest import compose_config, randomize_adapter, tiny_model, token_batch
from torch import nn

from moelab.adapters import inject, registered_adapters, routed_modules
from moelab.adapters.composition import SOFT, ComposedLinear
from moelab.adapters.experts import LoraExperts
from moelab.adapters.furina import FurinaConfig, FurinaLinear
from moelab.adapters.mole import Mole, MoleConfig
from moelab.modules.training import adapter_config, run

METHODS = sorted(registered_adapters())
AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_in_bf16_mixed(tmp_path, method):
    overrides = ["model=tiny_random", "data=tiny", f"adapter={method}", "trainer.precision=bf16-mixed",
                 "trainer.max_steps=2", "eval.limit=4", "logger=none", "callbacks=none",
                 f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    results = run(compose_config(*overrides))
    assert results["status"] == "ok" and math.isfinite(results["validation"]["val/ce"])
    assert results["scoring"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_routing_records_and_aux_losses_are_fp32_under_autocast(method):
    model, _ = tiny_model()
    adapter = inject(model, adapter_config(compose_config("model=tiny_random", "data=tiny", f"adapter={method}")))
    adapter.enter_stage(model, adapter.stage_schedule(10)[-1][1] if adapter.stage_schedule(10) else None)
    randomize_adapter(model, scale=0.1)
    batch = token_batch(batch=3, seq=10)
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    with torch.autocast(**AUTOCAST):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        aux = adapter.aux_losses(model)
    assert out.logits.dtype == torch.bfloat16, "the base model does run in bf16"
    records = [module.routing for _, module in routed_modules(model)]
    assert records and all(r.probs.dtype == torch.float32 for r in records)
    assert all(r.logits is None or r.logits.dtype == torch.float32 for r in records)
    assert aux and all(value.dtype == torch.float32 for value in aux.values())


def test_the_mole_gate_is_fp32_inside_autocast():
    torch.manual_seed(0)
    config = MoleConfig(experts={"num_experts": 3, "lora_dropout": 0.0}, gate_level="matrix")
    experts = LoraExperts(3, 48, 40, rank=4, alpha=8, init="random")
    layer = ComposedLinear(nn.Linear(48, 40), experts, Mole(config).make_site(nn.Linear(48, 40), experts), None)
    layer.stage = SOFT
    with torch.no_grad():
        layer.site.e.normal_()
    x = torch.randn(2, 7, 48)
    h = experts.down(x)
    reference, _ = layer.site(x, h, experts, layer.context)
    with torch.autocast(**AUTOCAST):
        gates, routing = layer.site(x, h, experts, layer.context)
    assert gates.dtype == torch.float32 and routing.logits.dtype == torch.float32
    torch.testing.assert_close(gates, reference, rtol=1e-6, atol=1e-7)


def test_furina_norms_and_selection_loss_are_fp32_inside_autocast():
    torch.manual_seed(0)
    layer = FurinaLinear(nn.Linear(48, 40), FurinaConfig(num_experts=4, num_shared_experts=1, r=4, lora_dropout=0.0))
    with torch.no_grad():
        for parameter in (layer.experts.lora_A, layer.experts.lora_B, layer.magnitude):
            parameter.normal_()
    x = torch.randn(3, 48)
    layer.train()
    norms = layer.row_norms()
    layer(x)
    losses = {k: v.detach() for k, v in layer.aux_losses().items()}
    with torch.autocast(**AUTOCAST):
        autocast_norms = layer.row_norms()
        layer(x)
    assert autocast_norms.dtype == torch.float32 and layer.routing.probs.dtype == torch.float32
    torch.testing.assert_close(autocast_norms, norms, rtol=1e-6, atol=1e-7)
    for name, value in layer.aux_losses().items():
        assert value.dtype == torch.float32
        # the experts' h = A x runs in bf16 under autocast (as every LoRA input does); the loss after it in fp32
        torch.testing.assert_close(value, losses[name], rtol=2e-2, atol=1e-4)
