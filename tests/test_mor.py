"""MoR-recon (methods.md §4.2): M = 1 ≡ the host's router, both combine rules on hand-computed cases, the
host balance loss on the combined p, the sub-router balance, the hosts, config validation, and runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, randomize_adapter, tiny_model, token_batch

from moelab.adapters import (
    AdapterConfigError,
    MergeError,
    adapter_state_dict,
    config_from_dict,
    inject,
    load_adapter_state_dict,
    merge,
    registered_adapters,
    routed_modules,
)
from moelab.adapters.mixlora import MixLora, MixLoraFFN
from moelab.adapters.mor import MixtureOfRouters, MorConfig, PerLinear, PerLinearConfig, RoutedLoraLinear
from moelab.adapters.routing import TopKRouter
from moelab.modules.training import run


def randomize(model, scale: float = 0.05, seed: int = 1) -> None:
    randomize_adapter(model, scale, seed)


def forward(model, adapter, batch):
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


HOSTS = ["mixlora", "per_linear", *(["lora_mixer"] if "lora_mixer" in registered_adapters() else [])]
HOST_CONFIGS = {"mixlora": {"num_experts": 4, "top_k": 2}, "per_linear": {"num_experts": 4, "top_k": 2},
                "lora_mixer": {"experts": {"num_experts": 4}, "top_k": 2}}


def host_model(host: str, host_config: dict):
    """The tiny model with the host method and its plain top-k routers (no MoR)."""
    model, _ = tiny_model()
    if host != "per_linear":
        return model, inject(model, config_from_dict(host, host_config))
    adapter = PerLinear(PerLinearConfig(**host_config))  # not registered: injected by hand
    model.requires_grad_(False)
    adapter.inject(model)
    return model, adapter


def mor_model(seed: int = 0, **values):
    model, _ = tiny_model()
    torch.manual_seed(seed)
    return model, inject(model, MorConfig(**values))


# ------------------------------------------------------------------------------------- M = 1 ≡ host


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_one_router_equals_the_host_router(host, combine):
    host_config = HOST_CONFIGS[host]
    reference, host_adapter = host_model(host, host_config)
    randomize(reference)
    model, adapter = mor_model(host=host, host_config=host_config, num_routers=1, combine=combine)
    state = adapter_state_dict(reference)
    ours = {}
    for key, value in adapter_state_dict(model).items():
        # MoR's router weight stacks [sub-router (E rows); main router (1 row)]: copy the host router into
        # the sub-router and keep the random main row, which cannot matter (ω = softmax of one logit = 1)
        ours[key] = torch.cat([state[key], value[-1:]]) if key.endswith("router.weight") else state[key]
    load_adapter_state_dict(model, ours)
    batch = token_batch()
    model.eval(), reference.eval()
    with torch.no_grad():
        expected, got = forward(reference, host_adapter, batch), forward(model, adapter, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    sites, host_sites = routed_modules(model), routed_modules(reference)
    assert len(sites) == len(host_sites) > 0
    for (_, ours_site), (_, host_site) in zip(sites, host_sites, strict=True):
        assert [type(m) for m in ours_site.modules() if isinstance(m, TopKRouter)] == [MixtureOfRouters]
        assert [type(m) for m in host_site.modules() if isinstance(m, TopKRouter)] == [TopKRouter]
        assert torch.equal(ours_site.routing.selected, host_site.routing.selected)
        torch.testing.assert_close(ours_site.routing.probs, host_site.routing.probs, rtol=0, atol=1e-7)
    assert (expected - logits_of_base(batch)).abs().max() > 1e-3, "a non-trivial adapter"


def logits_of_base(batch):
    base, _ = tiny_model()
    base.eval()
    with torch.no_grad():
        return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ------------------------------------------------------------------------------------- the two combine rules


def hand_router(combine: str) -> MixtureOfRouters:
    # E = 2, M = 2, d = 3; for x = (1, 0, 0): s_1 = (0, ln 3), s_2 = (ln 3, 0), main logits (0, ln 3)
    router = MixtureOfRouters(3, num_experts=2, top_k=1, init_std=0.02, num_routers=2, combine=combine)
    ln3 = math.log(3.0)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[1, 0] = ln3  # sub-router 1, expert 1
        router.weight[2, 0] = ln3  # sub-router 2, expert 0
        router.weight[5, 0] = ln3  # main router, row of sub-router 2
    return router


def test_combine_prob_by_hand():
    # softmax(s_1) = (1/4, 3/4), softmax(s_2) = (3/4, 1/4), ω = (1/4, 3/4)
    # p = 1/4 · (1/4, 3/4) + 3/4 · (3/4, 1/4) = (10/16, 6/16)
    weights, routing = hand_router("prob")(torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(routing.probs, torch.tensor([[10 / 16, 6 / 16]]))
    assert routing.selected.tolist() == [[0]] and weights.tolist() == [[1.0, 0.0]]
    torch.testing.assert_close(routing.logits.softmax(-1), routing.probs)  # log p: softmax gives p back


def test_combine_logit_by_hand():
    # Σ_j ω_j s_j = 1/4 · (0, ln 3) + 3/4 · (ln 3, 0) = (3/4 ln 3, 1/4 ln 3) → p_0 = √3 / (√3 + 1)
    _, routing = hand_router("logit")(torch.tensor([[1.0, 0.0, 0.0]]))
    ln3 = math.log(3.0)
    torch.testing.assert_close(routing.logits, torch.tensor([[0.75 * ln3, 0.25 * ln3]]))
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    torch.testing.assert_close(routing.probs, torch.tensor([[p0, 1 - p0]]))


def test_three_experts_mixture_is_a_distribution_and_differs_by_rule():
    torch.manual_seed(0)
    prob = MixtureOfRouters(3, num_experts=3, top_k=2, init_std=1.0, num_routers=2, combine="prob")
    logit = MixtureOfRouters(3, num_experts=3, top_k=2, init_std=1.0, num_routers=2, combine="logit")
    logit.load_state_dict(prob.state_dict())
    x = torch.randn(5, 3)
    p_prob, _ = prob.probabilities(x)
    p_logit, _ = logit.probabilities(x)
    torch.testing.assert_close(p_prob.sum(-1), torch.ones(5))
    sub, main = prob.scores(x)
    omega = main.softmax(-1)
    torch.testing.assert_close(p_prob, torch.einsum("tm,tme->te", omega, sub.softmax(-1)))
    torch.testing.assert_close(p_logit, torch.einsum("tm,tme->te", omega, sub).softmax(-1))
    assert not torch.allclose(p_prob, p_logit)


# ------------------------------------------------------------------------------------- losses


def balance_by_hand(probs: list, top_k: int, mask) -> torch.Tensor:
    """E · Σ_{slot,i} F_{slot,i} P_i over the pooled real tokens of all sites."""
    probs = torch.cat(probs)
    keep = torch.cat([mask] * (probs.shape[0] // mask.numel())).float()
    one_hot = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).float()  # [T, k, E]
    f = (one_hot * keep[:, None, None]).sum(0) / keep.sum()
    p = (probs * keep[:, None]).sum(0) / keep.sum()
    return probs.shape[-1] * (f * p).sum()


def test_host_balance_loss_acts_on_the_combined_p_and_sub_router_balance_by_hand():
    model, adapter = mor_model(sub_router_balance=True, sub_router_balance_coef=0.1)
    inputs = record_ffn_inputs(model)
    batch = token_batch(batch=2, seq=8)
    forward(model, adapter, batch)
    losses = adapter.aux_losses(model)
    mask = batch["attention_mask"].bool().reshape(-1)
    combined, subs = [], [[] for _ in range(4)]
    for name, x in inputs.items():
        weight = model.get_submodule(name).router.weight  # [M·E + M, d]
        scores = x.reshape(-1, 64) @ weight.T
        sub, omega = scores[:, :32].reshape(-1, 4, 8).softmax(-1), scores[:, 32:].softmax(-1)
        combined.append((omega[..., None] * sub).sum(1))
        for j in range(4):
            subs[j].append(sub[:, j])
    torch.testing.assert_close(losses["load_balance"], 1e-3 * balance_by_hand(combined, 2, mask))
    expected_sub = torch.stack([balance_by_hand(s, 2, mask) for s in subs]).mean()
    torch.testing.assert_close(losses["sub_router_balance"], 0.1 * expected_sub)
    losses["load_balance"].backward()
    router = model.model.layers[0].mlp.router.weight
    assert router.grad[:32].abs().sum() > 0 and router.grad[32:].abs().sum() > 0, "sub- and main routers learn"


def sub_balance_by_hand(model, inputs: dict, mask, per_layer: bool) -> torch.Tensor:
    """The sub-router balance over the sites in ``inputs`` (their FFN inputs), averaged over j."""
    subs = {name: (x.reshape(-1, 64) @ model.get_submodule(name).router.weight[:32].T).reshape(-1, 4, 8).softmax(-1)
            for name, x in inputs.items()}
    per_router = []
    for j in range(4):
        if per_layer:
            per_router.append(torch.stack([balance_by_hand([sub[:, j]], 2, mask) for sub in subs.values()]).mean())
        else:
            per_router.append(balance_by_hand([sub[:, j] for sub in subs.values()], 2, mask))
    return torch.stack(per_router).mean()


def record_ffn_inputs(model) -> dict:
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, MixLoraFFN):
            module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
    return inputs


@pytest.mark.parametrize("reduction", ["pooled", "per_layer"])
def test_sub_router_balance_reads_this_forwards_records_with_the_host_reduction(reduction):
    model, adapter = mor_model(sub_router_balance=True, sub_router_balance_coef=1.0,
                               host_config={"aux_loss_reduction": reduction})
    inputs = record_ffn_inputs(model)
    forward(model, adapter, token_batch(batch=2, seq=8, seed=1))  # layer 0 routes here, then not any more
    inputs.clear()
    model.model.layers[0].mlp.disabled = True
    batch = token_batch(batch=2, seq=8)
    forward(model, adapter, batch)
    assert model.model.layers[0].mlp.routing is None, "the disabled layer ran its base FFN"
    del inputs["model.layers.0.mlp"]
    expected = sub_balance_by_hand(model, inputs, batch["attention_mask"].bool().reshape(-1), per_layer=False)
    torch.testing.assert_close(adapter.aux_losses(model)["sub_router_balance"], expected)
    # both layers routing: the host's reduction decides pooled vs per layer
    model.model.layers[0].mlp.disabled = False
    inputs.clear()
    forward(model, adapter, batch)
    expected = sub_balance_by_hand(model, inputs, batch["attention_mask"].bool().reshape(-1),
                                   per_layer=reduction == "per_layer")
    torch.testing.assert_close(adapter.aux_losses(model)["sub_router_balance"], expected)


def test_sub_router_balance_refused_on_the_lora_mixer_host():
    with pytest.raises(AdapterConfigError, match="sub_router_balance: the lora_mixer host"):
        MorConfig(host="lora_mixer", sub_router_balance=True)


def test_per_linear_and_mixlora_share_one_aux_loss_implementation():
    assert PerLinear.aux_losses is MixLora.aux_losses


def test_sub_router_balance_is_off_by_default():
    model, adapter = mor_model()
    forward(model, adapter, token_batch())
    assert set(adapter.aux_losses(model)) == {"load_balance"}


def test_z_loss_needs_logit_combination():
    with pytest.raises(AdapterConfigError, match="router_z_loss_coef needs router logits"):
        MorConfig(host_config={"router_z_loss_coef": 1e-3})
    model, adapter = mor_model(combine="logit", host_config={"router_z_loss_coef": 1e-3})
    forward(model, adapter, token_batch())
    assert adapter.aux_losses(model)["router_z"] > 0


# ------------------------------------------------------------------------------------- hosts


def test_default_is_mixlora_with_mixture_routers():
    model, adapter = mor_model()
    assert adapter.host.name == "mixlora" and adapter.placement == "ffn_block"
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, MixLoraFFN) and isinstance(layer.mlp.router, MixtureOfRouters)
    assert layer.mlp.router.weight.shape == (4 * (8 + 1), 64)  # M sub-routers of E rows + M main rows
    assert adapter.label == "mor/mixlora [reconstruction]"
    with pytest.raises(MergeError, match="input-dependent"):
        merge(model)


def test_per_linear_host_routes_every_adapted_linear():
    model, adapter = mor_model(host="per_linear", host_config={"target_modules": ["q_proj", "down_proj"]})
    assert adapter.placement == "linear"
    forward(model, adapter, token_batch())
    sites = routed_modules(model)
    assert sorted({name.rsplit(".", 1)[-1] for name, _ in sites}) == ["down_proj", "q_proj"] and len(sites) == 4
    assert all(isinstance(m, RoutedLoraLinear) and isinstance(m.router, MixtureOfRouters) for _, m in sites)
    assert set(adapter.aux_losses(model)) == {"load_balance"}


def test_per_linear_fast_path_equals_a_loop_over_selected_experts():
    model, _ = host_model("per_linear", HOST_CONFIGS["per_linear"])
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj.eval()
    x = torch.randn(7, 64)
    weights, routing = layer.router(x)
    expected = layer.base_layer(x)
    for t in range(7):
        for e in routing.selected[t].tolist():
            expected[t] += weights[t, e] * layer.experts.expert_delta(x[t], e)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("lora_mixer" not in registered_adapters(), reason="lora_mixer is not registered yet")
def test_lora_mixer_host_keeps_its_stages_and_losses_with_mixture_routers():
    model, adapter = mor_model(host="lora_mixer", host_config={"experts": {"num_experts": 3}})
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert routers and all(isinstance(r, MixtureOfRouters) for r in routers)
    stages = adapter.stage_schedule(max_steps=10)
    assert [stage for _, stage in stages] == ["hard", "soft"]  # the host's schedule
    adapter.enter_stage(model, "soft")
    model.train()
    forward(model, adapter, token_batch())
    losses = adapter.aux_losses(model)
    assert set(losses) == {"rsl"}  # the host's loss, on the combined p
    losses["rsl"].backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)


# ------------------------------------------------------------------------------------- config


def test_host_config_is_completed_with_the_host_defaults_and_round_trips():
    config = MorConfig(host_config={"top_k": 1})
    assert config.host_config["top_k"] == 1 and config.host_config["r"] == 16 and config.host_config["num_experts"] == 8
    assert MorConfig(**config.to_dict()) == config


@pytest.mark.parametrize("values,message", [
    ({"num_routers": 0}, r"num_routers \(0\)"),
    ({"combine": "sum"}, "combine"),
    ({"host": "mole"}, r"host \('mole'\) must be one of"),
    ({"host_config": {"experts": 4}}, r"host_config: unknown field\(s\) \['experts'\]"),
    ({"host_config": {"num_experts": 2, "top_k": 3}}, r"host_config \(mixlora\): top_k \(3\) must be <= num_experts"),
    ({"target_modules": ["q_proj"]}, "set the targets in host_config"),
    ({"host": "per_linear", "host_config": {"aux_loss_reduction": "sum"}}, "aux_loss_reduction"),
])
def test_bad_values_name_the_field(values, message):
    with pytest.raises(AdapterConfigError, match=message):
        MorConfig(**values)


# ------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("overrides", [(), ("adapter.host=per_linear",)])
def test_training_run_with_mor(tmp_path, overrides):
    # lm-eval is covered by test_training; here the run must train, validate and record routing
    cfg = compose_config("model=tiny_random", "data=tiny", "adapter=mor", "trainer.max_steps=3", "logger=csv",
                         "callbacks=none", "eval.enabled=false", "data.max_test_examples=4",
                         f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    host = overrides[0].split("=")[1] if overrides else "mixlora"
    assert saved["status"] == "ok" and saved["label"] == f"mor/{host} [reconstruction]"
    assert results["routing"]["train"]["routing/entropy"] > 0 and results["routing"]["dev"]


def test_per_linear_grouped_experts_equal_the_dense_reference():
    # training mode (dropout off): outputs and the gradients of input, routers and experts agree
    results = []
    for compute in ("dense", "grouped"):
        torch.manual_seed(0)
        model, adapter = host_model("per_linear", {**HOST_CONFIGS["per_linear"], "lora_dropout": 0.0,
                                                   "expert_compute": compute})
        randomize(model)
        layer = model.model.layers[0].mlp.down_proj.train()
        inputs = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(3), requires_grad=True)
        out = layer(inputs)
        params = [inputs, *layer.router.parameters(), *layer.experts.parameters()]
        results.append((out, torch.autograd.grad(out.square().sum(), params)))
    (dense, dense_grads), (grouped, grouped_grads) = results
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(grouped_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mor_passes_its_compute_flags_to_the_host():
    assert PerLinearConfig().expert_compute == "dense"
    config = MorConfig(host="per_linear", expert_compute="grouped", lora_dropout_sharing="per_input")
    assert config.host_adapter_config().expert_compute == "grouped"
    assert config.host_adapter_config().lora_dropout_sharing == "per_input"
    with pytest.raises(AdapterConfigError, match="expert_compute: set it here or in host_config"):
        MorConfig(expert_compute="dense", host_config={"expert_compute": "grouped"})
