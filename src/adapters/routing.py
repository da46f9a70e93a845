"""Routers, balance losses and routing statistics shared by every routed method.

* :class:`TopKRouter` — a linear router in fp32: ``p = softmax(W_r x)``, keep the top-k of ``p``,
  renormalise the kept weights to sum to 1 (methods.md §3.1, the MixLoRA / HF-Mixtral convention);
  ``top_k = E`` gives dense softmax mixing. Init ``N(0, init_std)``. Logits and softmax run with autocast
  off (:func:`full_precision`), so a bf16-mixed trainer still routes in fp32 (design.md "Speed by design").
* :func:`apply_jitter` — multiplicative input noise ``U(1−ε, 1+ε)`` in training, before routing, that
  the experts see too (HF-Mixtral convention, methods.md §3.1); out of place, unlike the official code.
* :func:`load_balance_loss` — the Switch/Mixtral loss ``E · Σ_{slot,i} F_{slot,i} P_i`` with the top-k
  one-hot convention (uniform routing gives k), padding masked, reduced either over the pooled tokens of
  all layers (MoE-PEFT, methods.md §3.2) or per layer and then averaged.
* :func:`router_z_loss` — ``mean(logsumexp(logits)²)`` (ST-MoE).
* :func:`masked_mean` — the token mean every balance loss is built from; per process and micro-batch
  (``aux_loss_scope: local``, what the papers compute on one GPU) or over all processes of the step
  (``global``, :func:`global_token_statistics`).
* :class:`Routing` — what a routing site exposes after each forward; :class:`RoutingStatistics` turns
  those records into the metrics of design.md ("Routing statistics") from raw sums and counts.

Every routed method, the router-free FURINA included, reports a :class:`Routing`, so all of them share
one metrics and plotting path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """One routing site's decision for the T tokens of the last forward.

    ``probs`` [T, E] (fp32, rows sum to 1) is the routing distribution; ``selected`` [T, k] are the experts
    each token was sent to (for dense mixing: the dominant expert, k = 1, so that load stays meaningful);
    ``logits`` [T, E] when the router has them (z-loss, logit-based losses); ``sub_logits`` [T, M, E] the
    logits of each sub-router when the router is a mixture of routers (MoR), for its sub-router balance loss.
    """

    probs: Tensor
    selected: Tensor
    logits: Tensor | None = None
    sub_logits: Tensor | None = None


# ---------------------------------------------------------------------------------------------- routers


def full_precision(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``x``'s device: under bf16-mixed precision autocast would run the router matmul in
    bf16 whatever its inputs were cast to, and routing decisions would flip on rounding."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def apply_jitter(x: Tensor, noise: float, training: bool) -> Tensor:
    """Multiply by ``U(1−ε, 1+ε)`` noise in training (HF-Mixtral); identity otherwise."""
    if not training or noise <= 0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - noise, 1.0 + noise)


def top_k_weights(probs: Tensor, top_k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """The ``top_k`` largest probabilities of each row and their indices; optionally renormalised to 1."""
    weights, selected = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, selected


def scatter_weights(weights: Tensor, selected: Tensor, num_experts: int) -> Tensor:
    """Dense [T, E] routing weights from the top-k ``weights`` [T, k] at ``selected``; zero elsewhere."""
    return torch.zeros(*weights.shape[:-1], num_experts, dtype=weights.dtype,
                       device=weights.device).scatter(-1, selected, weights)


class TopKRouter(nn.Module):
    """``p = softmax(W_r x)`` in fp32, top-k, renormalised (methods.md §3.1). No bias, as in MixLoRA."""

    def __init__(self, d_in: int, num_experts: int, top_k: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_in, dtype=torch.float32))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, x: Tensor) -> Tensor:
        # At least fp32 whatever the model was cast to: a bf16-cast router still routes in fp32, and an
        # fp64 one (parity tests) stays fp64.
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with full_precision(x):
            return x.to(dtype) @ self.weight.to(dtype).T

    def probabilities(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(probs, logits)`` — the routing distribution; sub-classes (MoR) change only this."""
        with full_precision(x):
            logits = self.logits(x)
            return logits.softmax(dim=-1), logits

    def forward(self, x: Tensor) -> tuple[Tensor, Routing]:
        """Returns dense weights [T, E] (zero outside the top-k) and the routing record."""
        return self.dispatch(*self.probabilities(x))

    def dispatch(self, probs: Tensor, logits: Tensor | None,
                 sub_logits: Tensor | None = None) -> tuple[Tensor, Routing]:
        """The top-k of ``probs`` as dense weights [T, E], and the record of this forward."""
        weights, selected = top_k_weights(probs, self.top_k)
        return scatter_weights(weights, selected, self.num_experts), Routing(probs, selected, logits, sub_logits)


# ---------------------------------------------------------------------------------------------- losses


# Set while a training step computes its losses with ``aux_loss_scope: global``: how to sum a tensor over all
# processes, and how many processes there are. None: every statistic is this process's micro-batch's own.
_GLOBAL_STATISTICS: ContextVar[tuple[Callable[[Tensor], Tensor], int] | None] = ContextVar("moelab_global_statistics",
                                                                                         default=None)


@contextlib.contextmanager
def global_token_statistics(all_reduce_sum: Callable[[Tensor], Tensor], num_processes: int) -> Iterator[None]:
    """Inside the context every :func:`masked_mean` is a mean over the tokens of all processes: the
    "global-batch" balance loss of Qiu et al. (arXiv 2501.11873), where F and P are batch statistics of the
    whole step rather than of one process's micro-batch. Every process must compute the same losses."""
    token = _GLOBAL_STATISTICS.set((all_reduce_sum, num_processes))
    try:
        yield
    finally:
        _GLOBAL_STATISTICS.reset(token)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the first dimension, counting only rows where ``mask`` is true.

    Under :func:`global_token_statistics` the mean runs over every process's rows: its value is the global
    mean, and its gradient is ``processes ×`` this process's share, so that after DDP averages the gradients
    over processes every token has the weight it has in the global mean. Any loss built from such means is
    then the global-batch loss, with its exact gradient.
    """
    weights = (torch.ones(values.shape[0], dtype=values.dtype, device=values.device) if mask is None
               else mask.reshape(-1).to(values.dtype))
    total = (values * weights.reshape(-1, *([1] * (values.dim() - 1)))).sum(dim=0)
    count = weights.sum()
    scope = _GLOBAL_STATISTICS.get()
    if scope is None:
        return total / count.clamp_min(1.0)
    all_reduce_sum, processes = scope
    global_total, global_count = all_reduce_sum(total.detach()), all_reduce_sum(count.detach())
    return (global_total + processes * (total - total.detach())) / global_count.clamp_min(1.0)


def balance_loss_terms(probs: Tensor, selected: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``F`` [k, E]: share of tokens whose slot j went to expert i; ``P`` [E]: mean routing probability."""
    num_experts = probs.shape[-1]
    one_hot = F.one_hot(selected, num_experts).to(probs.dtype)  # [T, k, E]
    return masked_mean(one_hot, mask), masked_mean(probs, mask)


def _check_logits(router_logits: Tensor) -> None:
    # The loss applies the softmax itself; probabilities passed by mistake would be softmaxed twice.
    rows_sum_to_one = torch.allclose(router_logits.sum(-1), torch.ones((), device=router_logits.device), atol=1e-5)
    if rows_sum_to_one and bool((router_logits >= 0).all()):
        raise ValueError("load_balance_loss expects router logits, got rows of probabilities (double softmax)")


def load_balance_loss(router_logits: list[Tensor], top_k: int, masks: list[Tensor | None] | None = None,
                      reduction: str = "pooled", probs: list[Tensor] | None = None,
                      selected: list[Tensor] | None = None) -> Tensor:
    """Switch/Mixtral load-balancing loss ``E · Σ_{slot,i} F_{slot,i} P_i`` (methods.md §3.2).

    ``router_logits``: one [T, E] tensor per layer. ``reduction="pooled"`` concatenates the tokens of all
    layers first (MoE-PEFT); ``"per_layer"`` computes the loss per layer and averages. Routers whose
    distribution is not ``softmax(logits)`` (MoR) pass ``probs`` and ``selected`` instead of logits.
    Uniform routing gives ``top_k``; a collapsed router gives ``E · top_k`` at most.
    """
    if probs is None:
        for logits in router_logits:
            _check_logits(logits)
        probs = [logits.float().softmax(-1) for logits in router_logits]
    if selected is None:
        selected = [torch.topk(p, top_k, dim=-1).indices for p in probs]
    masks = masks if masks is not None else [None] * len(probs)
    num_experts = probs[0].shape[-1]
    if reduction == "pooled":
        mask = None if any(m is None for m in masks) else torch.cat(masks)
        terms = [balance_loss_terms(torch.cat(probs), torch.cat(selected), mask)]
    elif reduction == "per_layer":
        terms = [balance_loss_terms(p, s, m) for p, s, m in zip(probs, selected, masks, strict=True)]
    else:
        raise ValueError(f"reduction must be 'pooled' or 'per_layer', got {reduction!r}")
    return torch.stack([num_experts * (f * p[None]).sum() for f, p in terms]).mean()


def router_z_loss(router_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)²``."""
    return masked_mean(torch.logsumexp(router_logits.float(), dim=-1) ** 2, mask)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy of each row (natural log), ``0·log 0 = 0``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


# ---------------------------------------------------------------------------------------------- statistics


class RoutingStatistics:
    """Routing metrics from raw sums and counts per site × expert × task.

    Sums reduce exactly across batches and DDP ranks (:meth:`reduce`); ratios are formed only when read.
    Metrics (design.md): expert load (share of routed slots), importance (mean routing probability),
    normalised routing entropy, top-k probability mass, coefficient of variation of load, dead experts
    (no slot at all), maximum expert share; plus the site × expert × task activation tensor.
    """

    FIELDS = ("tokens", "slots", "load", "importance", "entropy", "topk_mass")

    def __init__(self, num_tasks: int = 1) -> None:
        self.num_tasks = num_tasks
        self.sites: list[str] = []
        self.sums: dict[str, Tensor] = {}

    def _allocate(self, sites: list[str], num_experts: int, device: torch.device) -> None:
        self.sites = sites
        s, e, k = len(sites), num_experts, self.num_tasks
        shapes = {"tokens": (s, k), "slots": (s, k), "load": (s, e, k), "importance": (s, e, k),
                  "entropy": (s, k), "topk_mass": (s, k)}
        self.sums = {name: torch.zeros(shape, dtype=torch.float64, device=device) for name, shape in shapes.items()}

    @property
    def empty(self) -> bool:
        return not self.sites

    @torch.no_grad()
    def update(self, records: list[tuple[str, Routing]], token_mask: Tensor | None = None,
               token_tasks: Tensor | None = None) -> None:
        """Add one forward's routing records; ``token_mask``/``token_tasks`` are [T] for the T tokens."""
        if not records:
            return
        device = records[0][1].probs.device
        if self.empty:
            self._allocate([name for name, _ in records], records[0][1].probs.shape[-1], device)
        elif self.sums["tokens"].device != device:  # restored from a checkpoint, which keeps them on the CPU
            self.sums = {name: value.to(device) for name, value in self.sums.items()}
        for index, (name, routing) in enumerate(records):
            if index >= len(self.sites) or self.sites[index] != name:
                raise RuntimeError(f"routing site {name!r} changed between updates; statistics need fixed sites")
            self._add(index, routing, token_mask, token_tasks)

    def _add(self, site: int, routing: Routing, token_mask: Tensor | None, token_tasks: Tensor | None) -> None:
        probs = routing.probs.detach().double().reshape(-1, routing.probs.shape[-1])
        num_tokens, num_experts = probs.shape
        weight = probs.new_ones(num_tokens) if token_mask is None else token_mask.reshape(-1).to(probs.dtype)
        tasks = (torch.zeros(num_tokens, dtype=torch.long, device=probs.device) if token_tasks is None
                 else token_tasks.reshape(-1).to(probs.device))
        selected = routing.selected.reshape(num_tokens, -1)
        slots = F.one_hot(selected, num_experts).to(probs.dtype).sum(dim=1)  # [T, E] slots per expert
        per_task = F.one_hot(tasks, self.num_tasks).to(probs.dtype) * weight[:, None]  # [T, K]
        sums = self.sums
        sums["tokens"][site] += per_task.sum(dim=0)
        sums["slots"][site] += per_task.sum(dim=0) * selected.shape[1]
        sums["load"][site] += slots.T @ per_task
        sums["importance"][site] += probs.T @ per_task
        sums["entropy"][site] += entropy(probs) @ per_task
        sums["topk_mass"][site] += probs.gather(1, selected).sum(dim=1) @ per_task

    def merge(self, other: RoutingStatistics) -> None:
        if other.empty:
            return
        if self.empty:
            self.sites, self.sums = list(other.sites), {k: v.clone() for k, v in other.sums.items()}
            return
        for name in self.FIELDS:
            self.sums[name] += other.sums[name].to(self.sums[name].device)

    def reduce(self, all_reduce_sum) -> None:
        """Sum the raw counts across processes with ``all_reduce_sum(tensor) -> tensor``."""
        self.sums = {name: all_reduce_sum(value) for name, value in self.sums.items()}

    def reset(self) -> None:
        for value in self.sums.values():
            value.zero_()

    # -- reading ----------------------------------------------------------------------------------------

    def per_site(self) -> dict[str, Tensor]:
        """Metrics per site (all tasks pooled): [S] tensors, and [S, E] for load and importance."""
        s = {name: value.sum(dim=-1).cpu() for name, value in self.sums.items()}
        tokens = s["tokens"].clamp_min(1.0)
        num_experts = s["load"].shape[1]
        load = s["load"] / s["slots"].clamp_min(1.0)[:, None]
        mean_load = load.mean(dim=1).clamp_min(1e-12)
        return {
            "load": load,
            "importance": s["importance"] / tokens[:, None],
            "entropy": s["entropy"] / tokens / (math.log(num_experts) if num_experts > 1 else 1.0),
            "topk_mass": s["topk_mass"] / tokens,
            "load_cv": load.std(dim=1, unbiased=False) / mean_load,
            "dead_experts": (s["load"] == 0).sum(dim=1).double(),
            "max_share": load.max(dim=1).values,
        }

    def summary(self, per_layer: bool = False) -> dict[str, float]:
        """Scalars averaged over sites (``routing/<metric>``), plus one per site when ``per_layer``."""
        if self.empty:
            return {}
        metrics = self.per_site()
        scalars = ("entropy", "topk_mass", "load_cv", "dead_experts", "max_share")
        out = {f"routing/{name}": float(metrics[name].mean()) for name in scalars}
        if per_layer:
            for index, site in enumerate(self.sites):
                out.update({f"routing/{site}/{name}": float(metrics[name][index]) for name in scalars})
        return out

    def activation(self, kind: str = "load") -> Tensor:
        """The site × expert × task tensor: share of routed slots (``load``) or mean probability
        (``importance``) of every expert, per site and task."""
        if kind == "load":
            return (self.sums["load"] / self.sums["slots"].clamp_min(1.0)[:, None, :]).cpu()
        if kind == "importance":
            return (self.sums["importance"] / self.sums["tokens"].clamp_min(1.0)[:, None, :]).cpu()
        raise ValueError(f"kind must be 'load' or 'importance', got {kind!r}")

    def state_dict(self) -> dict:
        return {"sites": list(self.sites), "num_tasks": self.num_tasks,
                "sums": {name: value.cpu() for name, value in self.sums.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> RoutingStatistics:
        stats = cls(state["num_tasks"])
        stats.sites, stats.sums = list(state["sites"]), dict(state["sums"])
        return stats
