"""The adapter contract, checked for every registered method with its default config on the tiny model.

Parametrised over the registry: a new method file plus its conf/adapter/<name>.yaml is tested here without
editing this file. Invariants follow HF PEFT's own suite (assets.md §3.5).
"""

import copy
import warnings

import pytest
import torch
from conftest import CONF, compose_config, randomize_adapter, tiny_model, token_batch

from moelab.adapters import (
    MergeError,
    adapter_layers,
    adapter_parameters,
    adapter_state_dict,
    disable_adapters,
    inject,
    load_adapter_state_dict,
    merge,
    merge_and_unload,
    registered_adapters,
    routed_modules,
    unmerge,
)
from moelab.adapters.base import FIDELITY_LABELS
from moelab.modules.training import adapter_config

METHODS = sorted(registered_adapters())
MERGEABLE = [name for name in METHODS if registered_adapters()[name].mergeable]
NOT_MERGEABLE = [name for name in METHODS if not registered_adapters()[name].mergeable]


def default_config(name: str):
    return adapter_config(compose_config("model=tiny_random", "data=tiny", f"adapter={name}"))


def injected(name: str, seed: int = 0):
    """Tiny model with the method injected; adapter init drawn from ``seed``."""
    model, _ = tiny_model()
    torch.manual_seed(seed)
    adapter = inject(model, default_config(name))
    return model, adapter


perturb = randomize_adapter


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def run_forward(model, adapter, batch):
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


@pytest.mark.parametrize("name", METHODS)
def test_config_file_and_facts(name):
    assert (CONF / "adapter" / f"{name}.yaml").exists(), f"conf/adapter/{name}.yaml is missing"
    adapter_cls = registered_adapters()[name]
    assert adapter_cls.fidelity in FIDELITY_LABELS
    assert adapter_cls.__module__.endswith(f".{name}") or name in adapter_cls.__module__, "one file per method"
    assert adapter_cls.__doc__ or __import__(adapter_cls.__module__, fromlist=["x"]).__doc__, "method docstring"
    assert "methods.md" in __import__(adapter_cls.__module__, fromlist=["x"]).__doc__, "cite methods.md"


@pytest.mark.parametrize("name", METHODS)
def test_identity_at_initialisation(name, batch):
    base, _ = tiny_model()
    model, _ = injected(name)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_perturbed_adapter_changes_output(name, batch):
    # guards every equivalence check below: a perturbed adapter must not be a no-op
    base, _ = tiny_model()
    model, _ = injected(name)
    perturb(model)
    assert (logits(model, batch) - logits(base, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("name", METHODS)
def test_only_adapter_parameters_train(name):
    model, adapter = injected(name)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if k not in adapter_state_dict(model)}
    trainable = adapter.trainable_parameters(model)
    assert trainable, "nothing to train"
    assert {id(p) for p in trainable} <= {id(p) for _, p in adapter_parameters(model)}
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    schedule = adapter.stage_schedule(max_steps=3)
    model.train()
    for step in range(3):
        for start, stage in schedule:
            if start == step:
                adapter.enter_stage(model, stage)
        output = run_forward(model, adapter, token_batch(batch=4, seq=16, seed=step))
        loss = output.loss + sum(adapter.aux_losses(model).values(), torch.zeros(()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, trainable, strict=True))
    assert moved > 0, "no adapter parameter changed"
    for key, value in model.state_dict().items():
        if key in base_before:
            assert torch.equal(value, base_before[key]), f"frozen base tensor {key} changed"


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip_with_another_seed(name, batch):
    model, _ = injected(name, seed=0)
    perturb(model)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert state and all("base_layer" not in k for k in state), "adapter state must hold adapter tensors only"
    reloaded, _ = injected(name, seed=123)
    load_adapter_state_dict(reloaded, state)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_load_rejects_wrong_keys_and_shapes(name):
    model, _ = injected(name)
    state = adapter_state_dict(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing adapter keys"):
        load_adapter_state_dict(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(model, {**state, key: torch.zeros(*state[key].shape, 2)})


@pytest.mark.parametrize("name", METHODS)
def test_disable_adapters_gives_base_output(name, batch):
    base, _ = tiny_model()
    model, _ = injected(name)
    perturb(model)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=1e-6)
    assert (logits(model, batch) - logits(base, batch)).abs().max() > 1e-3, "context must restore the adapter"


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_equals_unmerged(name, batch):
    model, _ = injected(name)
    perturb(model, scale=0.1)
    weights_before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    expected = logits(model, batch)
    merge(model)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(model)  # idempotent: warns, changes nothing
    assert caught
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-4, atol=1e-5)
    unmerge(model)
    for key, value in model.state_dict().items():
        if key in weights_before:
            torch.testing.assert_close(value, weights_before[key], rtol=0, atol=1e-6)
    unloaded = merge_and_unload(copy.deepcopy(model))
    assert not list(adapter_layers(unloaded))
    torch.testing.assert_close(logits(unloaded, batch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MERGEABLE)
def test_safe_merge_refuses_nan_and_leaves_base_untouched(name):
    model, _ = injected(name)
    perturb(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    _, first = next(iter(adapter_parameters(model)))
    with torch.no_grad():
        first.view(-1)[0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        merge_and_unload(model, safe_merge=True)
    for key, value in model.state_dict().items():
        if key in base_weights:
            assert torch.equal(value, base_weights[key])


def patch_delta(layer, delta: torch.Tensor) -> None:
    """Make ``layer`` report ``delta`` as its update (the merge machinery is the same for every method)."""
    layer.get_delta_weight = lambda: delta.clone()


@pytest.mark.parametrize("name", MERGEABLE)
def test_safe_merge_checks_the_merged_weight_not_only_the_update(name):
    model, _ = injected(name)
    model.to(torch.bfloat16)
    *_, (last_name, last) = adapter_layers(model)
    with torch.no_grad():
        last.base_layer.weight[0, 0] = 3e38  # near bf16's largest value
    patch_delta(last, torch.full(last.base_layer.weight.shape, 1e38))  # finite, but W + ΔW is not
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with pytest.raises(MergeError, match=f"{last_name}.*NaN or Inf .*bfloat16.*nothing was merged"):
        merge(model, safe_merge=True)
    assert all(torch.equal(v, base_weights[k]) for k, v in model.state_dict().items() if k in base_weights), \
        "the layers before the failing one must not change either"
    assert not any(layer.merged for _, layer in adapter_layers(model))


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_computes_one_update_at_a_time_without_autograd(safe_merge):
    import weakref

    model, _ = injected("lora")
    perturb(model)
    alive, grad_modes = [], []
    for _, layer in adapter_layers(model):
        def tracked(compute=layer.get_delta_weight):
            grad_modes.append(torch.is_grad_enabled())
            alive[:] = [ref for ref in alive if ref() is not None]
            assert not alive, "an earlier layer's dense ΔW is still alive"
            delta = compute()
            alive.append(weakref.ref(delta))
            return delta
        layer.get_delta_weight = tracked
    merge(model, safe_merge=safe_merge)
    assert grad_modes and not any(grad_modes), "ΔW must be computed under no_grad (no autograd graph)"
    assert all(layer.merged for _, layer in adapter_layers(model))


@pytest.mark.parametrize("name", MERGEABLE)
def test_loading_adapter_weights_into_merged_layers_is_refused(name):
    model, _ = injected(name)
    perturb(model)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    merge(model)
    with pytest.raises(MergeError, match="unmerge"):
        load_adapter_state_dict(model, state)
    unmerge(model)
    load_adapter_state_dict(model, state)


@pytest.mark.parametrize("name", MERGEABLE)
def test_disable_adapters_merges_again_only_the_layers_that_were_merged(name, batch):
    model, _ = injected(name)
    perturb(model, scale=0.1)
    expected = logits(model, batch)
    merge(model.model.layers[0])  # a partly merged model
    was_merged = {site: layer.merged for site, layer in adapter_layers(model)}
    assert any(was_merged.values()) and not all(was_merged.values())
    with disable_adapters(model):
        pass
    assert {site: layer.merged for site, layer in adapter_layers(model)} == was_merged
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NOT_MERGEABLE)
def test_refuses_to_merge(name):
    model, _ = injected(name)
    with pytest.raises(MergeError, match="cannot be merged"):
        merge(model)


@pytest.mark.parametrize("name", METHODS)
def test_routing_records_and_aux_losses(name):
    model, adapter = injected(name)
    model.train()
    run_forward(model, adapter, token_batch(batch=2, seq=8))
    for site, module in routed_modules(model):
        routing = module.routing
        tokens, experts = routing.probs.shape
        assert tokens == 16, f"{site}: one routing row per token"
        torch.testing.assert_close(routing.probs.sum(-1), torch.ones(tokens), rtol=0, atol=1e-5)
        assert routing.selected.dtype == torch.long and routing.selected.shape[0] == tokens
        assert int(routing.selected.min()) >= 0 and int(routing.selected.max()) < experts
    for key, value in adapter.aux_losses(model).items():
        assert value.dim() == 0 and torch.isfinite(value), key


@pytest.mark.parametrize("name", METHODS)
def test_finite_in_bfloat16(name, batch):
    model, _ = injected(name)
    perturb(model, scale=0.05)
    model.to(torch.bfloat16)
    out = logits(model, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_layers_to_transform_limits_every_method_to_those_layers(name):
    model, _ = tiny_model()
    config = default_config(name)
    config = type(config)(**{**config.to_dict(), "layers_to_transform": [1]})
    inject(model, config)
    sites = [site for site, _ in adapter_parameters(model)]
    assert sites and all(".layers.1." in site for site in sites), sites[:3]
