"""Routers and routing statistics: hand-computed metrics, exact reduction over batches and processes, and
no double counting (and intact router gradients) under gradient checkpointing."""

import functools
import math

import pytest
import torch
from conftest import randomize_adapter, tiny_model, token_batch

from moelab.adapters import inject, routed_modules
from moelab.adapters.mixlora import MixLoraConfig
from moelab.adapters.mor import MixtureOfRouters
from moelab.adapters.routing import Routing, RoutingStatistics, TopKRouter, load_balance_loss
from moelab.modules.lm_module import AdapterLM


def record(probs, selected):
    return Routing(torch.tensor(probs, dtype=torch.float64), torch.tensor(selected))


def test_metrics_by_hand():
    # one site, E = 2, top-1; token 3 is padding; tokens 0, 1 belong to task 0, token 2 to task 1
    stats = RoutingStatistics(num_tasks=2)
    routing = record([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], [[0], [0], [1], [1]])
    stats.update([("layers.0.mlp", routing)], token_mask=torch.tensor([1, 1, 1, 0]),
                 token_tasks=torch.tensor([0, 0, 1, 1]))
    site = stats.per_site()
    torch.testing.assert_close(site["load"][0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(site["importance"][0], torch.tensor([1.7 / 3, 1.3 / 3], dtype=torch.float64))
    h = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.9, 0.6, 0.2)]
    assert site["entropy"][0].item() == pytest.approx(sum(h) / 3 / math.log(2))
    assert site["topk_mass"][0].item() == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    assert site["load_cv"][0].item() == pytest.approx((1 / 6) / 0.5)  # std / mean of (2/3, 1/3)
    assert site["dead_experts"][0].item() == 0 and site["max_share"][0].item() == pytest.approx(2 / 3)
    per_task = stats.activation("load")[0]  # [E, tasks]
    torch.testing.assert_close(per_task, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert stats.summary()["routing/dead_experts"] == 0


def test_sums_reduce_exactly_over_batches_and_processes():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(10, 4, generator=generator), -1)
    selected = torch.topk(probs, 2).indices
    tasks = torch.randint(0, 3, (10,), generator=generator)
    whole = RoutingStatistics(3)
    whole.update([("s", Routing(probs, selected))], token_tasks=tasks)
    ranks = [RoutingStatistics(3), RoutingStatistics(3)]
    for rank, part in zip(ranks, (slice(0, 4), slice(4, 10)), strict=True):
        rank.update([("s", Routing(probs[part], selected[part]))], token_tasks=tasks[part])
    # what an all-reduce (sum) over two processes gives each of them: the sums arrive in the same order
    other_rank = iter(ranks[1].sums.values())
    ranks[0].reduce(lambda tensor: tensor + next(other_rank))
    for name in RoutingStatistics.FIELDS:
        torch.testing.assert_close(ranks[0].sums[name], whole.sums[name])
    merged = RoutingStatistics(3)
    merged.merge(ranks[1])
    assert merged.sums["tokens"].sum() == 6


def test_top_k_weights_renormalise_and_top_k_equal_to_e_is_dense_softmax():
    torch.manual_seed(0)
    router = TopKRouter(5, 4, top_k=2, init_std=1.0)
    x = torch.randn(7, 5)
    weights, routing = router(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))
    assert ((weights > 0).sum(-1) == 2).all()
    dense = TopKRouter(5, 4, top_k=4)
    dense.weight.data.copy_(router.weight.data)
    torch.testing.assert_close(dense(x)[0], torch.softmax(x @ router.weight.T, -1))


ROUTERS = {
    "top_k": lambda: TopKRouter(16, 4, top_k=2, init_std=1.0),
    "mor_prob": lambda: MixtureOfRouters(16, num_experts=4, top_k=2, init_std=1.0, num_routers=3, combine="prob"),
    "mor_logit": lambda: MixtureOfRouters(16, num_experts=4, top_k=2, init_std=1.0, num_routers=3, combine="logit"),
}


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_routers_are_fp32_under_bf16_autocast(kind):
    # bf16-mixed trainers run the forward under autocast, which would run the router matmuls in bf16
    torch.manual_seed(0)
    router = ROUTERS[kind]()
    x = torch.randn(9, 16, dtype=torch.bfloat16)
    reference_weights, reference = router(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        weights, routing = router(x)
        probs, _ = router.probabilities(x)
    pairs = [(routing.probs, reference.probs), (routing.logits, reference.logits), (probs, reference.probs),
             (weights, reference_weights)]
    if reference.sub_logits is not None:
        pairs.append((routing.sub_logits, reference.sub_logits))
    for got, expected in pairs:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(routing.selected, reference.selected)


def test_balance_loss_refuses_probabilities():
    with pytest.raises(ValueError, match="double softmax"):
        load_balance_loss([torch.softmax(torch.randn(6, 4), -1)], top_k=2)


def mixlora_step(checkpointing: bool):
    model, _ = tiny_model()
    torch.manual_seed(0)
    adapter = inject(model, MixLoraConfig(num_experts=4, top_k=2, lora_dropout=0.0))
    randomize_adapter(model, scale=0.05)
    model.train()
    module = AdapterLM(model, adapter, optimizer=functools.partial(torch.optim.SGD, lr=0.0), num_tasks=3,
                       activation_checkpointing=checkpointing)
    assert model.is_activation_checkpointing == checkpointing
    batch = token_batch(batch=2, seq=10)
    loss = module(batch) + sum(adapter.aux_losses(model).values())
    loss.backward()
    module._record_routing(batch, module.routing["train"])
    router_grads = [m.router.weight.grad.clone() for _, m in routed_modules(model)]
    return module.routing["train"], router_grads


def test_gradient_checkpointing_neither_double_counts_nor_cuts_router_gradients():
    plain, plain_grads = mixlora_step(checkpointing=False)
    checkpointed, checkpointed_grads = mixlora_step(checkpointing=True)
    assert plain.sums["tokens"].sum() == 2 * 17  # two sites × the 17 real tokens, counted once
    for name in RoutingStatistics.FIELDS:
        torch.testing.assert_close(checkpointed.sums[name], plain.sums[name])
    for a, b in zip(plain_grads, checkpointed_grads, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)
