"""LoRA-Mixer against methods.md §5: hard routing ≡ a plain LoRA per task, soft routing with K = E ≡ the dense
mix, sparse top-K at inference, the RSL and preservation losses on hand-computed cases (both entropy signs,
both load definitions), router scopes, and the make_router hook that MoR plugs into."""

import math

import pytest
import torch
from conftest import randomize_adapter, tiny_model, token_batch
from torch import nn

from moelab.adapters import AdapterConfigError, adapter_layers, inject, routed_modules
from moelab.adapters.composition import HARD, SOFT, composed_layers
from moelab.adapters.lora import LoraConfig
from moelab.adapters.lora_mixer import LoraMixer, LoraMixerConfig, rsl_loss

TASKS = ["a", "b", "c"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def mixer(stage=SOFT, **fields):
    """The tiny model with LoRA-Mixer (3 experts, no dropout), every adapter tensor random."""
    model, _ = tiny_model()
    adapter = inject(model, LoraMixerConfig(experts={"tasks": TASKS, "lora_dropout": 0.0}, **fields))
    adapter.enter_stage(model, stage)
    randomize_adapter(model)
    return model, adapter


def run(model, adapter, batch, train: bool):
    model.train(train)
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------------------------- routing


def test_hard_routing_equals_a_plain_lora_per_task():
    model, adapter = mixer(stage=HARD)
    batch = token_batch(batch=6, seq=10)  # task ids 0, 1, 2, 0, 1, 2
    ours = run(model, adapter, batch, train=True)
    layers = dict(composed_layers(model))
    for task in range(3):
        lora, _ = tiny_model()
        inject(lora, LoraConfig(target_modules=ATTENTION, r=16, lora_alpha=32))
        with torch.no_grad():
            for name, layer in adapter_layers(lora):
                layer.lora.lora_A.copy_(layers[name].experts.lora_A[task:task + 1])
                layer.lora.lora_B.copy_(layers[name].experts.lora_B[task:task + 1])
        lora.train()
        with torch.no_grad():
            theirs = lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = batch["task_ids"] == task
        torch.testing.assert_close(ours[rows], theirs[rows], rtol=1e-5, atol=1e-5)
        assert (ours[~rows] - theirs[~rows]).abs().max() > 1e-3, "other tasks use other experts"


def test_soft_routing_with_k_equal_e_is_the_dense_mix():
    model, adapter = mixer(top_k=3)
    batch = token_batch()
    dense = run(model, adapter, batch, train=True)  # soft stage in training: w = p
    sparse = run(model, adapter, batch, train=False)  # inference: renormalised top-3 of 3 experts
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    layer = dict(composed_layers(model))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 4, 64)
    probs, _ = layer.site.router.probabilities(x.reshape(-1, 64))
    expected = layer.base_layer(x) + layer.experts.reference(x, probs.reshape(2, 4, 3))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_inference_fuses_the_top_k_experts(renormalize):
    model, adapter = mixer(top_k=2, top_k_renormalize=renormalize)
    layer = dict(composed_layers(model))["model.layers.0.self_attn.q_proj"]
    layer.eval()
    x = torch.randn(2, 4, 64)
    out = layer(x)
    probs = layer.routing.probs
    top, selected = probs.topk(2, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, selected, top / top.sum(-1, keepdim=True) if renormalize else top)
    assert torch.equal(layer.routing.selected.sort(-1).values, selected.sort(-1).values)
    expected = layer.base_layer(x) + layer.experts.reference(x, weights.reshape(2, 4, 3))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope,routers", [("per_projection", 8), ("per_layer", 2)])
def test_router_scopes(scope, routers):
    model, adapter = mixer(router_scope=scope)
    run(model, adapter, token_batch(), train=False)
    assert len(routed_modules(model)) == routers
    leaders = [layer for _, layer in composed_layers(model) if layer.is_leader]
    assert len(leaders) == routers and all(layer.site.router.weight.shape == (3, 64) for layer in leaders)


def test_routers_come_from_make_router():
    """The hook MoR uses: whatever make_router returns routes, through its probabilities(x)."""

    class FixedRouter(nn.Module):
        def __init__(self, num_experts):
            super().__init__()
            self.bias = nn.Parameter(torch.arange(num_experts, dtype=torch.float32))

        def probabilities(self, x):
            logits = self.bias.expand(x.shape[0], -1)
            return logits.softmax(-1), logits

    model, _ = tiny_model()
    adapter = LoraMixer(LoraMixerConfig(experts={"tasks": TASKS}, top_k=1))
    calls = []
    adapter.make_router = lambda d_in, num_experts, top_k, init_std: calls.append((d_in, top_k)) or FixedRouter(3)
    adapter.inject(model)
    assert calls == [(64, 1)] * 8
    model.eval()
    model(input_ids=token_batch()["input_ids"])
    for _, site in routed_modules(model):
        torch.testing.assert_close(site.routing.probs[0], torch.arange(3.0).softmax(-1))
        assert (site.routing.selected == 2).all()


# ---------------------------------------------------------------------------------------------- losses


PROBS = [[0.7, 0.2, 0.1], [0.15, 0.6, 0.25], [0.05, 0.35, 0.6], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]
MASK = [True, True, True, True, False]


def hand_rsl(probs, mask, alpha, lam, sign, load, top_k):
    """L_RSL by hand, in plain Python: α Σ_i p̄_i f̄_i + sign·λ·mean H(p), over the unmasked tokens."""
    rows = [p for p, keep in zip(probs, mask, strict=True) if keep]
    n, experts = len(rows), len(rows[0])
    p_bar = [sum(p[i] for p in rows) / n for i in range(experts)]
    f_bar = [0.0] * experts
    for p in rows:
        if load == "argmax":
            f_bar[p.index(max(p))] += 1 / n
        else:
            top = sorted(range(experts), key=lambda i: -p[i])[:top_k]
            for i in top:
                f_bar[i] += p[i] / sum(p[j] for j in top) / n
    entropy = sum(-sum(q * math.log(q) for q in p) for p in rows) / n
    return alpha * sum(a * b for a, b in zip(p_bar, f_bar, strict=True)) + sign * lam * entropy


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("load", ["argmax", "topk_score"])
def test_rsl_loss_on_a_hand_computed_case(sign, load):
    config = LoraMixerConfig(experts={"tasks": TASKS}, top_k=2, rsl_alpha=0.3, rsl_lambda=0.2,
                             rsl_entropy_sign=sign, rsl_load=load)
    loss = rsl_loss(torch.tensor(PROBS, dtype=torch.float64), torch.tensor(MASK), config)
    assert loss.item() == pytest.approx(hand_rsl(PROBS, MASK, 0.3, 0.2, sign, load, 2), rel=1e-12)


def test_the_entropy_sign_sets_the_direction_of_the_gradient():
    probs = torch.tensor(PROBS[:2], requires_grad=True)
    for sign in (1, -1):
        config = LoraMixerConfig(experts={"tasks": TASKS}, rsl_alpha=0.0, rsl_entropy_sign=sign)
        (grad,) = torch.autograd.grad(rsl_loss(probs, None, config), probs)
        # dH/dp_i = −(log p_i + 1): descending +H raises the most probable expert most (sharper routing),
        # descending −H (Eq. 5 as printed) raises the least probable most (flatter routing)
        top, bottom = grad.gather(1, probs.argmax(1, keepdim=True)), grad.gather(1, probs.argmin(1, keepdim=True))
        assert (top < bottom).all() if sign == 1 else (top > bottom).all()


def test_aux_losses_average_rsl_over_routing_sites_in_the_soft_stage():
    model, adapter = mixer()
    batch = token_batch()
    model.train()
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool().reshape(-1)
    expected = torch.stack([rsl_loss(site.routing.probs, mask, adapter.config) for _, site in routed_modules(model)])
    assert set(adapter.aux_losses(model)) == {"rsl"}
    assert adapter.aux_losses(model)["rsl"].item() == pytest.approx(expected.mean().item())
    adapter.enter_stage(model, HARD)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert adapter.aux_losses(model) == {}


def test_preservation_loss_on_a_hand_computed_case():
    model, adapter = mixer(stage=HARD, preserve_experts=[0, 2], preserve_beta=0.5, train_experts_in_soft_stage=True)
    adapter.enter_stage(model, SOFT)
    layers = [layer for _, layer in composed_layers(model)]
    assert all(p.requires_grad for layer in layers for p in layer.experts.parameters())
    with torch.no_grad():
        for layer in layers:
            layer.experts.lora_A[0] += 0.1  # expert 0 drifts in A
            layer.experts.lora_B[2] -= 0.2  # expert 2 drifts in B
            layer.experts.lora_B[1] += 1.0  # expert 1 is not preserved
    a_size, b_size = 16 * 64, 64 * 16  # one expert's A [r, d_in] and B [d_out, r] per projection
    expected = 0.5 * 8 * (a_size * 0.1 ** 2 + b_size * 0.2 ** 2)
    preserve = adapter.aux_losses(model)["preserve"]
    assert preserve.item() == pytest.approx(expected, rel=1e-5)
    preserve.backward()
    assert layers[0].experts.lora_A.grad[0].abs().sum() > 0 and layers[0].experts.lora_A.grad[1].abs().sum() == 0


def test_preservation_anchors_survive_a_checkpoint_round_trip():
    """θ_i^(0) is adapter state: a resumed run re-enters the soft stage but keeps the anchors of the first entry."""
    from moelab.modules.lm_module import AdapterLM

    fields = {"preserve_experts": [1], "preserve_beta": 0.5, "train_experts_in_soft_stage": True}
    model, adapter = mixer(stage=HARD, **fields)
    adapter.enter_stage(model, SOFT)
    with torch.no_grad():
        for _, layer in composed_layers(model):
            layer.experts.lora_B[1] += 0.1  # the preserved expert drifts in the soft stage
    expected = adapter.aux_losses(model)["preserve"]
    assert expected.item() == pytest.approx(0.5 * 8 * 64 * 16 * 0.1 ** 2, rel=1e-4)
    checkpoint = {}
    AdapterLM(model, adapter, optimizer=torch.optim.AdamW).on_save_checkpoint(checkpoint)
    assert any(key.endswith("anchors.lora_B") for key in checkpoint["state_dict"])
    resumed, resumed_adapter = mixer(stage=HARD, **fields)
    AdapterLM(resumed, resumed_adapter, optimizer=torch.optim.AdamW).on_load_checkpoint(checkpoint)
    resumed_adapter.enter_stage(resumed, SOFT)  # what the module does at the first step after a resume
    torch.testing.assert_close(resumed_adapter.aux_losses(resumed)["preserve"], expected)


@pytest.mark.parametrize("fields,message", [
    ({"top_k": 4}, r"top_k \(4\)"), ({"router_scope": "per_head"}, "router_scope"),
    ({"rsl_entropy_sign": 0}, "rsl_entropy_sign"), ({"rsl_load": "mean"}, "rsl_load"),
    ({"rsl_lambda": -1}, "rsl_lambda"), ({"preserve_experts": [5]}, "preserve_experts"),
    ({"preserve_experts": [0]}, "needs train_experts_in_soft_stage"),
])
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(AdapterConfigError, match=message):
        LoraMixerConfig(experts={"tasks": TASKS}, **fields)


@pytest.mark.parametrize("stage,train", [(HARD, True), (SOFT, False)])
def test_grouped_experts_equal_the_dense_reference(stage, train):
    # where the weights are top-k (one-hot by task in stage hard, top-K at inference) the grouped path
    # computes only the selected experts; outputs and the gradients of what trains (experts in stage hard,
    # routers in stage soft) equal the dense mix
    batch = token_batch(batch=6, seq=5)
    results = []
    for compute in ("dense", "grouped"):
        torch.manual_seed(0)
        model, adapter = mixer(stage=stage, top_k=2, expert_compute=compute)
        model.train(train)
        adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trained = [p for p in adapter.trainable_parameters(model) if p.requires_grad]
        results.append((logits, torch.autograd.grad(logits.square().mean(), trained, allow_unused=True)))
    (dense, dense_grads), (grouped, grouped_grads) = results
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-5)
    assert any(g is not None and torch.count_nonzero(g) for g in grouped_grads)
    for a, b in zip(grouped_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
