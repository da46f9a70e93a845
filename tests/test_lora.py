"""LoRA against HF PEFT on identical weights (methods.md §1, assets.md §3.1), and the stacked experts."""

import copy
import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from moelab.adapters import AdapterConfigError, adapter_layers, count_parameters, inject
from moelab.adapters.experts import LoraExperts, SharedDropout, expert_chunks, stacked_up
from moelab.adapters.lora import LoraConfig, LoraLinear


def peft_layer(base: nn.Linear, r: int, alpha: float, use_rslora: bool):
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    config = PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.1, use_rslora=use_rslora)
    return PeftLinear(base, adapter_name="default", config=config, r=r, lora_alpha=alpha, lora_dropout=0.1,
                      use_rslora=use_rslora)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_and_merge_match_peft(dtype, atol, use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True).to(dtype)
    theirs = peft_layer(nn.Linear(24, 40, bias=True).to(dtype), r=4, alpha=8, use_rslora=use_rslora)
    theirs.base_layer.load_state_dict(base.state_dict())
    ours = LoraLinear(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=use_rslora))
    with torch.no_grad():
        theirs.lora_A["default"].weight.normal_()
        theirs.lora_B["default"].weight.normal_()
        ours.lora.lora_A.copy_(theirs.lora_A["default"].weight[None])
        ours.lora.lora_B.copy_(theirs.lora_B["default"].weight[None])
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 7, 24, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=atol)
    assert ours.lora.scaling.item() == pytest.approx(theirs.scaling["default"])
    torch.testing.assert_close(ours.get_delta_weight(), theirs.get_delta_weight("default"), rtol=0, atol=atol)


def test_bf16_base_adds_the_fp32_lora_output_before_one_cast_like_peft():
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(torch.bfloat16)
    theirs = peft_layer(copy.deepcopy(base), r=4, alpha=8, use_rslora=False)
    for module in (theirs.lora_A["default"], theirs.lora_B["default"]):
        module.float()  # what PEFT's autocast_adapter_dtype does; ours are fp32 under a bf16 base already
    ours = LoraLinear(base, LoraConfig(r=4, lora_alpha=8))
    assert ours.lora.lora_A.dtype == torch.float32
    with torch.no_grad():
        theirs.lora_A["default"].weight.normal_()
        theirs.lora_B["default"].weight.normal_(0.0, 0.3)
        ours.lora.lora_A.copy_(theirs.lora_A["default"].weight[None])
        ours.lora.lora_B.copy_(theirs.lora_B["default"].weight[None])
    ours.eval()
    theirs.eval()
    x = torch.randn(50, 64).to(torch.bfloat16)
    with torch.no_grad():
        out = ours(x)
        # adding in bf16 (base + lora.to(bf16)) rounds twice and differs from PEFT in about a quarter of entries
        assert out.dtype == torch.bfloat16 and torch.equal(out, theirs(x))


def test_peft_init_conventions():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(256, 32), LoraConfig(r=8, lora_alpha=16))
    assert torch.count_nonzero(layer.lora.lora_B) == 0, "B starts at zero"
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=√5) on fan_in = d_in
    assert layer.lora.lora_A.abs().max() <= bound and layer.lora.lora_A.abs().max() > 0.9 * bound
    assert layer.lora.scaling.item() == 2.0
    rs = LoraLinear(nn.Linear(256, 32), LoraConfig(r=16, lora_alpha=16, use_rslora=True))
    assert rs.lora.scaling.item() == pytest.approx(16 / 4)


def test_dropout_acts_on_the_lora_input_only():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), LoraConfig(r=2, lora_alpha=2, lora_dropout=0.5, init_lora_weights="random"))
    layer.train()
    x = torch.randn(64, 8)
    base_out = layer.base_layer(x)
    # with B A = 0 the dropout would be invisible; the random init makes it visible
    assert not torch.allclose(layer(x), layer(x))
    with torch.no_grad():
        layer.lora.lora_B.zero_()
    torch.testing.assert_close(layer(x), base_out)


def test_targets_and_all_linear():
    model, _ = tiny_model()
    inject(model, LoraConfig(target_modules="all-linear"))
    names = [name.rsplit(".", 1)[-1] for name, _ in adapter_layers(model)]
    assert sorted(set(names)) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "lm_head" not in names and len(names) == 14
    params = count_parameters(model)
    expected = sum(layer.lora.lora_A.numel() + layer.lora.lora_B.numel() for _, layer in adapter_layers(model))
    assert params["trainable"] == params["adapter"] == expected


def test_unknown_target_names_the_module():
    model, _ = tiny_model()
    with pytest.raises(AdapterConfigError, match=r"\['qproj'\] match no nn.Linear"):
        inject(model, LoraConfig(target_modules=["qproj"]))


@pytest.mark.parametrize("field,value,message", [
    ("r", 0, "r \\(0\\) must be a positive integer"),
    ("lora_dropout", 1.5, "lora_dropout"),
    ("init_lora_weights", "xavier", "init_lora_weights"),
    ("target_modules", "all", "target_modules"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(AdapterConfigError, match=message):
        LoraConfig(**{field: value})


@pytest.mark.parametrize("tokens", [1, 9])
def test_stacked_experts_fast_path_equals_reference(tokens):
    torch.manual_seed(0)
    experts = LoraExperts(4, 12, 10, rank=3, alpha=6, init="random")
    weights = torch.softmax(torch.randn(tokens, 4), -1)
    weights[:, 2] = 0.0  # an expert that receives no token
    x = torch.randn(tokens, 12, requires_grad=True)
    fast = experts(x, weights)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, experts.lora_A, experts.lora_B])
    reference = experts.reference(x, weights)
    grads_reference = torch.autograd.grad(reference.square().sum(), [x, experts.lora_A, experts.lora_B])
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_fast, grads_reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(grads_fast[1][2]) == 0, "an unused expert gets no gradient"


def test_loaded_expert_of_smaller_rank_is_zero_padded():
    torch.manual_seed(0)
    experts = LoraExperts(2, 6, 5, rank=4, alpha=4)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    experts.load_expert(1, a, b, scaling=3.0)
    x = torch.randn(7, 6)
    torch.testing.assert_close(experts.expert_delta(x, 1), 3.0 * x @ a.T @ b.T)
    with pytest.raises(ValueError, match="does not fit"):
        experts.load_expert(0, torch.randn(5, 6), torch.randn(5, 5), 1.0)


def test_layers_to_transform_selects_decoder_layers():
    model, _ = tiny_model()
    inject(model, LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert [name for name, _ in adapter_layers(model)] == ["model.layers.1.self_attn.q_proj",
                                                           "model.layers.1.self_attn.v_proj"]
    with pytest.raises(AdapterConfigError, match=r"layers_to_transform \(\[5\]\) selects no target"):
        inject(tiny_model()[0], LoraConfig(layers_to_transform=[5]))
    with pytest.raises(AdapterConfigError, match="layers_to_transform"):
        LoraConfig(layers_to_transform=[-1])


@pytest.mark.parametrize("tokens,num_experts,top_k", [(1, 4, 2), (5, 4, 1), (7, 3, 3), (33, 8, 2)])
def test_grouped_experts_equal_the_dense_path(tokens, num_experts, top_k):
    torch.manual_seed(0)
    experts = LoraExperts(num_experts, 12, 10, rank=3, alpha=6, init="random")
    probs = torch.softmax(torch.randn(tokens, num_experts), -1).requires_grad_(True)
    slot_weights, selected = probs.topk(top_k, dim=-1)
    dense_weights = torch.zeros_like(probs).scatter(-1, selected, slot_weights)
    x = torch.randn(tokens, 12, requires_grad=True)
    params = [x, probs, experts.lora_A, experts.lora_B]
    grouped = experts.routed(x, selected, slot_weights)
    grads_grouped = torch.autograd.grad(grouped.square().sum(), params, retain_graph=True)
    dense = experts(x, dense_weights)
    grads_dense = torch.autograd.grad(dense.square().sum(), params)
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_grouped, grads_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    unused = set(range(num_experts)) - set(selected.flatten().tolist())
    assert all(torch.count_nonzero(grads_grouped[3][e]) == 0 for e in unused)


@pytest.mark.parametrize("max_rows", [1, 2, 4, 6, 100])
def test_expert_chunks_tile_the_sorted_rows(max_rows):
    counts = (3, 0, 5, 2, 0, 4)
    chunks = expert_chunks(counts, max_rows)
    assert [c.start for c in chunks] == [0, *(c.end for c in chunks[:-1])] and chunks[-1].end == sum(counts)
    assert all(0 < c.end - c.start <= max_rows and sum(c.counts) == c.end - c.start for c in chunks)
    per_expert = [0] * len(counts)
    for chunk in chunks:
        for offset, rows in enumerate(chunk.counts):
            per_expert[chunk.first + offset] += rows
    assert per_expert == list(counts)


def test_stacked_up_keeps_b_itself_for_backward_and_follows_autocast():
    # the rank-E·r product of the dense path: gradients by finite differences (fp64), and autograd keeps the
    # input and B, not the [E·r, d_out] copy of B that a plain matmul would keep in every adapted linear
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4 * 3, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(4, 10, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stacked_up, (h, lora_B))
    torch.testing.assert_close(stacked_up(h, lora_B), torch.einsum("tsei,eoi->tso", h.unflatten(-1, (4, 3)), lora_B))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        stacked_up(h, lora_B)
    assert {t.untyped_storage().data_ptr() for t in kept} == {h.untyped_storage().data_ptr(),
                                                               lora_B.untyped_storage().data_ptr()}
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert stacked_up(h.float(), lora_B.float()).dtype == torch.bfloat16


def test_grouped_matmul_follows_autocast():
    torch.manual_seed(0)
    experts = LoraExperts(4, 16, 8, rank=4, alpha=8, init="random")
    x = torch.randn(6, 16)
    selected = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [3, 2]])
    weights = torch.full((6, 2), 0.5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = experts.routed(x, selected, weights)
    assert out.dtype == torch.bfloat16
    reference = experts(x, torch.zeros(6, 4).scatter(-1, selected, weights))
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sharing", ["per_module", "per_input"])
def test_dropout_masks_are_shared_per_input_only_when_asked(sharing):
    model, _ = tiny_model()
    inject(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.5,
                             lora_dropout_sharing=sharing))
    attention = model.model.layers[0].self_attn
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attention, name).lora.dropout.register_forward_hook(
            lambda module, args, out, name=name: seen.setdefault(name, out))
    model.train()
    model(input_ids=torch.randint(0, 200, (2, 9)))
    same = [torch.equal(seen["q_proj"], seen[name]) for name in ("k_proj", "v_proj")]
    assert all(same) if sharing == "per_input" else not any(same)


def test_shared_dropout_redraws_after_an_in_place_change_and_is_off_in_eval():
    dropout = SharedDropout(0.5)
    x = torch.ones(64, 64)
    first = dropout(x)
    assert dropout(x) is first
    x.mul_(1.0)  # same object, new version
    assert dropout(x) is not first
    assert dropout.eval()(x) is x
    with pytest.raises(AdapterConfigError, match="lora_dropout_sharing"):
        LoraConfig(lora_dropout_sharing="per_layer")
