"""MixLoRA (methods.md §3): fast path vs the per-expert loop, parity with the official `mixlora` package on
identical weights (layer and whole model, fp32 and fp64), checkpoint conversion both ways and what it refuses,
fp32 routing and mixing under bf16, experts only (no attention LoRA), the balance loss on hand-computed
cases, the LLaMA-2-7B parameter count, config validation."""

import copy
import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, compose_config, tiny_model, token_batch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from transformers.activations import ACT2FN

from moelab.adapters import (
    AdapterConfigError,
    MergeError,
    adapter_parameters,
    adapter_state_dict,
    count_parameters,
    inject,
    merge,
    mixlora,
)
from moelab.adapters.base import AdapterModule, BatchContext
from moelab.adapters.experts import expert_chunks, slot_order
from moelab.adapters.lora import LoraConfig, LoraLinear
from moelab.adapters.mixlora import (
    MixLoraConfig,
    MixLoraFFN,
    _GroupedSlots,
    _SlotPlan,
    activation_backward,
    draw_keep_mask,
    from_official,
    from_official_config,
    to_official,
    to_official_config,
    to_official_state,
)
from moelab.adapters.mor import PerLinearConfig
from moelab.adapters.routed import balance_losses
from moelab.adapters.routing import Routing
from moelab.modules.training import run


def randomize(model, scale: float = 0.05, seed: int = 1) -> None:
    """Random values in every adapter tensor: expert updates of the size of the frozen FFN's own terms
    (larger ones would compare sums of cancelling terms) and a router that really routes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in adapter_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def mixlora_model(seed: int = 0, **overrides):
    model, _ = tiny_model()
    torch.manual_seed(seed)
    adapter = inject(model, MixLoraConfig(**overrides))
    return model, adapter


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ------------------------------------------------------------------------------------- fast path == loop


@pytest.mark.parametrize("expert_compute", ["dense", "grouped"])
@pytest.mark.parametrize("tokens,num_experts,top_k", [
    (1, 4, 2),    # a single token
    (3, 4, 1),    # at most 3 of 4 experts used: one receives no token
    (9, 3, 3),    # k = E: dense mixing
    (16, 8, 2),   # the default shape
])
def test_fast_path_equals_per_expert_loop(tokens, num_experts, top_k, expert_compute):
    model, _ = mixlora_model(num_experts=num_experts, top_k=top_k, expert_compute=expert_compute)
    randomize(model)
    layer = model.model.layers[1].mlp
    assert isinstance(layer, MixLoraFFN)
    layer.eval()
    x = torch.randn(1, tokens, 64, requires_grad=True)
    params = [x, layer.router.weight, *layer.experts.parameters()]
    fast = layer(x)
    grads_fast = torch.autograd.grad(fast.square().sum(), params)
    reference = layer.reference_forward(x)
    grads_reference = torch.autograd.grad(reference.square().sum(), params)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_fast, grads_reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    unused = set(range(num_experts)) - set(layer.routing.selected.flatten().tolist())
    for expert in unused:  # an expert without tokens gets no gradient in any of its LoRA tensors
        assert all(torch.count_nonzero(grad[expert]) == 0 for grad in grads_fast[2:])
    if tokens == 3:
        assert unused, "the case must contain an expert that receives no token"


@pytest.mark.parametrize("chunk_min_elements", [mixlora.CHUNK_MIN_ELEMENTS, 1])  # 1: chunks of T/8 slots
def test_grouped_experts_equal_the_dense_reference_in_training(monkeypatch, chunk_min_elements):
    # the whole model in training mode (dropout off, so both paths see the same inputs): the loss, and the
    # gradient of every trainable tensor, router included, agree between grouped and dense expert compute,
    # whether the grouped slots run in one chunk or in chunks that split experts
    monkeypatch.setattr(mixlora, "CHUNK_MIN_ELEMENTS", chunk_min_elements)
    batch = token_batch(batch=3, seq=7)
    losses, grads = [], []
    for compute in ("dense", "grouped"):
        model, adapter = mixlora_model(expert_compute=compute, lora_dropout=0.0, num_experts=6, top_k=2)
        randomize(model)
        model.train()
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        params = adapter.trainable_parameters(model)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, params))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    assert len(grads[0]) > 8 and any(torch.count_nonzero(g) for g in grads[1])
    for dense, grouped in zip(*grads, strict=True):
        torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-7)


def grouped_slots_case(dropout: float, max_rows: int = 3, act_backward=torch.ops.aten.silu_backward):
    """Small fp64 inputs of the grouped slots' function (5 tokens, 3 experts, top-2, inter 8, rank 2) and its
    plan, with chunks of at most ``max_rows`` slots so that several chunks run; SiLU's backward by its kernel, or
    by autograd with ``act_backward=None``."""
    generator = torch.Generator().manual_seed(0)
    tokens, experts, inter, rank = 5, 3, 8, 2
    selected = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(tokens)])
    order = slot_order(selected, experts)
    plan = _SlotPlan(order, expert_chunks(order.counts, max_rows), F.silu, act_backward, dropout, torch.float64,
                     torch.float64)
    shapes = [(tokens, inter), (tokens, inter), (2 * tokens, rank), (2 * tokens, rank), (2 * tokens,),
              (experts, inter, rank), (experts, inter, rank), (experts, rank, inter)]
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes]
    assert len(plan.chunks) > 1
    return inputs, plan


@pytest.mark.parametrize("act_backward", [torch.ops.aten.silu_backward, None], ids=["kernel", "autograd"])
def test_grouped_slots_backward_matches_finite_differences_with_dropout(act_backward):
    # the grouped path's hand-written backward, with W2's expert dropout on (the comparisons with the dense
    # path run without it): fp64 finite differences, the mask drawn alike in every call by a fixed seed; the
    # activation's backward by its kernel and by autograd (an activation without a known kernel)
    inputs, plan = grouped_slots_case(dropout=0.4, act_backward=act_backward)

    def slots(*tensors):
        torch.manual_seed(0)
        return _GroupedSlots.apply(*tensors, plan)

    assert torch.autograd.gradcheck(slots, inputs, eps=1e-6, atol=1e-7)
    assert not torch.allclose(slots(*inputs)[1], _GroupedSlots.apply(*inputs, replace(plan, dropout=0.0))[1])


@pytest.mark.parametrize("module", [nn.SiLU(), ACT2FN["silu"], nn.GELU(), nn.GELU(approximate="tanh")], ids=repr)
def test_activation_backward_kernels_equal_autograd(module):
    x, grad = torch.randn(2, 64, 32, dtype=torch.float64).unbind()
    x.requires_grad_()
    (expected,) = torch.autograd.grad(module(x), x, grad)
    torch.testing.assert_close(activation_backward(module)(grad, x.detach()), expected, rtol=1e-12, atol=0)


def test_activation_without_known_kernel_falls_back_to_autograd():
    assert activation_backward(nn.Tanh()) is None
    assert activation_backward(F.silu) is None


@pytest.mark.parametrize("dropout", [0.05, 0.5])
def test_slot_dropout_mask_drops_with_the_plan_s_probability(dropout):
    # 16-bit draws: p is rounded to a multiple of 2⁻¹⁶ and 1 / (1 − p) is that probability's; the mask follows the
    # global seed
    _, plan = grouped_slots_case(dropout=dropout)
    assert abs(plan.dropped_of_65536 / 2**16 - dropout) <= 2**-17
    assert plan.keep_scale == pytest.approx(1 / (1 - plan.dropped_of_65536 / 2**16), rel=1e-12)
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        masks.append(draw_keep_mask(plan.dropped_of_65536, out=torch.empty(1000, 999, dtype=torch.uint8)))
    assert torch.equal(*masks) and set(masks[0].unique().tolist()) == {0, 1}
    dropped = 1.0 - masks[0].double().mean().item()
    assert abs(dropped - dropout) < 5 * math.sqrt(dropout * (1 - dropout) / masks[0].numel())
    assert draw_keep_mask(0, out=torch.empty(4096, dtype=torch.uint8)).all()


def test_grouped_slots_dropout_keeps_the_expectation():
    # inverted dropout on W2's expert input: averaged over masks, z is its value without dropout
    inputs, plan = grouped_slots_case(dropout=0.5)
    with torch.no_grad():
        expected = _GroupedSlots.apply(*inputs, replace(plan, dropout=0.0))[1]
        torch.manual_seed(0)
        mean = torch.stack([_GroupedSlots.apply(*inputs, plan)[1] for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, expected, rtol=0, atol=0.05 * expected.abs().max().item())


def test_grouped_path_keeps_no_per_slot_activation_for_backward():
    # what autograd keeps of one FFN until its backward: on the grouped path W1 x and W3 x ([T, inter]) and a
    # one-byte dropout mask per slot, no [T, k, inter] copy of the FFN's activations (the dense path keeps five)
    kept = {}
    for compute in ("grouped", "dense"):
        model, _ = mixlora_model(expert_compute=compute)
        randomize(model)
        layer = model.model.layers[0].mlp.train()
        frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved = {}

        def pack(tensor, saved=saved, frozen=frozen):
            if tensor.untyped_storage().data_ptr() not in frozen:
                saved[tensor.untyped_storage().data_ptr()] = tensor
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(torch.randn(1, 40, 64, requires_grad=True))
        kept[compute] = list(saved.values())
    activation = 40 * layer.base_layer.up_proj.out_features  # one [T, inter] activation of the frozen FFN
    floats = [t.numel() for t in kept["grouped"] if t.is_floating_point()]
    assert max(floats) == activation and floats.count(activation) == 2
    assert [t.shape for t in kept["grouped"] if not t.is_floating_point() and t.numel() > 80] == [(80, 128)]
    assert sum(tuple(t.shape) == (40, 2, 128) for t in kept["dense"]) == 5


def test_expert_compute_is_validated():
    with pytest.raises(AdapterConfigError, match="expert_compute"):
        MixLoraConfig(expert_compute="sparse")


def test_routing_is_recorded_and_weights_renormalised():
    model, _ = mixlora_model()
    randomize(model)
    logits(model, token_batch(batch=2, seq=5))
    routing = model.model.layers[0].mlp.routing
    assert routing.probs.shape == (10, 8) and routing.selected.shape == (10, 2)
    weights, _ = model.model.layers[0].mlp.router(torch.randn(4, 64))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    assert (weights > 0).sum(-1).eq(2).all()


def test_jitter_only_in_training():
    model, _ = mixlora_model(jitter_noise=0.5)
    randomize(model)
    layer = model.model.layers[0].mlp
    x = torch.randn(1, 6, 64)
    reference = layer.eval()(x)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=0)
    assert not torch.allclose(layer.train()(x), reference), "training mode multiplies the input by U(1-ε, 1+ε)"


def test_routing_is_fp32_under_bf16_autocast():
    model, _ = mixlora_model(num_experts=4)
    randomize(model)
    layer = model.model.layers[0].mlp.eval()
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        layer(x)
        reference = layer.routing
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # what bf16-mixed trainers run under
            layer(x)
    assert layer.routing.probs.dtype == torch.float32 and layer.routing.logits.dtype == torch.float32
    torch.testing.assert_close(layer.routing.probs, reference.probs, rtol=0, atol=0)


def test_bf16_base_sums_the_expert_mix_in_fp32_before_w2():
    model, _ = tiny_model()
    model.to(torch.bfloat16)
    torch.manual_seed(0)
    inject(model, MixLoraConfig(num_experts=4, top_k=2))
    randomize(model)
    layer = model.model.layers[0].mlp.eval()
    assert layer.router.weight.dtype == torch.float32 and layer.experts["up_proj"].lora_A.dtype == torch.float32
    seen = []
    hook = layer.base_layer.down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        hook.remove()
        weights, routing = layer.router(x)
        slots = F.one_hot(routing.selected, 4)
        act = layer.base_layer.act_fn(layer._slot_projection(0, x, slots)) * layer._slot_projection(1, x, slots)
        slot_weights = weights.gather(-1, routing.selected)  # fp32
    assert act.dtype == torch.bfloat16
    # the official code weights each expert's output and accumulates in fp32; the mix is rounded once
    expected = (slot_weights.unsqueeze(-1) * act.float()).sum(dim=1).to(torch.bfloat16)
    assert torch.equal(seen[0], expected)


# ------------------------------------------------------------------------------------- official parity


def official_config(config: MixLoraConfig, dtype: torch.dtype):
    from mixlora.config import MixLoraConfig as OfficialConfig

    official = OfficialConfig.from_config(to_official_config(config, base_model="tiny"))
    official.dtype_, official.adapter_name_, official.model_type_ = dtype, "default", "llama"
    return official.check()


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-10, 1e-10)])
def test_layer_matches_official_mixlora_sparse_moe(dtype, rtol, atol):
    from mixlora.lora_linear import LoraLinear as OfficialLora
    from mixlora.model import MixLoraSparseMoe

    config = MixLoraConfig(num_experts=4, top_k=2, r=8, lora_alpha=16)  # dropout .05 > 0: the package asserts it
    model, _ = mixlora_model(**config.to_dict())
    randomize(model)
    model.to(dtype)
    ours = model.model.layers[0].mlp.eval()
    weights = to_official_state(adapter_state_dict(model), config)
    official = official_config(config, dtype)
    theirs = MixLoraSparseMoe(copy.deepcopy(ours.base_layer), official)
    theirs.gate_ = weights["mixlora.layers.0.mlp.moe_gate.weight"]
    for expert in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"mixlora.layers.0.mlp.{proj}.experts.{expert}"
            lora = OfficialLora(getattr(theirs.base_layer_, proj), official,
                                (weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]))
            theirs.experts_[f"experts.{expert}.{proj}"] = lora.eval()  # a plain dict: .eval() must reach each
    x = torch.randn(3, 11, 64, dtype=dtype)
    expected = theirs(x.clone())
    assert (expected - ours.base_layer(x)).abs().max() > 0.1 * expected.abs().max(), "a non-trivial adapter"
    torch.testing.assert_close(ours(x), expected, rtol=rtol, atol=atol)
    assert ours.routing.selected.unique().numel() > 1, "the router must really route"


@pytest.mark.parametrize("target_modules", [["q_proj", "k_proj", "v_proj", "o_proj"], []])  # []: experts only
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_whole_model_matches_official_loader(tmp_path, dtype, tolerance, target_modules):
    from mixlora.model import inject_adapter_in_model, load_adapter_weights

    model, _ = mixlora_model(target_modules=target_modules)
    randomize(model)
    model.to(dtype)
    batch = token_batch(batch=2, seq=12)
    ours = logits(model, batch)
    to_official(model, tmp_path, base_model="tiny_random")
    config, weights = load_adapter_weights(str(tmp_path), device="cpu", dtype=dtype)
    official, _ = tiny_model()
    official.to(dtype)
    inject_adapter_in_model(official, config, weights)
    for layer in official.model.layers:
        for lora in layer.mlp.mixlora_moes["default"].experts_.values():
            lora.eval()  # the package keeps experts in a plain dict, out of model.eval()'s reach
    theirs = logits(official, batch)
    base, _ = tiny_model()
    assert (theirs - logits(base.to(dtype), batch)).abs().max() > 0.1, "the adapter must change the logits"
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


def test_official_checkpoint_round_trip(tmp_path):
    model, _ = mixlora_model(num_experts=4, top_k=1, lora_alpha=24, router_aux_loss_coef=0.01)
    randomize(model)
    folder = to_official(model, tmp_path / "official", base_model="tiny_random")
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 24 and written["act_fn"] == "silu" and written["num_experts"] == 4
    assert written["target_modules"][-3:] == ["gate_proj", "up_proj", "down_proj"]
    weights = torch.load(folder / "adapter_model.bin", weights_only=True)
    assert weights["mixlora.layers.1.mlp.moe_gate.weight"].shape == (4, 64)
    assert weights["mixlora.layers.0.mlp.down_proj.experts.3.lora_A.weight"].shape == (16, 128)
    assert weights["mixlora.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 16)
    assert len(weights) == 2 * (4 * 2 + 1 + 3 * 4 * 2)
    reloaded, _ = tiny_model()
    adapter = from_official(reloaded, folder)
    assert adapter.config == model.moelab_adapter.config
    original = adapter_state_dict(model)
    for key, value in adapter_state_dict(reloaded).items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    torch.testing.assert_close(logits(reloaded, token_batch()), logits(model, token_batch()), rtol=0, atol=0)


def test_import_rejects_missing_and_extra_tensors(tmp_path):
    model, _ = mixlora_model(num_experts=2)
    folder = to_official(model, tmp_path, base_model="tiny_random")
    weights = torch.load(folder / "adapter_model.bin", weights_only=True)
    torch.save({k: v for k, v in weights.items() if "experts.1" not in k}, folder / "adapter_model.bin")
    with pytest.raises(AdapterConfigError, match="missing"):
        from_official(tiny_model()[0], folder)
    torch.save({**weights, "mixlora.layers.9.mlp.moe_gate.weight": torch.zeros(2, 64)}, folder / "adapter_model.bin")
    with pytest.raises(AdapterConfigError, match="unexpected"):
        from_official(tiny_model()[0], folder)


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"expert_lora": {"r": 8, "use_dora": True}}])
def test_import_refuses_mixdora(extra):
    values = {**to_official_config(MixLoraConfig(), base_model="x"), **extra}
    with pytest.raises(AdapterConfigError, match=r"use_dora: true \(MixDoRA\) does not convert"):
        from_official_config(values)


def test_import_router_loss_false_switches_the_balance_loss_off():
    values = to_official_config(MixLoraConfig(router_aux_loss_coef=0.01), base_model="x")
    assert from_official_config(values).router_aux_loss_coef == 0.01
    assert from_official_config({**values, "router_loss": False}).router_aux_loss_coef == 0.0


def test_export_refuses_layers_to_transform(tmp_path):
    model, _ = mixlora_model(layers_to_transform=[1])
    with pytest.raises(AdapterConfigError, match=r"layers_to_transform \(\[1\]\): the official MixLoRA format "
                                                 "has no per-layer selection"):
        to_official(model, tmp_path / "official", base_model="tiny_random")
    assert not (tmp_path / "official").exists(), "nothing is written"


@pytest.mark.parametrize("values,message", [
    ({"lora_dropout": 0.0}, r"lora_dropout \(0.0\) must be > 0 to export"),
    ({"lora_alpha": 24.5}, r"lora_alpha \(24.5\) must be an integer to export"),
    ({"expert_alpha": 8.5}, r"expert_alpha \(8.5\) must be an integer to export"),
])
def test_export_refuses_what_the_official_package_asserts_on(values, message):
    with pytest.raises(AdapterConfigError, match=message):
        to_official_config(MixLoraConfig(**values), base_model="x")


def test_the_official_package_asserts_on_zero_dropout_and_fractional_alpha():
    # why the export refuses them: the package's own checks (config.py LoraConfig.check, LoraLinear.__init__)
    from mixlora.config import MixLoraConfig as OfficialConfig
    from mixlora.lora_linear import LoraLinear as OfficialLora

    values = to_official_config(MixLoraConfig(), base_model="x")
    with pytest.raises(AssertionError):
        OfficialConfig.from_config({**values, "lora_alpha": 24.5}).check()
    config = OfficialConfig.from_config({**values, "lora_dropout": 0.0})
    config.dtype_ = torch.float32
    with pytest.raises(AssertionError):
        OfficialLora(nn.Linear(4, 4), config.check())


def test_export_reads_hidden_activation_before_hidden_act(tmp_path):
    model, _ = mixlora_model()
    model.config.hidden_activation = "gelu_pytorch_tanh"  # Gemma-2's field; hidden_act stays LLaMA's "silu"
    folder = to_official(model, tmp_path / "gemma", base_model="x")
    assert json.loads((folder / "adapter_config.json").read_text())["act_fn"] == "gelu_pytorch_tanh"
    folder = to_official(model, tmp_path / "override", base_model="x", act_fn="gelu")
    assert json.loads((folder / "adapter_config.json").read_text())["act_fn"] == "gelu"


def test_experts_only_has_no_attention_lora_and_round_trips(tmp_path):
    model, adapter = mixlora_model(target_modules=[], num_experts=4)
    randomize(model)
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj) is nn.Linear and isinstance(layer.mlp, MixLoraFFN)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert count_parameters(model)["trainable"] == 2 * (4 * 3 * 16 * (64 + 128) + 4 * 64)
    folder = to_official(model, tmp_path, base_model="tiny_random")
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == [
        "gate_proj", "up_proj", "down_proj"]
    reloaded, _ = tiny_model()
    assert from_official(reloaded, folder).config == adapter.config
    torch.testing.assert_close(logits(reloaded, token_batch()), logits(model, token_batch()), rtol=0, atol=0)


def test_other_methods_keep_the_non_empty_target_rule():
    for config_class in (LoraConfig, PerLinearConfig):
        with pytest.raises(AdapterConfigError, match="target_modules must not be empty"):
            config_class(target_modules=[])


def test_expert_override_changes_expert_rank_and_warns_on_export():
    model, adapter = mixlora_model(expert_r=4, expert_alpha=8)
    layer = model.model.layers[0]
    assert layer.mlp.experts["up_proj"].lora_A.shape == (8, 4, 64)
    assert layer.self_attn.q_proj.lora.lora_A.shape == (1, 16, 64)
    assert layer.mlp.experts["up_proj"].scaling[0].item() == 2.0
    with pytest.warns(UserWarning, match="ignores expert_lora"):
        values = to_official_config(adapter.config, base_model="x")
    assert values["expert_lora"] == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}


def convert_script():
    spec = importlib.util.spec_from_file_location("convert_mixlora", ROOT / "scripts" / "convert_mixlora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def saved_run(folder, model, adapter, model_entry: dict):
    """A run folder as training writes it: the adapter tensors and adapter_config.json with the model entry."""
    run = folder / "adapter"
    run.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, str(run / "adapter_model.safetensors"))
    meta = {"method": "mixlora", "config": adapter.config.to_dict(), "model": model_entry}
    (run / "adapter_config.json").write_text(json.dumps(meta))
    return folder


def test_convert_script_round_trip(tmp_path):
    script = convert_script()
    model, adapter = mixlora_model(num_experts=2)
    randomize(model)
    entry = OmegaConf.to_container(compose_config("model=tiny_random").model, resolve=True)
    saved_run(tmp_path / "run", model, adapter, entry)
    assert script.main(["to-official", str(tmp_path / "run"), str(tmp_path / "official")]) == 0
    assert json.loads((tmp_path / "official" / "adapter_config.json").read_text())["act_fn"] == "silu"
    assert script.main(["from-official", str(tmp_path / "official"), str(tmp_path / "back"),
                        "--model", "tiny_random"]) == 0
    from moelab.modules.runs import load_trained

    base, _ = load_trained(tmp_path / "back")
    torch.testing.assert_close(logits(base.model, token_batch()), logits(model, token_batch()), rtol=0, atol=0)


def test_convert_script_takes_the_activation_from_the_runs_model_config(tmp_path):
    from transformers import LlamaConfig

    script = convert_script()
    model, adapter = mixlora_model(num_experts=2)
    pretrained = tmp_path / "base"
    LlamaConfig(hidden_act="gelu").save_pretrained(pretrained)  # the run's base model folder, its config only
    entry = {"_target_": "moelab.modules.models.load_pretrained", "name": "gelu_llama", "pretrained": str(pretrained)}
    run = saved_run(tmp_path / "run", model, adapter, entry)

    def act_fn(*args):
        out = tmp_path / f"official{len(list(tmp_path.iterdir()))}"
        assert script.main(["to-official", str(run), str(out), *args]) == 0
        return json.loads((out / "adapter_config.json").read_text())["act_fn"]

    assert act_fn() == "gelu"
    assert act_fn("--act-fn", "relu") == "relu"  # an override only
    missing = saved_run(tmp_path / "missing", model, adapter, {**entry, "pretrained": str(tmp_path / "gone")})
    with pytest.raises(SystemExit, match="name it with --act-fn"):
        script.main(["to-official", str(missing), str(tmp_path / "never")])
    partial = saved_run(tmp_path / "partial", *mixlora_model(layers_to_transform=[0]), entry)
    with pytest.raises(SystemExit, match="does not export to the official format: layers_to_transform"):
        script.main(["to-official", str(partial), str(tmp_path / "never")])


# ------------------------------------------------------------------------------------- the balance loss


def site(probs, selected, mask=None) -> AdapterModule:
    module = AdapterModule()
    probs = torch.tensor(probs)
    module.routing = Routing(probs, torch.tensor(selected).reshape(len(probs), -1), probs.log())
    module.context = BatchContext(token_mask=None if mask is None else torch.tensor(mask))
    return module


def two_layers(mask):
    # E = 2, k = 1; layer 1 selects 0, 0, 1 (+ padding → 1), layer 2 selects 0, 0, 0 (+ padding → 1): the real
    # tokens' F is unequal, so a P masked wrongly (or not at all) changes the value
    return [site([[.75, .25], [.75, .25], [.25, .75], [.1, .9]], [0, 0, 1, 1], mask),
            site([[.6, .4], [.7, .3], [.55, .45], [.2, .8]], [0, 0, 0, 1], mask)]


def test_balance_loss_pooled_per_layer_and_padding_by_hand():
    config = MixLoraConfig(num_experts=2, top_k=1, router_aux_loss_coef=0.5)
    mask = [[True, True, True, False]]
    # pooled over the 6 real tokens: F = (5/6, 1/6), P = (3.6/6, 2.4/6) → 2·(5·3.6 + 2.4)/36 = 40.8/36
    # (P over all 8 tokens instead would give 2·(5·3.9 + 4.1)/48 = 47.2/48)
    pooled = balance_losses(two_layers(mask), config)["load_balance"]
    torch.testing.assert_close(pooled, torch.tensor(0.5 * 40.8 / 36))
    # per layer: 2·(2/3·1.75/3 + 1/3·1.25/3) = 9.5/9 and 2·(1·1.85/3) = 11.1/9 → mean 20.6/18
    config.aux_loss_reduction = "per_layer"
    torch.testing.assert_close(balance_losses(two_layers(mask), config)["load_balance"], torch.tensor(0.5 * 20.6 / 18))
    # with the padding counted: F = (5/8, 3/8), P = (3.9/8, 4.1/8) → 2·(5·3.9 + 3·4.1)/64 = 63.6/64
    config.aux_loss_reduction = "pooled"
    torch.testing.assert_close(balance_losses(two_layers(None), config)["load_balance"],
                               torch.tensor(0.5 * 63.6 / 64))


def test_balance_loss_of_a_collapsed_router_by_hand():
    config = MixLoraConfig(num_experts=4, top_k=2)  # coef 1e-3
    sites = [site([[.7, .2, .05, .05]] * 3, [[0, 1]] * 3) for _ in range(2)]
    # every token's slots go to experts 0 and 1: E · (P0 + P1) = 4 · 0.9
    torch.testing.assert_close(balance_losses(sites, config)["load_balance"], torch.tensor(1e-3 * 3.6))


@pytest.mark.parametrize("reduction", ["pooled", "per_layer"])
def test_uniform_router_gives_k_times_coef_and_z_loss_by_hand(reduction):
    model, adapter = mixlora_model(router_z_loss_coef=0.5, aux_loss_reduction=reduction)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.zero_()
    batch = token_batch(batch=2, seq=8)
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = adapter.aux_losses(model)
    torch.testing.assert_close(losses["load_balance"], torch.tensor(1e-3 * 2))  # k = 2
    torch.testing.assert_close(losses["router_z"], torch.tensor(0.5 * math.log(8) ** 2))


def test_aux_loss_trains_the_router():
    model, adapter = mixlora_model()
    batch = token_batch(batch=2, seq=8)
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    adapter.aux_losses(model)["load_balance"].backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- size and config


def test_trainable_parameters_for_llama2_7b_shapes():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inject(model, MixLoraConfig())
    counts = count_parameters(model)
    attention = 4 * 16 * (4096 + 4096)
    experts = 8 * 3 * 16 * (4096 + 11008)
    router = 8 * 4096
    assert counts["trainable"] == 32 * (attention + experts + router) == 203_423_744
    assert counts["base"] == 6_738_415_616  # LLaMA-2-7B
    assert 0.029 < counts["trainable"] / counts["base"] < 0.031


def test_refuses_to_merge_and_says_why():
    model, _ = mixlora_model()
    with pytest.raises(MergeError, match="input-dependent top-k routing"):
        merge(model)


@pytest.mark.parametrize("values,message", [
    ({"num_experts": 2, "top_k": 3}, r"top_k \(3\) must be <= num_experts \(2\)"),
    ({"num_experts": 0}, r"num_experts \(0\)"),
    ({"aux_loss_reduction": "sum"}, "aux_loss_reduction"),
    ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
    ({"jitter_noise": 1.5}, "jitter_noise"),
    ({"expert_r": 0}, r"expert_r \(0\)"),
    ({"expert_dropout": 1.0}, "expert_dropout"),
    ({"target_modules": ["q_proj", "up_proj"]}, r"must not name the FFN projections \['up_proj'\]"),
    ({"target_modules": "all-linear"}, "target_modules"),
    ({"up_proj": "gate_proj"}, "must be distinct"),
])
def test_bad_values_name_the_field(values, message):
    with pytest.raises(AdapterConfigError, match=message):
        MixLoraConfig(**values)


def test_unknown_ffn_module_names_the_field():
    model, _ = tiny_model()
    with pytest.raises(AdapterConfigError, match=r"ffn_module \('ffn'\) matches no module"):
        inject(model, MixLoraConfig(ffn_module="ffn"))


def test_training_run_records_routing(tmp_path):
    # lm-eval is covered by test_training; here the run must train, validate and fill results.json's routing
    run(compose_config("model=tiny_random", "data=tiny", "adapter=mixlora", "trainer.max_steps=3", "logger=csv",
                       "callbacks=none", "eval.enabled=false", "data.max_test_examples=4",
                       f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["label"] == "mixlora [official-code-parity]" and results["mergeable"] is False
    assert "routing/model.layers.1.mlp/entropy" in results["routing"]["train"]
    assert 0 < results["routing"]["dev"]["routing/entropy"] <= 1
    assert results["parameters"]["trainable"] == 2 * (4 * 16 * 128 + 8 * 3 * 16 * (64 + 128) + 8 * 64)
