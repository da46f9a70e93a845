"""FURINA against the equations of methods.md §6: forward pass, merge identity, selection loss, init."""

import copy

import pytest
import torch
from conftest import randomize_adapter, tiny_model, token_batch
from torch import nn

import moelab.adapters.furina as furina
from moelab.adapters import (
    AdapterConfigError,
    adapter_layers,
    adapter_state_dict,
    inject,
    load_adapter_state_dict,
    merge_and_unload,
)
from moelab.adapters.base import LLAMA_PROJECTIONS, BatchContext
from moelab.adapters.furina import FurinaConfig, FurinaLinear
from moelab.adapters.lora import LoraConfig, LoraLinear


def layer(d_in=12, d_out=10, dtype=torch.float64, seed=0, **fields) -> FurinaLinear:
    """A FURINA layer with random values in every adapter tensor (v included), so nothing is trivially zero."""
    torch.manual_seed(seed)
    config = FurinaConfig(**{"num_experts": 4, "num_shared_experts": 1, "r": 3, "lora_dropout": 0.0, **fields})
    module = FurinaLinear(nn.Linear(d_in, d_out, dtype=dtype), config)
    with torch.no_grad():
        for parameter in (module.experts.lora_A, module.experts.lora_B, module.magnitude):
            parameter.normal_()
    return module


def reference_delta(module: FurinaLinear) -> torch.Tensor:
    """ΔW written out expert by expert (§6.1), with each W_j = B_j A_j formed and its rows normed directly."""
    config, experts = module.config, module.experts
    delta = torch.zeros_like(module.base_layer.weight)
    for j in range(config.num_experts):
        w = experts.lora_B[j] @ experts.lora_A[j]
        if j < config.num_shared_experts:
            delta = delta + experts.scaling[j] * w
        else:
            d = w.norm(dim=1) if config.magnitude_norm == "l2_row" else w.sum(dim=1)
            d = d.detach() if config.detach_norm else d
            delta = delta + (module.magnitude / (d + config.eps))[:, None] * w
    return delta


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train_steps(model, adapter, steps: int, lr: float) -> list[dict[str, bool]]:
    """AdamW on CE + aux; returns, per step, which adapter tensors (per expert) got a non-zero gradient."""
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(model), lr=lr)
    model.train()
    report = []
    for step in range(steps):
        batch = token_batch(batch=4, seq=16, seed=step)
        adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss = output.loss + sum(adapter.aux_losses(model).values())
        optimizer.zero_grad()
        loss.backward()
        report.append(gradient_report(model))
        optimizer.step()
    adapter.set_context(model, None, None)  # as the trainer does after fit: later forwards see no batch
    return report


def gradient_report(model) -> dict[str, bool]:
    received = {}
    for name, module in adapter_layers(model):
        experts = module.experts
        for j in range(experts.num_experts):
            received[f"{name}.A{j}"] = bool(experts.lora_A.grad[j].abs().sum() > 0)
            received[f"{name}.B{j}"] = bool(experts.lora_B.grad[j].abs().sum() > 0)
        received[f"{name}.v"] = bool(module.magnitude.grad.abs().sum() > 0)
    return received


# -- initialisation --------------------------------------------------------------------------------------


def test_is_the_base_model_at_initialisation():
    base, _ = tiny_model()
    model, _ = tiny_model()
    inject(model, FurinaConfig())
    batch = token_batch()
    assert torch.equal(logits(model, batch), logits(base, batch))
    _, first = next(adapter_layers(model))
    experts = first.experts
    assert experts.num_experts == 8 and experts.rank == 16
    assert torch.count_nonzero(experts.lora_B[0]) == 0, "shared expert: PEFT init, B = 0"
    assert torch.count_nonzero(first.magnitude) == 0, "v = 0"
    assert experts.lora_B[1:].std().item() == pytest.approx(1e-3, rel=0.05), "self-routing B ~ N(0, 1e-3)"
    assert experts.scaling.tolist() == [32 / 16] + [1.0] * 7, "α/r for the shared expert only"
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)}) == sorted(LLAMA_PROJECTIONS)


def test_every_part_receives_gradient_within_two_steps():
    model, _ = tiny_model()
    adapter = inject(model, FurinaConfig())
    first, second = train_steps(model, adapter, steps=2, lr=1e-3)
    assert all(got for key, got in first.items() if key.endswith(".v")), "v learns from the first step"
    assert not any(got for key, got in first.items() if key.endswith(("A1", "B1"))), "v = 0 shields them at step 0"
    missing = [key for key in first if not (first[key] or second[key])]
    assert not missing, f"no gradient after two steps: {missing[:5]}"


# -- forward pass and merge identity ---------------------------------------------------------------------


@pytest.mark.parametrize("magnitude_norm", ["l2_row", "row_sum"])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_forward_equals_the_expert_wise_equation(magnitude_norm, detach_norm):
    module = layer(magnitude_norm=magnitude_norm, detach_norm=detach_norm)
    module.eval()
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    expected = module.base_layer(x) + x @ reference_delta(module).T
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-10)
    parameters = [module.experts.lora_A, module.experts.lora_B, module.magnitude]
    fast = torch.autograd.grad(module(x).square().sum(), parameters)
    reference = torch.autograd.grad(expected.square().sum(), parameters)
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("magnitude_norm", ["l2_row", "row_sum"])
def test_delta_weight_is_the_expert_wise_sum_and_one_lora_of_rank_n_r(magnitude_norm):
    module = layer(magnitude_norm=magnitude_norm)
    torch.testing.assert_close(module.get_delta_weight(), reference_delta(module), rtol=0, atol=1e-10)
    lora_A, lora_B = module.low_rank_factors()
    assert lora_A.shape == (4 * 3, 12) and lora_B.shape == (10, 4 * 3)
    torch.testing.assert_close(lora_B @ lora_A, module.get_delta_weight(), rtol=0, atol=1e-12)


def test_row_sum_uses_w_times_ones():
    module = layer(magnitude_norm="row_sum")
    a, b = module.experts.lora_A[1:], module.experts.lora_B[1:]
    torch.testing.assert_close(module.row_norms(), (b @ a).sum(-1), rtol=0, atol=1e-12)
    l2 = layer(magnitude_norm="l2_row")
    torch.testing.assert_close(l2.row_norms(), (b @ a).norm(dim=-1), rtol=0, atol=1e-12)


def test_merged_equals_unmerged_after_training():
    model, _ = tiny_model()
    adapter = inject(model, FurinaConfig())
    train_steps(model, adapter, steps=5, lr=1e-2)
    _, first = next(adapter_layers(model))
    assert first.magnitude.abs().min() > 0 and first.experts.lora_B[0].abs().min() > 0, "trained, non-zero"
    batch = token_batch(batch=3, seq=20, seed=7)
    base, _ = tiny_model()
    unmerged = logits(model, batch)
    merged = logits(merge_and_unload(copy.deepcopy(model), safe_merge=True), batch)
    assert (unmerged - logits(base, batch)).abs().max() > 1e-2, "the adapter must matter for this check"
    assert (merged - unmerged).abs().max() <= 1e-5


def test_bf16_base_adds_the_fp32_update_before_one_cast():
    torch.manual_seed(0)
    module = FurinaLinear(nn.Linear(64, 48).to(torch.bfloat16), FurinaConfig(num_experts=4, r=3, lora_dropout=0.0))
    with torch.no_grad():
        for parameter in (module.experts.lora_A, module.experts.lora_B, module.magnitude):
            parameter.normal_(0.0, 0.3)
    module.eval()
    x = torch.randn(50, 64).to(torch.bfloat16)
    with torch.no_grad():
        out = module(x)
        update = x.double() @ module.get_delta_weight().double().T
        rounded_once = (module.base_layer(x).double() + update).to(torch.bfloat16)
    # rounding the fp32 update to bf16 before the add would miss about a quarter of these entries
    assert out.dtype == torch.bfloat16 and (out != rounded_once).float().mean() < 0.01


@pytest.mark.parametrize("num_experts", [1, 3])
def test_shared_experts_only_is_plain_lora(num_experts):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, dtype=torch.float64)
    ours = FurinaLinear(copy.deepcopy(base), FurinaConfig(num_experts=num_experts, num_shared_experts=num_experts,
                                                          r=2, lora_alpha=4, lora_dropout=0.0))
    # N shared experts of rank r and scale α/r are one LoRA of rank N·r and scale (Nα)/(Nr)
    lora = LoraLinear(copy.deepcopy(base), LoraConfig(r=2 * num_experts, lora_alpha=4 * num_experts))
    with torch.no_grad():
        ours.experts.lora_B.normal_()
        lora.lora.lora_A.copy_(ours.experts.lora_A.reshape(1, -1, 12))
        lora.lora.lora_B.copy_(ours.experts.lora_B.permute(1, 0, 2).reshape(1, 10, -1))
    assert not any("magnitude" in name for name, _ in ours.named_parameters()), "no v without self-routing experts"
    ours.train()
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), lora(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.get_delta_weight(), lora.get_delta_weight(), rtol=0, atol=1e-12)
    assert ours.routing is None and ours.aux_losses() == {}


# -- expert selection loss (§6.3) -----------------------------------------------------------------------


def hand_case(loss_activation: str = "scaled") -> FurinaLinear:
    """3 self-routing experts, r = 1, d = 3: A_j = e_jᵀ, B_j = e_j, so W_j = e_j e_jᵀ, d_j = e_j and
    v ⊙ Ŵ_j x = v_j x_j e_j (up to ε): the activation of expert j is v_j |x_j|."""
    module = FurinaLinear(nn.Linear(3, 3, bias=False), FurinaConfig(
        target_modules=["x"], num_experts=3, num_shared_experts=0, r=1, lora_dropout=0.0, top_k=2,
        aux_loss_coef=0.01, loss_activation=loss_activation))
    with torch.no_grad():
        module.experts.lora_A.copy_(torch.eye(3)[:, None, :])
        module.experts.lora_B.copy_(torch.eye(3)[:, :, None])
        module.magnitude.copy_(torch.tensor([1.0, 2.0, 1.0]))
    return module


# scaled activations (9, 3, 0), (0, 3, 3), (3, 6, 9); a fourth, masked token would dominate expert 2
HAND_X = torch.tensor([[9.0, 1.5, 0.0], [0.0, 1.5, 3.0], [3.0, 3.0, 9.0], [0.0, 0.0, 70.0]])
HAND_MASK = torch.tensor([[True, True, True, False]])


def test_selection_loss_equals_the_hand_computed_value():
    module = hand_case()
    module.context = BatchContext(token_mask=HAND_MASK)
    module.eval()  # the token mask alone asks for the loss and the routing record
    module(HAND_X[None])
    # q = (3/4, 1/4, 0), (0, 1/2, 1/2), (1/6, 1/3, 1/2); top-2 = {0,1}, {1,2}, {1,2}
    # L_div = 1 − (1 + 1 + 5/6)/3 = 1/18
    # F = (1, 3, 2)/3/2 = (1/6, 1/2, 1/3); P = (11/36, 13/36, 12/36); L_bal = 3 · 74/216 = 37/36
    losses = module.aux_losses()
    assert losses["selection_div"].item() == pytest.approx(0.01 / 18, rel=1e-5)
    assert losses["selection_bal"].item() == pytest.approx(0.01 * 37 / 36, rel=1e-5)
    expected_q = torch.tensor([[3 / 4, 1 / 4, 0], [0, 1 / 2, 1 / 2], [1 / 6, 1 / 3, 1 / 2]])
    torch.testing.assert_close(module.routing.probs[:3], expected_q, rtol=0, atol=1e-6)
    assert [sorted(row) for row in module.routing.selected[:3].tolist()] == [[0, 1], [1, 2], [1, 2]]


def test_unscaled_activations_ignore_v():
    module = hand_case("unscaled")
    module.context = BatchContext(token_mask=HAND_MASK)
    module.eval()
    module(HAND_X[None])
    # activations |x_j|: the first token's shares are (9, 1.5, 0) / 10.5
    torch.testing.assert_close(module.routing.probs[0], torch.tensor([6 / 7, 1 / 7, 0.0]), rtol=0, atol=1e-6)


def test_unscaled_activations_reuse_the_forwards_row_norms(monkeypatch):
    module = layer(dtype=torch.float32, loss_activation="unscaled")
    module.train()
    calls = []
    row_norms = module.row_norms
    monkeypatch.setattr(module, "row_norms", lambda: calls.append(1) or row_norms())
    module(torch.randn(6, 12))
    assert module.routing is not None and len(calls) == 1, "d_j once per training forward"


def test_output_norms_equal_the_direct_norms():
    torch.manual_seed(0)
    h, b = torch.randn(9, 4, 3, dtype=torch.float64), torch.randn(4, 10, 3, dtype=torch.float64)
    direct = torch.einsum("jor,tjr->tjo", b, h).norm(dim=-1)
    torch.testing.assert_close(furina.output_norms(h, b), direct, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_activation", ["scaled", "unscaled"])
def test_training_forward_keeps_no_weight_sized_tensor_for_backward(loss_activation):
    # B̃ (or Ŵ) of the selection loss, B_j G_j of the row norms and the folded update factor are each as large as
    # the self-routing experts' B: autograd would keep them until backward, in every adapted linear
    module = layer(d_out=40, dtype=torch.float32, loss_activation=loss_activation)
    module.train()
    frozen = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    kept = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in frozen:
            kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = module(torch.randn(3, 12, requires_grad=True))
        sum(module.aux_losses().values(), out.square().sum()).backward()
    assert kept and max(t.numel() for t in kept) < module.num_self_routing * 40 * module.config.r
    assert module.magnitude.grad.abs().sum() > 0 and module.experts.lora_B.grad.abs().sum() > 0


def test_selection_loss_backpropagates_at_v_zero_without_nan():
    module = layer(dtype=torch.float32)
    with torch.no_grad():
        module.magnitude.zero_()
    module.train()
    module(torch.randn(6, 12))
    loss = sum(module.aux_losses().values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    # v = 0: every activation is 0, and the routing record is uniform (rows sum to 1)
    torch.testing.assert_close(module.routing.probs, torch.full((6, 3), 1 / 3))


def test_plain_eval_forward_computes_no_activations(monkeypatch):
    module = layer(dtype=torch.float32)
    x = torch.randn(2, 5, 12)
    module.eval()
    with_mask = BatchContext(token_mask=torch.ones(2, 5, dtype=torch.bool))
    module.context = with_mask
    recorded = module(x)
    assert module.routing is not None and set(module.aux_losses()) == {"selection_div", "selection_bal"}

    def forbidden(*args):
        raise AssertionError("selection activations computed in a plain eval forward")

    monkeypatch.setattr(furina, "output_norms", forbidden)
    module.context = BatchContext()
    plain = module(x)
    assert module.routing is None and module.aux_losses() == {}
    assert torch.equal(plain, recorded), "the activations never change the output"


# -- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,message", [
    ({"num_experts": 0}, r"num_experts \(0\)"),
    ({"num_shared_experts": 9}, r"num_shared_experts \(9\)"),
    ({"top_k": 8}, r"top_k \(8\) must be <= the number of self-routing experts"),
    ({"magnitude_norm": "l1"}, "magnitude_norm"),
    ({"loss_activation": "raw"}, "loss_activation"),
    ({"eps": 0.0}, r"eps \(0.0\)"),
    ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
    ({"self_routing_init_std": 0.0}, "self_routing_init_std"),
])
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(AdapterConfigError, match=message):
        FurinaConfig(**fields)


def test_inference_reuses_the_normalised_experts_until_the_weights_change():
    model, _ = tiny_model()
    inject(model, FurinaConfig())
    randomize_adapter(model, scale=0.1)
    layer = next(layer for _, layer in adapter_layers(model))
    with torch.no_grad():
        first = layer.inference_B()
        assert layer.inference_B() is first, "cached while nothing changed"
        torch.testing.assert_close(first, layer.effective_B())
        layer.magnitude.add_(1.0)  # an optimiser step updates in place
        second = layer.inference_B()
    assert second is not first
    torch.testing.assert_close(second, layer.effective_B())


# -- the inference cache stays fresh ----------------------------------------------------------------------


def cache_x(module: FurinaLinear) -> torch.Tensor:
    x = torch.randn(2, 5, module.base_layer.in_features, generator=torch.Generator().manual_seed(5))
    return x.to(module.base_layer.weight.dtype)


def cached_model():
    """A trained-looking FURINA model in eval mode whose layers have filled their inference cache."""
    model, _ = tiny_model()
    adapter = inject(model, FurinaConfig())
    randomize_adapter(model, scale=0.1)
    model.eval()
    for _, module in adapter_layers(model):
        with torch.no_grad():
            module(cache_x(module))
        assert module._inference_cache is not None
    return model, adapter, next(module for _, module in adapter_layers(model))


def assert_fresh(module: FurinaLinear) -> None:
    """The cached path (eval, no autograd) gives what computing afresh gives, B and output alike."""
    module.eval()
    x = cache_x(module)
    with torch.no_grad():
        cached_B, cached_out = module.inference_B(), module(x)
    fresh_B = module.effective_B().detach()
    assert torch.equal(cached_B, fresh_B), f"stale cache: off by {(cached_B - fresh_B).abs().max():.3g}"
    with torch.enable_grad():
        assert torch.equal(cached_out, module(x).detach())


def test_cache_is_fresh_after_an_optimizer_step():
    model, adapter, module = cached_model()
    train_steps(model, adapter, steps=1, lr=1e-2)
    assert_fresh(module)


def test_cache_is_fresh_after_loading_adapter_weights():
    model, _, module = cached_model()
    other, _ = tiny_model()
    inject(other, FurinaConfig())
    randomize_adapter(other, scale=0.1, seed=9)
    load_adapter_state_dict(model, adapter_state_dict(other))
    assert module._inference_cache is None, "the load goes through the layer's load_state_dict pre-hook"
    assert_fresh(module)
    with torch.no_grad():
        module(cache_x(module))
    model.load_state_dict(model.state_dict())  # plain torch loading too
    assert module._inference_cache is None


def test_cache_is_fresh_after_dtype_round_trips():
    model, _, module = cached_model()
    model.to(torch.bfloat16)
    assert module._inference_cache is None and module.experts.lora_B.dtype == torch.bfloat16
    assert_fresh(module)
    model.to(torch.float32)
    assert_fresh(module)


def test_cache_is_dropped_on_a_train_eval_switch_after_a_data_write():
    model, _, module = cached_model()
    module.magnitude.data.mul_(2.0)  # bypasses the version counter, like FSDP's storage swaps
    model.train()
    model.eval()
    assert_fresh(module)


def test_cache_is_not_used_in_training_mode():
    model, _, module = cached_model()
    model.train()
    with torch.no_grad():
        module(cache_x(module))
    assert module._inference_cache is None, "no_grad alone (a validation step inside fit) does not cache"


def test_inference_mode_computes_without_a_version_counter():
    model, _, module = cached_model()
    with torch.inference_mode():
        assert torch.equal(module.inference_B(), module.effective_B())
    with torch.inference_mode():  # built here, the tensors are inference tensors without a version counter
        built = layer(dtype=torch.float32)
        built.eval()
        x = torch.randn(3, 12)
        expected = built.base_layer(x) + x @ reference_delta(built).T
        torch.testing.assert_close(built(x), expected, rtol=1e-5, atol=1e-5)
        assert built._inference_cache is None


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("loss_activation", ["scaled", "unscaled"])
def test_fused_forward_equals_the_step_by_step_equation(loss_activation, dtype, tolerance):
    # the equation computed as written (§6.1): divide B_j by d_j + ε, multiply by v, scale every expert's
    # output, sum with the base; outputs (relative to their largest entry) and gradients agree with the fused
    # forward, whose rounding differs only in the order of the products
    module = layer(dtype=dtype, loss_activation=loss_activation)
    module.train()
    with torch.no_grad():
        module.magnitude.normal_()
    x = torch.randn(2, 5, 12, dtype=dtype, requires_grad=True)
    params = [x, *(p for p in module.parameters() if p.requires_grad)]
    out = module(x)
    fused = (out, *module.losses.values())
    experts, shared = module.experts, module.num_shared
    h = experts.down(x)
    directions = experts.lora_B[shared:] / (module.row_norms() + module.config.eps)[..., None]
    b = torch.cat([experts.lora_B[:shared], module.magnitude[:, None] * directions])
    expected = module.base_layer(x) + torch.einsum("...er,eor->...o", h * experts.scaling[:, None], b)
    assert (out - expected).abs().max() <= tolerance * expected.abs().max()
    loss = sum(t.square().sum() for t in fused)
    module(x)
    reference_loss = expected.square().sum() + sum(t.square().sum() for t in module.losses.values())
    for a, c in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference_loss, params), strict=True):
        assert (a - c).abs().max() <= 10 * tolerance * c.abs().max()
