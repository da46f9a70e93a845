"""MoLE against the equations of methods.md §2: the gate (Eq. 9–11) by hand, the balancing loss (Eq. 14) on
hand-computed cases, masking ≡ renormalised mix (§2.3), one expert ≡ plain LoRA (§1), the temperature's
gradient, gate levels and the prompt-mean scope."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, randomize_adapter, tiny_model, token_batch
from torch import nn

from moelab.adapters import AdapterConfigError, adapter_layers, inject, routed_modules
from moelab.adapters.composition import SOFT, ComposedLinear, composed_layers
from moelab.adapters.experts import LoraExperts
from moelab.adapters.lora import LoraConfig
from moelab.adapters.mole import Mole, MoleConfig, balance_loss, expert_deltas

TASKS = ["a", "b", "c"]


def gated_linear(d_in=6, d_out=5, num_experts=3, **fields):
    """One projection with three random experts and a random gate (soft stage), inside a holder module."""
    torch.manual_seed(0)
    config = MoleConfig(experts={"num_experts": num_experts, "lora_dropout": 0.0}, gate_level="matrix", **fields)
    adapter = Mole(config)
    experts = LoraExperts(num_experts, d_in, d_out, rank=2, alpha=4, init="random")
    layer = ComposedLinear(nn.Linear(d_in, d_out), experts, adapter.make_site(nn.Linear(d_in, d_out), experts), None)
    with torch.no_grad():
        layer.site.e.normal_()
        layer.site.log_tau.fill_(math.log(1.5))
    return nn.ModuleDict({"proj": layer}), layer, adapter


def soft_model(**fields):
    model, _ = tiny_model()
    adapter = inject(model, MoleConfig(experts={"tasks": TASKS, "lora_dropout": 0.0}, **fields))
    adapter.enter_stage(model, SOFT)
    randomize_adapter(model)
    return model, adapter


def forward(model, adapter, batch, prompt_mask=None):
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool(), prompt_mask)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


# ---------------------------------------------------------------------------------------------- the gate


@pytest.mark.parametrize("gate_input,gate_norm", [("expert_deltas", "layernorm"), ("hidden", "l2"),
                                                  ("expert_deltas", "l2"), ("hidden", "layernorm")])
def test_gate_and_output_follow_the_equations(gate_input, gate_norm):
    _, layer, _ = gated_linear(gate_input=gate_input, gate_norm=gate_norm)
    x = torch.randn(2, 4, 6)
    out = layer(x)
    deltas = [layer.experts.expert_delta(x, i) for i in range(3)]
    z = torch.cat(deltas, dim=-1) if gate_input == "expert_deltas" else x  # Eq. 9 / the V&L code's input
    z = F.layer_norm(z, z.shape[-1:]) if gate_norm == "layernorm" else z / z.norm(dim=-1, keepdim=True)
    gates = torch.softmax(z @ layer.site.e / 1.5, dim=-1)  # Eq. 10–11, τ = 1.5
    torch.testing.assert_close(layer.routing.probs, gates.reshape(-1, 3), rtol=1e-5, atol=1e-6)
    expected = layer.base_layer(x) + sum(gates[..., i, None] * deltas[i] for i in range(3))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.routing.selected[:, 0], gates.reshape(-1, 3).argmax(-1))


def test_gate_starts_uniform():
    model, _ = tiny_model()
    inject(model, MoleConfig(experts={"tasks": TASKS}))
    model.eval()
    model(input_ids=token_batch()["input_ids"])
    for _, site in routed_modules(model):
        torch.testing.assert_close(site.routing.probs, torch.full_like(site.routing.probs, 1 / 3))
        assert site.site.log_tau.item() == 0.0, "τ = 1 at init"


def test_masking_an_expert_equals_the_renormalised_mix_of_the_others():
    holder, layer, adapter = gated_linear()
    layer.eval()
    x = torch.randn(2, 4, 6)
    layer(x)
    gates = layer.routing.probs.reshape(2, 4, 3)
    adapter.mask_experts(holder, [1])
    kept = gates[..., 0] + gates[..., 2]
    expected = (layer.base_layer(x) + (gates[..., 0] / kept)[..., None] * layer.experts.expert_delta(x, 0)
                + (gates[..., 2] / kept)[..., None] * layer.experts.expert_delta(x, 2))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert (layer.routing.probs[:, 1] == 0).all()
    layer.train()  # masking is an inference operation: training mixes all experts
    layer(x)
    torch.testing.assert_close(layer.routing.probs.reshape(2, 4, 3), gates)
    adapter.mask_experts(holder, [])
    layer.eval()
    layer(x)
    torch.testing.assert_close(layer.routing.probs.reshape(2, 4, 3), gates)


def test_masked_experts_from_the_config_apply_after_injection():
    model, _ = tiny_model()
    inject(model, MoleConfig(experts={"tasks": TASKS}, masked_experts=[0, 2]))
    model.eval()
    model(input_ids=token_batch()["input_ids"])
    for _, site in routed_modules(model):
        torch.testing.assert_close(site.routing.probs, F.one_hot(torch.full((24,), 1), 3).float())


def test_one_expert_without_a_gate_is_plain_lora():
    batch = token_batch()
    lora_model, _ = tiny_model()
    inject(lora_model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=16, lora_alpha=32,
                                  init_lora_weights="random"))
    model, _ = tiny_model()
    adapter = inject(model, MoleConfig(experts={"num_experts": 1, "lora_dropout": 0.0}))
    adapter.enter_stage(model, SOFT)
    loras = dict(adapter_layers(lora_model))
    with torch.no_grad():
        for name, layer in composed_layers(model):
            layer.experts.lora_A.copy_(loras[name].lora.lora_A)
            layer.experts.lora_B.copy_(loras[name].lora.lora_B)
            if layer.is_leader:
                layer.site.e.normal_()  # any gate: softmax over one expert is 1
    for mode in (True, False):
        model.train(mode)
        lora_model.train(mode)
        with torch.no_grad():
            ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            theirs = lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the loss


def test_balance_loss_on_hand_computed_cases():
    site_a = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    site_b = torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    mask = torch.tensor([True, True, False])
    # q = mean over sites of the masked token means: ([0.7, 0.3] + [0.3, 0.7]) / 2 = [0.5, 0.5]
    assert balance_loss([(site_a, mask), (site_b, mask)]).item() == pytest.approx(-2 * math.log(0.5))
    assert balance_loss([(site_a, mask)]).item() == pytest.approx(-(math.log(0.7) + math.log(0.3)))
    assert balance_loss([(site_a, None)]).item() == pytest.approx(-(math.log(0.5) + math.log(0.5)))


def test_aux_loss_is_alpha_times_the_balance_over_gated_sites_and_real_tokens():
    model, adapter = soft_model()
    batch = token_batch()
    model.train()
    forward(model, adapter, batch)
    mask = batch["attention_mask"].bool().reshape(-1)
    gates = [(site.routing.probs, mask) for _, site in routed_modules(model)]
    assert len(gates) == 2  # l-MoLE: one gate per decoder layer
    aux = adapter.aux_losses(model)
    assert aux["balance"].item() == pytest.approx(0.5 * balance_loss(gates).item(), rel=1e-6)
    assert aux["balance"].item() > 0.5 * 3 * math.log(3), "above the uniform-gate minimum"
    adapter.enter_stage(model, "hard")
    forward(model, adapter, batch)
    assert adapter.aux_losses(model) == {}, "no gate, no balance loss in the hard stage"


def test_the_temperature_and_the_gate_receive_gradients():
    model, adapter = soft_model()
    model.train()
    output = forward(model, adapter, token_batch())
    (output.loss + sum(adapter.aux_losses(model).values())).backward()
    for _, site in routed_modules(model):
        assert site.site.log_tau.grad is not None and site.site.log_tau.grad.abs() > 0
        assert site.site.e.grad.abs().sum() > 0
    frozen = {id(p) for p in adapter.frozen_parameters(model)}
    assert frozen == {id(p) for _, layer in composed_layers(model) for p in layer.experts.parameters()}, \
        "the soft stage freezes the experts (the trainer drops their gradients before each step)"


# ---------------------------------------------------------------------------------------------- levels, scope


@pytest.mark.parametrize("fields,sites", [({"gate_level": "layer"}, 2), ({"gate_level": "matrix"}, 8),
                                          ({"gate_level": "network"}, 1), ({"gate_level": "block"}, 1),
                                          ({"gate_level": "block", "gate_block_layers": 1}, 2)])
def test_gate_levels(fields, sites):
    model, adapter = soft_model(**fields)
    model.eval()
    forward(model, adapter, token_batch())
    assert len(routed_modules(model)) == sites


def test_prompt_mean_gives_one_gate_per_sequence_from_its_prompt_tokens():
    _, layer, _ = gated_linear(gate_scope="prompt_mean")
    x = torch.randn(2, 5, 6)
    prompt = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    layer.context.prompt_mask = prompt
    layer(x)
    gates = layer.routing.probs.reshape(2, 5, 3)
    z = torch.cat([layer.experts.expert_delta(x, i) for i in range(3)], dim=-1)
    for row, length in enumerate((3, 2)):
        pooled = F.layer_norm(z[row, :length].mean(0), (15,))
        expected = torch.softmax(pooled @ layer.site.e / 1.5, dim=-1)
        torch.testing.assert_close(gates[row], expected.expand(5, 3), rtol=1e-5, atol=1e-6)


def test_prompt_mean_without_a_mask_is_causal():
    _, layer, _ = gated_linear(gate_scope="prompt_mean")
    x = torch.randn(1, 6, 6)
    layer(x)
    before = layer.routing.probs.clone()
    x[0, 4] += 1.0
    layer(x)
    torch.testing.assert_close(layer.routing.probs[:4], before[:4])  # earlier tokens do not see token 4
    assert not torch.allclose(layer.routing.probs[4:], before[4:])
    z = torch.cat([layer.experts.expert_delta(x, i) for i in range(3)], dim=-1)
    expected = torch.softmax(F.layer_norm(z[0, :3].mean(0), (15,)) @ layer.site.e / 1.5, dim=-1)
    torch.testing.assert_close(layer.routing.probs[2], expected, rtol=1e-5, atol=1e-6)  # mean of tokens 0..2


def test_a_cached_continuation_continues_the_pool_of_the_forward_before_it():
    holder, layer, adapter = gated_linear(gate_scope="prompt_mean")
    layer.eval()
    x = torch.randn(2, 6, 6)
    layer(x)
    full = layer.routing.probs.reshape(2, 6, 3)
    layer(x[:, :4])  # the prompt, then two cached decode steps of one token
    for step in (4, 5):
        adapter.decoding.past_tokens = step
        layer(x[:, step:step + 1])
        torch.testing.assert_close(layer.routing.probs, full[:, step], rtol=1e-6, atol=1e-7)
    layer.context.prompt_mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    adapter.decoding.past_tokens = 0
    layer(x[:, :4])
    prompt_gates = layer.routing.probs.reshape(2, 4, 3)[:, 0]
    adapter.decoding.past_tokens = 4
    layer(x[:, 4:5])  # §2.1: generated tokens reuse the prompt's gate
    torch.testing.assert_close(layer.routing.probs, prompt_gates)
    adapter.decoding.past_tokens = 3
    with pytest.raises(RuntimeError, match="continues a KV cache of 3 tokens"):
        layer(x[:, 4:5])


@pytest.mark.parametrize("gate_input", ["expert_deltas", "hidden"])
def test_prompt_mean_generates_the_same_with_and_without_a_kv_cache(gate_input):
    """§2.1: under KV-cached decoding each call sees one new token; its gate must still pool the sequence."""
    model, adapter = soft_model(gate_scope="prompt_mean", gate_input=gate_input)
    randomize_adapter(model, scale=1.0)  # gates that differ a lot between tokens
    model.eval()
    batch = token_batch(batch=2, seq=7)
    prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(-1)}  # left padding
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0,
                "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        cached = model.generate(**prompt, **settings, use_cache=True)
        uncached = model.generate(**prompt, **settings, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-4)
    assert adapter.decoding.past_tokens == 0, "reset after every forward"


def test_mole_composition_gives_the_gates_the_papers_800_iterations():
    """§2.4: 800 gate iterations per composition; the sweep's lora job keeps a config without experts."""
    from moelab.adapters import adapter_for
    from moelab.modules.training import adapter_config

    cfg = compose_config("experiment=mole_composition", "adapter=mole")
    config = adapter_config(cfg)
    schedule = adapter_for(config)(config).stage_schedule(cfg.trainer.max_steps)
    assert schedule[0] == (0, "hard") and schedule[1][1] == SOFT
    assert cfg.trainer.max_steps - schedule[1][0] == 800
    assert "experts" not in compose_config("experiment=mole_composition", "adapter=lora").adapter
    assert compose_config("adapter=mole").adapter.experts.stage1_fraction == 0.8, "the default elsewhere"


def test_expert_deltas_are_each_experts_output():
    experts = LoraExperts(3, 6, 5, rank=2, alpha=4, init="random")
    x = torch.randn(4, 6)
    deltas = expert_deltas(experts, experts.down(x))
    for i in range(3):
        torch.testing.assert_close(deltas[:, i], experts.expert_delta(x, i))


@pytest.mark.parametrize("fields,message", [
    ({"gate_level": "head"}, "gate_level"), ({"gate_scope": "sequence"}, "gate_scope"),
    ({"gate_input": "logits"}, "gate_input"), ({"gate_norm": "rms"}, "gate_norm"),
    ({"balance_coef": -1}, "balance_coef"), ({"masked_experts": [3]}, r"masked_experts \(\[3\]\)"),
    ({"masked_experts": [0, 1, 2]}, "keep at least one"), ({"gate_block_layers": 0}, "gate_block_layers"),
])
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(AdapterConfigError, match=message):
        MoleConfig(experts={"tasks": TASKS}, **fields)


def test_the_trainer_forgets_the_last_batch_before_lm_eval():
    """prompt_mean must not reuse a training batch's prompt mask on lm-eval's inputs of the same shape."""
    from moelab.modules.lm_module import AdapterLM

    model, adapter = soft_model(gate_scope="prompt_mean")
    module = AdapterLM(model, adapter, optimizer=torch.optim.AdamW)
    batch = token_batch()
    forward(model, adapter, batch, prompt_mask=batch["attention_mask"].bool())
    assert adapter.context.prompt_mask is not None
    module.on_validation_end()
    assert adapter.context.task_ids is None and adapter.context.token_mask is None
    assert adapter.context.prompt_mask is None
