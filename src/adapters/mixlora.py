"""MixLoRA (Li et al., arXiv 2404.15159) — implements methods.md §3.1–§3.3 with the official code's choices.

Every decoder layer's FFN becomes a sparse mixture of E LoRA experts that share the frozen W1 (gate),
W3 (up) and W2 (down); the attention projections get one plain LoRA each (:class:`~.lora.LoraLinear`).
Router and experts, paper §3.2 Eq. 5–7 (methods.md §3.1):

    p = softmax(W_r h)  (fp32),   w̃ = renormalised top-k of p,   y = Σ_{e ∈ top-k} w̃_e E_e(h)      (Eq. 5, 7)
    E_e(h) = (W2 + ΔW2_e)( act((W1 + ΔW1_e) h) ⊙ (W3 + ΔW3_e) h ),   ΔW_e = s B_e A_e,  s = α/r      (Eq. 6)

with ``h`` the FFN input, router ``W_r ∈ R^{E×d}`` initialised ``N(0, router_init_std)``, ``act`` the base
FFN's activation. The router's logits and softmax run with autocast off, so they are fp32 under a
bf16-mixed trainer too. The balance loss, paper §3.2 Eq. 8–9 as MoE-PEFT's
``_mixtral_load_balancing_loss_func`` computes it (methods.md §3.2), is

    L_aux = router_aux_loss_coef · E · Σ_{slot, i} F_{slot,i} P_i                                      (Eq. 8–9)

with ``F`` the share of (unmasked) tokens whose top-k slot went to expert i and ``P_i`` the mean routing
probability, over the router outputs of all FFN layers pooled (``aux_loss_reduction="pooled"``, MoE-PEFT)
or per layer and averaged (``"per_layer"``); uniform routing gives ``k``. Padding (or, with the trainer's
``routing_tokens=answer``, prompt) tokens are masked with the batch's token mask.

Fast path (design.md "Speed by design"): ``W1 h`` and ``W3 h`` are computed once for all tokens, ``W2``
once on the routing-weighted mix ``Σ_j w̃_j a_j`` of the slots' activations ``[T, k, inter]`` (k×, not E×,
the FFN activations). The mix is summed in fp32 and rounded once before ``W2`` (the official code, too,
accumulates the weighted expert outputs in fp32). The experts' LoRA factors, ``expert_compute``:

* ``grouped`` (default, the faster at real shapes in the benchmark): every expert's A of W1/W3 once on h
  (``[T, E·r]``, the cheap factor), each slot's r columns picked, and only the selected B, and for W2 only the
  selected A and B, as one GEMM per expert over the slots sorted by expert (experts.py, "Grouped top-k"). The
  slots' activations are never kept for backward: one autograd function (:class:`_GroupedSlots`) keeps
  ``W1 h``, ``W3 h``, the rank-r factors and a one-byte dropout mask, and recomputes the rest in backward, so
  that a layer holds what a LoRA'd FFN holds rather than six ``[T, k, inter]`` tensors.
* ``dense``: every expert on every token, masked by one-hot slot masks: no data-dependent shapes and no host
  synchronisation, at E/k times the FLOPs of the selected experts' B (and of W2's A and B), and with autograd
  keeping every slot's activations. It is the reference the grouped path is tested against (outputs and
  gradients).

:meth:`MixLoraFFN.reference_forward` is the per-expert loop (gather the tokens of each expert, run its FFN)
that the tests compare both paths with.

``W2`` once on the mix instead of once per expert (the official code) is an exact identity by linearity,
``Σ_j w̃_j W2 a_j = W2 Σ_j w̃_j a_j``: the same function, differing only in floating-point ordering. It is
therefore deliberately not a flag.

Fidelity ``official-code-parity``: outputs equal the official ``mixlora`` package (``MixLoraSparseMoe``,
= TUDB-Labs/MixLoRA) on identical weights, per layer and for the whole model (its ``inject_adapter_in_model``
loader on our exported checkpoint), each in fp32 and fp64; checkpoints convert both ways
(:func:`to_official`, :func:`from_official`, ``scripts/convert_mixlora.py``). The export refuses what that
format cannot hold or the package would assert on: ``layers_to_transform`` (its loader adapts every layer),
``lora_dropout`` 0, a non-integer ``lora_alpha``; the import refuses ``use_dora`` (MixDoRA).

Deviations and choices, each with its flag:

* ``router_aux_loss_coef`` = 1e-3: the code default and the best ablation, whose numbers are Table 1's;
  the paper text says 1e-2. An official ``router_loss: false`` imports as 0.
* ``F`` uses the top-k one-hot of the code (HF-Mixtral), not the argmax of the paper's Eq. 8 (no flag).
* ``jitter_noise`` (default 0) is applied in training only, as MoE-PEFT does; the inference package
  applies it at inference too. Out of place, so the caller's tensor is untouched.
* ``router_z_loss_coef`` (default 0): an ST-MoE z-loss the ``mixlora`` strategy does not have.
* ``expert_r`` / ``expert_alpha`` / ``expert_dropout`` (default: the attention LoRA's values) are the
  official ``expert_lora`` override.
* ``target_modules=[]``: experts only, no attention LoRA (the paper's "MoE only" ablation).
* Dropout on a LoRA input draws one mask shared by all experts (the official code draws one per expert);
  identical in eval mode, where parity is tested (no flag).
* On the grouped path W2's expert dropout draws its mask from 16-bit random integers, so its probability is
  rounded to a multiple of 2⁻¹⁶ (0.05 → 0.0500031) and the kept values are scaled by that probability's
  ``1 / (1 − p)``; a float draw rounds p to 2⁻²⁴ (no flag).

Not mergeable: the FFN experts are mixed by input-dependent top-k routing. The attention LoRA alone could
be merged, the method as a whole cannot.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from transformers import activations as hf_activations

from .base import (
    Adapter,
    AdapterConfigError,
    AdapterLayer,
    adapter_state_dict,
    base_modules,
    in_selected_layers,
    inject,
    load_adapter_state_dict,
    register,
    require,
)
from .experts import (
    ExpertChunk,
    LoraExperts,
    SlotOrder,
    expert_chunks,
    from_sorted,
    matmul_dtype,
    segment_mm,
    segment_outer,
    slot_order,
)
from .lora import LoraConfig, LoraLinear
from .routed import RoutedLoraAdapter, RoutedLoraConfig
from .routing import apply_jitter

# ---------------------------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class MixLoraConfig(RoutedLoraConfig):
    """MixLoRA's defaults (methods.md §3.3): plain LoRA r16/α32/dropout .05 on q, k, v, o; 8 experts, top-2,
    with the same r/α/dropout unless ``expert_*`` say otherwise."""

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # [] is MixLoRA without attention LoRA (the paper's "MoE only" ablation): the FFN is always adapted
    allows_empty_targets: ClassVar[bool] = True
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    expert_r: int | None = None  # None: the attention LoRA's value (the official "expert_lora" override)
    expert_alpha: float | None = None
    expert_dropout: float | None = None
    ffn_module: str = "mlp"  # the FFN module of each decoder layer, and its three projections (LLaMA names)
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"

    def __post_init__(self) -> None:
        require(isinstance(self.target_modules, list | tuple),
                f"target_modules ({self.target_modules!r}) must list the attention projections; "
                "the FFN projections get the experts")
        super().__post_init__()
        require(self.expert_r is None or (isinstance(self.expert_r, int) and self.expert_r > 0),
                f"expert_r ({self.expert_r}) must be a positive integer or null")
        require(self.expert_alpha is None or self.expert_alpha > 0,
                f"expert_alpha ({self.expert_alpha}) must be positive or null")
        require(self.expert_dropout is None or 0.0 <= self.expert_dropout < 1.0,
                f"expert_dropout ({self.expert_dropout}) must be in [0, 1) or null")
        names = self.ffn_projections
        require(all(isinstance(n, str) and n for n in [self.ffn_module, *names]),
                "ffn_module, gate_proj, up_proj and down_proj must be non-empty names")
        require(len(set(names)) == 3, f"gate_proj, up_proj and down_proj ({names}) must be distinct")
        overlap = sorted(set(self.target_modules) & set(names))
        require(not overlap, f"target_modules ({self.target_modules}) must not name the FFN projections {overlap}: "
                             "MixLoRA's experts adapt them")

    @property
    def ffn_projections(self) -> list[str]:
        return [self.gate_proj, self.up_proj, self.down_proj]

    def expert_lora(self) -> LoraConfig:
        """The LoRA config of the FFN experts: the ``expert_*`` overrides, else the attention LoRA's."""
        return LoraConfig(target_modules=self.ffn_projections,
                          r=self.r if self.expert_r is None else self.expert_r,
                          lora_alpha=self.lora_alpha if self.expert_alpha is None else self.expert_alpha,
                          lora_dropout=self.lora_dropout if self.expert_dropout is None else self.expert_dropout,
                          use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights,
                          lora_dropout_sharing=self.lora_dropout_sharing)


# ---------------------------------------------------------------------------------------------- grouped slots

CHUNK_MIN_ELEMENTS = 2**18  # the smallest [rows, inter] intermediate worth a chunk of its own (1 MiB in fp32)


@dataclass(frozen=True)
class _SlotPlan:
    """What :class:`_GroupedSlots` needs besides tensors: the slot order, the FFN's activation, the dropout
    probability of W2's experts (0 outside training), the dtypes of the activations and of the LoRA matmuls."""

    order: SlotOrder
    chunks: list[ExpertChunk]
    act_fn: Callable[[Tensor], Tensor]
    act_backward: Callable[[Tensor, Tensor], Tensor] | None  # (grad of act(x), x) → grad of x; None: autograd
    dropout: float
    act_dtype: torch.dtype
    matmul_dtype: torch.dtype

    @property
    def dropped_of_65536(self) -> int:
        """The drop probability in 65536ths (at most 65535: p < 1), the resolution of :func:`draw_keep_mask`."""
        return min(round(self.dropout * 2**16), 2**16 - 1)

    @property
    def keep_scale(self) -> float:
        """Inverted dropout's ``1 / (1 − p)`` of the probability the mask is drawn with."""
        return 2**16 / (2**16 - self.dropped_of_65536)


class _GroupedSlots(torch.autograd.Function):
    """The per-slot part of the FFN on the grouped path, with the memory of the frozen FFN's own activations.

    For the S = T·k slots sorted by expert, with ``h_s`` the slot's scaled A-factor of W1 and ``u_s`` of W3:

        gate_s = (W1 x)_t + B1_e h_s,   up_s = (W3 x)_t + B3_e u_s,   a_s = act(gate_s) ⊙ up_s
        mix_t  = Σ_{s of t} w̃_s a_s  (fp32),   z_s = A2_e dropout(a_s)

    Autograd would keep gate, act(gate), up, a, the dropout mask and the dropped copy for backward: six
    [S, inter] tensors, 6k times one activation of the frozen FFN, in every layer until its backward. This
    keeps ``W1 x`` and ``W3 x`` ([T, inter], which the frozen FFN's own backward would keep too), the rank-r
    factors and a one-byte dropout mask, and recomputes gate, up and a in backward (two rank-r GEMMs per slot
    and elementwise work, no frozen-size GEMM). Forward and backward run over chunks of the sorted slots
    (``plan.chunks``), so that their intermediates stay within about one [T, inter] activation as well.

    Rows enter ``mix`` (and the gradients of ``W1 x``, ``W3 x``) per expert: a token has at most one slot per
    expert, so no ``index_add_`` call adds twice to one row and the order of the sum is fixed (on CUDA repeated
    rows would be added atomically, in any order). The dropout mask is drawn from 16-bit random integers
    (:func:`draw_keep_mask`), and its ``1 / (1 − p)`` scales the rank-r side (z and its gradient), not [S, inter]
    tensors.
    """

    @staticmethod
    def forward(ctx, gate0: Tensor, up0: Tensor, gate_h: Tensor, up_h: Tensor, weights: Tensor, gate_B: Tensor,
                up_B: Tensor, down_A: Tensor, plan: _SlotPlan) -> tuple[Tensor, Tensor]:
        accumulate = torch.promote_types(plan.act_dtype, torch.float32)
        mix = gate0.new_zeros(gate0.shape, dtype=accumulate)
        z = gate_h.new_empty(gate_h.shape[0], down_A.shape[1], dtype=plan.matmul_dtype)
        mask = gate0.new_empty(gate_h.shape[0], gate0.shape[1], dtype=torch.uint8) if plan.dropout else None
        with torch.autocast(device_type=gate0.device.type, enabled=False):
            for chunk in plan.chunks:
                rows, tokens = chunk.rows, plan.order.tokens[chunk.rows]
                act = _slot_activations(gate0, up0, gate_h, up_h, gate_B, up_B, chunk, plan)
                _add_rows(mix, tokens, act.to(accumulate) * weights[rows, None].to(accumulate), chunk)
                if mask is not None:
                    act = act * draw_keep_mask(plan.dropped_of_65536, out=mask[rows])
                z[rows] = segment_mm(act.to(plan.matmul_dtype), down_A[chunk.experts].to(plan.matmul_dtype).mT,
                                     chunk.counts)
        if mask is not None:
            z.mul_(plan.keep_scale)  # inverted dropout's scale, applied to the rank-r side
        ctx.save_for_backward(gate0, up0, gate_h, up_h, weights, gate_B, up_B, down_A, mask)
        ctx.plan = plan
        return mix, z

    @staticmethod
    @once_differentiable  # it runs without autograd, but for the local graph of the recomputed activation
    def backward(ctx, grad_mix: Tensor | None, grad_z: Tensor | None) -> tuple:
        gate0, up0, gate_h, up_h, weights, gate_B, up_B, down_A, mask = ctx.saved_tensors
        plan = ctx.plan
        mm = plan.matmul_dtype
        accumulate = torch.promote_types(plan.act_dtype, torch.float32)
        grad_gate0 = gate0.new_zeros(gate0.shape, dtype=plan.act_dtype)
        grad_up0 = torch.zeros_like(grad_gate0)
        grad_gate_h, grad_up_h = torch.empty_like(gate_h, dtype=mm), torch.empty_like(up_h, dtype=mm)
        grad_weights = torch.zeros_like(weights, dtype=accumulate)
        grad_gate_B, grad_up_B = torch.zeros_like(gate_B, dtype=mm), torch.zeros_like(up_B, dtype=mm)
        grad_down_A = torch.zeros_like(down_A, dtype=mm)
        if grad_z is not None and mask is not None:
            grad_z = grad_z * plan.keep_scale
        with torch.autocast(device_type=gate0.device.type, enabled=False):
            for chunk in plan.chunks:
                rows, experts, tokens = chunk.rows, chunk.experts, plan.order.tokens[chunk.rows]
                gate, up = _slot_inputs(gate0, up0, gate_h, up_h, gate_B, up_B, chunk, plan)
                activated, value = _activation(gate, up, plan)
                # the gradient reaching a, built in one buffer; every intermediate is dropped as soon as it is
                # used, so that a chunk holds a handful of [rows, inter] tensors at a time
                if grad_mix is None:
                    grad_act = torch.zeros_like(value, dtype=accumulate)
                else:
                    grad_act = grad_mix.index_select(0, tokens).to(accumulate)
                    grad_weights[rows] = torch.linalg.vecdot(grad_act, value.to(accumulate))
                    grad_act.mul_(weights[rows, None].to(accumulate))
                if grad_z is not None:
                    keep, grad_rows = None if mask is None else mask[rows], grad_z[rows].to(mm)
                    dropped = value if keep is None else value * keep
                    grad_down_A[experts] += segment_outer(grad_rows, dropped.to(mm), chunk.counts)
                    del dropped
                    grad_dropped = segment_mm(grad_rows, down_A[experts].to(mm), chunk.counts)
                    grad_act += grad_dropped if keep is None else grad_dropped.mul_(keep)
                    del grad_dropped
                grad_gate, grad_up = _activation_grads(gate, up, activated, value, grad_act.to(value.dtype), plan)
                del activated, value, gate, up, grad_act
                _add_rows(grad_gate0, tokens, grad_gate, chunk)
                _add_rows(grad_up0, tokens, grad_up, chunk)
                for grad, h, B, grad_h, grad_B in ((grad_gate, gate_h, gate_B, grad_gate_h, grad_gate_B),
                                                   (grad_up, up_h, up_B, grad_up_h, grad_up_B)):
                    grad_h[rows] = segment_mm(grad.to(mm), B[experts].to(mm), chunk.counts)
                    grad_B[experts] += segment_outer(grad.to(mm), h[rows].to(mm), chunk.counts)
        return (grad_gate0.to(gate0.dtype), grad_up0.to(up0.dtype), grad_gate_h.to(gate_h.dtype),
                grad_up_h.to(up_h.dtype), grad_weights.to(weights.dtype), grad_gate_B.to(gate_B.dtype),
                grad_up_B.to(up_B.dtype), grad_down_A.to(down_A.dtype), None)


def _slot_inputs(gate0: Tensor, up0: Tensor, gate_h: Tensor, up_h: Tensor, gate_B: Tensor, up_B: Tensor,
                 chunk: ExpertChunk, plan: _SlotPlan) -> tuple[Tensor, Tensor]:
    """``(W x)_t + B_e h_s`` of W1 and W3 for the chunk's slots, in the activation dtype. The LoRA term is rounded
    to it before the sum, as the dense path adds it; when no rounding is needed the GEMMs add into the gathered
    rows themselves."""
    tokens, mm = plan.order.tokens[chunk.rows], plan.matmul_dtype
    inputs = []
    for base, h, B in ((gate0, gate_h, gate_B), (up0, up_h, up_B)):
        rows = base.index_select(0, tokens).to(plan.act_dtype)
        h, B = h[chunk.rows].to(mm), B[chunk.experts].to(mm).mT
        if mm == plan.act_dtype:
            segment_mm(h, B, chunk.counts, add_to=rows)
        else:
            rows += segment_mm(h, B, chunk.counts).to(plan.act_dtype)
        inputs.append(rows)
    return tuple(inputs)


def _slot_activations(gate0: Tensor, up0: Tensor, gate_h: Tensor, up_h: Tensor, gate_B: Tensor, up_B: Tensor,
                      chunk: ExpertChunk, plan: _SlotPlan) -> Tensor:
    """``act(gate_s) ⊙ up_s`` of the chunk's slots (no autograd: the function's own forward)."""
    gate, up = _slot_inputs(gate0, up0, gate_h, up_h, gate_B, up_B, chunk, plan)
    return plan.act_fn(gate).mul_(up)


def draw_keep_mask(dropped_of_65536: int, out: Tensor) -> Tensor:
    """A dropout keep mask of 0 and 1 into the uint8 tensor ``out``: each entry 0 with probability
    ``dropped_of_65536`` / 65536. Four 16-bit uniform integers come from one 64-bit draw; on a CPU this costs less
    than half of ``torch.rand`` compared with p (3.3 against 7.7 ns per entry, measured on fresh [170, 1536]
    masks), and ``bernoulli_`` costs as much as ``torch.rand``. uint8, not bool: a CPU multiplies a float tensor
    by uint8 in 40 % of the time it takes with bool (measured at the same size)."""
    bits = torch.empty(-(-out.numel() // 4), dtype=torch.int64, device=out.device).random_(-2**63, None)
    entries = bits.view(torch.int16)[:out.numel()].view(out.shape)
    torch.ge(entries, dropped_of_65536 - 2**15, out=out.view(torch.bool))
    return out


def _activation(gate: Tensor, up: Tensor, plan: _SlotPlan) -> tuple[Tensor | None, Tensor]:
    """``act(gate)`` and ``a = act(gate) ⊙ up``, recomputed in backward; with autograd's graph of ``a`` where
    the activation has no known backward kernel."""
    if plan.act_backward is None:
        gate.requires_grad_(), up.requires_grad_()
        with torch.enable_grad():
            value = plan.act_fn(gate) * up
        return None, value
    activated = plan.act_fn(gate)
    return activated, activated * up


def _activation_grads(gate: Tensor, up: Tensor, activated: Tensor | None, value: Tensor, grad: Tensor,
                      plan: _SlotPlan) -> tuple[Tensor, Tensor]:
    """The gradients of ``gate`` and ``up`` from the gradient of ``a = act(gate) ⊙ up``: the products and the
    activation's backward kernel autograd would run, without a nested autograd pass per chunk (which costs about
    as much again as the kernels at SmolLM2 width, measured on a CPU)."""
    if plan.act_backward is None:
        return torch.autograd.grad(value, (gate, up), grad)
    return plan.act_backward(grad * up, gate), grad * activated


# the SiLU modules of Llama, Qwen and Mistral FFNs: torch's, and the one transformers 5 builds for "silu"
_SILU_MODULES = (nn.SiLU, getattr(hf_activations, "SiLUActivation", nn.SiLU))


def activation_backward(act_module: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``(grad of act(x), x) → grad of x`` for the activation modules whose ATen backward kernel is known (SiLU;
    nn.GELU), else None (autograd then differentiates the activation)."""
    if type(act_module) in _SILU_MODULES:
        return torch.ops.aten.silu_backward
    if type(act_module) is nn.GELU:
        return functools.partial(torch.ops.aten.gelu_backward, approximate=act_module.approximate)
    return None


def _add_rows(target: Tensor, tokens: Tensor, rows: Tensor, chunk: ExpertChunk) -> None:
    """``target[tokens[i]] += rows[i]``, one ``index_add_`` per expert (see :class:`_GroupedSlots`)."""
    for _, start, end in chunk.segments():
        target.index_add_(0, tokens[start:end], rows[start:end].to(target.dtype))


# ---------------------------------------------------------------------------------------------- the layer


class MixLoraFFN(AdapterLayer):
    """A decoder layer's FFN as a top-k mixture of LoRA experts sharing its frozen projections."""

    def __init__(self, mlp: nn.Module, config: MixLoraConfig, router: nn.Module) -> None:
        super().__init__(mlp)
        self.projections = config.ffn_projections  # names of W1 (gate), W3 (up), W2 (down) inside ``mlp``
        self.jitter_noise = config.jitter_noise
        expert_config = config.expert_lora()
        self.experts = nn.ModuleDict({name: expert_config.make_experts(getattr(mlp, name), config.num_experts)
                                      for name in self.projections})
        self.router = router
        self.expert_compute = config.expert_compute

    def _base(self, index: int) -> nn.Linear:
        # read from base_layer on each use: keeping the frozen linears as attributes here would register
        # them a second time, outside base_layer, where they would count as adapter parameters
        return getattr(self.base_layer, self.projections[index])

    def _expert_stack(self, index: int) -> LoraExperts:
        return self.experts[self.projections[index]]

    def adapted_forward(self, hidden: Tensor) -> Tensor:
        x = apply_jitter(hidden.reshape(-1, hidden.shape[-1]), self.jitter_noise, self.training)
        weights, self.routing = self.router(x)
        slot_weights = weights.gather(-1, self.routing.selected)  # [T, k], renormalised
        return self._mix(x, self.routing.selected, slot_weights).reshape(hidden.shape)

    def _mix(self, x: Tensor, selected: Tensor, slot_weights: Tensor) -> Tensor:
        """``Σ_j w̃_j E_{selected_j}(x)`` for every token: the frozen W1 h, W3 h and W2 once, the experts' LoRA
        factors densely (every expert, masked) or grouped (the selected experts only)."""
        mix, down_delta = (self._grouped_slots if self.expert_compute == "grouped" else self._dense_slots)(
            x, selected, slot_weights)
        out = self._base(2)(mix)  # W2 once, on the mix
        return out + down_delta.to(out.dtype)

    def _dense_slots(self, x: Tensor, selected: Tensor, slot_weights: Tensor) -> tuple[Tensor, Tensor]:
        """The weighted mix of the slots' activations and W2's expert terms, every expert computed and masked."""
        slots = F.one_hot(selected, self._expert_stack(0).num_experts)  # [T, k, E]
        gate, up = (self._slot_projection(i, x, slots) for i in (0, 1))
        act = self.base_layer.act_fn(gate) * up  # [T, k, inter]: k× the FFN activations, not E×
        # the weighted mix in fp32, rounded once for W2: summed in a bf16 base's dtype, every product would be
        # rounded first (the official code accumulates the weighted expert outputs in fp32)
        accumulate = torch.promote_types(act.dtype, torch.float32)
        mix = torch.sum(slot_weights.to(accumulate).unsqueeze(-1) * act.to(accumulate), dim=1)
        down = self._expert_stack(2)
        h = down.down(act)  # [T, k, E, r]: every expert's A on every slot's activation
        weighted_slots = slots * slot_weights.unsqueeze(-1)  # [T, k, E]: w̃_j at slot j's expert, 0 elsewhere
        return mix.to(act.dtype), down.up(torch.sum(h * weighted_slots.unsqueeze(-1).to(h.dtype), dim=1))

    def _slot_projection(self, index: int, x: Tensor, slots: Tensor) -> Tensor:
        """``(W + ΔW_{e_j}) x`` for every token and slot j: the frozen product once, [T, k, d_out]."""
        experts = self._expert_stack(index)
        h = experts.down(x).unsqueeze(1)  # [T, 1, E, r]: every expert's A, once
        h = h * slots.unsqueeze(-1).to(h.dtype)  # [T, k, E, r]: slot j keeps its expert only
        return self._base(index)(x).unsqueeze(1) + experts.up(h).to(x.dtype)

    def _grouped_slots(self, x: Tensor, selected: Tensor, slot_weights: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_dense_slots` with the selected experts only (:class:`_GroupedSlots`): every expert's A of W1
        and W3 once on x (rank E·r, the cheap factor) and each slot's r columns picked, then per expert over its
        sorted slots B of W1 and W3, A of W2 (inside the function) and B of W2."""
        gate, up, down = (self._expert_stack(i) for i in range(3))
        order = slot_order(selected, gate.num_experts)
        weights = slot_weights.reshape(-1).index_select(0, order.order)
        gate0, up0 = self._base(0)(x), self._base(1)(x)
        dropout = down.dropout.p if isinstance(down.dropout, nn.Dropout) and down.dropout.training else 0.0
        # chunks of T/8 slots: the backward holds about ten [rows, inter] intermediates of a chunk at a time,
        # together about one [T, inter] activation of the frozen FFN; but never under CHUNK_MIN_ELEMENTS per
        # intermediate, where memory is no concern and every further chunk costs its per-op overhead
        inter = self._base(0).out_features
        chunks = expert_chunks(order.counts, max_rows=max(x.shape[0] // 8, CHUNK_MIN_ELEMENTS // inter, 1))
        # the activation module's forward without its hooks: the function calls it again in backward, where hooks
        # that track modules (FlopCounterMode's) would attach to a graph that the outer backward is running
        act_fn = getattr(self.base_layer.act_fn, "forward", self.base_layer.act_fn)
        plan = _SlotPlan(order, chunks, act_fn, activation_backward(self.base_layer.act_fn), dropout,
                         act_dtype=torch.promote_types(gate0.dtype, x.dtype),
                         matmul_dtype=matmul_dtype(x, gate.lora_B))
        mix, z = _GroupedSlots.apply(gate0, up0, gate.scale_slots(gate.slot_down(x, order), order),
                                     up.scale_slots(up.slot_down(x, order), order), weights, gate.lora_B, up.lora_B,
                                     down.lora_A, plan)
        h = z * weights.to(z.dtype)[:, None]
        return mix.to(plan.act_dtype), from_sorted(down.grouped_up(h, order), order).sum(dim=1)

    def reference_forward(self, hidden: Tensor) -> Tensor:
        """The straightforward per-expert loop the fast path must equal (tests only; no jitter)."""
        x = hidden.reshape(-1, hidden.shape[-1])
        weights, routing = self.router(x)
        out = torch.zeros_like(x)
        for expert in range(self._expert_stack(0).num_experts):
            tokens = torch.where(routing.selected == expert)[0]
            xe = x[tokens]
            gate = self._base(0)(xe) + self._expert_stack(0).expert_delta(xe, expert).to(x.dtype)
            up = self._base(1)(xe) + self._expert_stack(1).expert_delta(xe, expert).to(x.dtype)
            act = self.base_layer.act_fn(gate) * up
            y = self._base(2)(act) + self._expert_stack(2).expert_delta(act, expert).to(x.dtype)
            out = out.index_add(0, tokens, weights[tokens, expert, None].to(x.dtype) * y)
        return out.reshape(hidden.shape)


@register
class MixLora(RoutedLoraAdapter):
    name = "mixlora"
    config_class = MixLoraConfig
    placement = "ffn_block"
    mergeable = False
    fidelity = "official-code-parity"
    merge_refusal = ("its FFN experts are mixed by input-dependent top-k routing (the attention LoRA alone could "
                     "merge, the method as a whole cannot)")

    def make_layer(self, name: str, module: nn.Module) -> LoraLinear:
        return LoraLinear(module, self.config)

    def target_names(self, model: nn.Module) -> list[str]:
        """The attention projections that get a plain LoRA; none for experts only (``target_modules=[]``)."""
        return super().target_names(model) if self.config.target_modules else []

    def inject(self, model: nn.Module) -> None:
        super().inject(model)  # the attention LoRA
        config = self.config
        for name in self.ffn_names(model):
            mlp = model.get_submodule(name)
            gate = getattr(mlp, config.gate_proj)
            router = self.make_router(gate.in_features, config.num_experts, config.top_k, config.router_init_std)
            model.set_submodule(name, MixLoraFFN(mlp, config, router.to(gate.weight.device)))

    def ffn_names(self, model: nn.Module) -> list[str]:
        """Paths of the FFN modules to replace; fails naming the field when they do not fit."""
        config = self.config
        names = [name for name, _ in base_modules(model) if name.rsplit(".", 1)[-1] == config.ffn_module]
        require(bool(names), f"ffn_module ({config.ffn_module!r}) matches no module of {type(model).__name__}")
        names = in_selected_layers(names, config.layers_to_transform)
        for name in names:
            mlp = model.get_submodule(name)
            missing = [p for p in config.ffn_projections if not isinstance(getattr(mlp, p, None), nn.Linear)]
            require(not missing, f"gate_proj/up_proj/down_proj: {name} has no nn.Linear named {missing}")
            require(callable(getattr(mlp, "act_fn", None)), f"ffn_module: {name} has no act_fn to share")
        return names


# ---------------------------------------------------------------------------------------------- interop

# The official checkpoint (methods.md §3.3, assets.md §3.2): adapter_config.json + adapter_model.bin with
#   mixlora.layers.{i}.self_attn.{proj}.lora_{A,B}.weight           [r, in] / [out, r]
#   mixlora.layers.{i}.mlp.moe_gate.weight                           [E, hidden]
#   mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_{A,B}.weight
# Our keys carry the same structure: <prefix>layers.{i}.self_attn.{proj}.lora.lora_A ([1, r, in], a
# one-expert stack), <prefix>layers.{i}.mlp.router.weight, <prefix>layers.{i}.mlp.experts.{proj}.lora_A
# ([E, r, in]); the scaling buffers follow from the config and are not exported.
_OURS = re.compile(r"^(?P<prefix>.*?)layers\.(?P<site>\d+\..+?)\.(?:(?P<router>router\.weight)|"
                   r"lora\.(?P<attn>lora_[AB]|scaling)|experts\.(?P<proj>[^.]+)\.(?P<expert>lora_[AB]|scaling))$")
OFFICIAL_WEIGHTS, OFFICIAL_CONFIG = "adapter_model.bin", "adapter_config.json"


def _official_names(key: str, num_experts: int) -> list[str] | None:
    """The official key(s) of one of our adapter tensors, one per stacked expert; None for scaling buffers."""
    match = _OURS.match(key)
    if match is None:
        raise AdapterConfigError(f"{key} is not a MixLoRA adapter tensor")
    site = f"mixlora.layers.{match['site']}"
    if match["router"]:
        return [f"{site}.moe_gate.weight"]
    if match["attn"]:
        return None if match["attn"] == "scaling" else [f"{site}.{match['attn']}.weight"]
    if match["expert"] == "scaling":
        return None
    return [f"{site}.{match['proj']}.experts.{e}.{match['expert']}.weight" for e in range(num_experts)]


def to_official_state(state: dict[str, Tensor], config: MixLoraConfig) -> dict[str, Tensor]:
    """Our adapter state dict in the official key format (no model needed)."""
    official = {}
    for key, value in state.items():
        names = _official_names(key, config.num_experts)
        if names is None:
            continue
        pieces = [value] if key.endswith("router.weight") else value.unbind(0)
        official.update({name: piece.detach().contiguous() for name, piece in zip(names, pieces, strict=True)})
    return official


def load_official_state(model: nn.Module, weights: dict[str, Tensor], source: str = "official weights") -> None:
    """Copy official-format tensors into a model injected with MixLoRA; missing or extra keys fail by name."""
    config = model.moelab_adapter.config
    state, used = {}, set()
    for key, value in adapter_state_dict(model).items():
        names = _official_names(key, config.num_experts)
        if names is None:
            state[key] = value  # scaling: fixed by the config
            continue
        missing = [name for name in names if name not in weights]
        require(not missing, f"{source}: missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        used.update(names)
        state[key] = weights[names[0]] if key.endswith("router.weight") else torch.stack([weights[n] for n in names])
    unexpected = sorted(set(weights) - used)
    require(not unexpected, f"{source}: unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    load_adapter_state_dict(model, state, source=source)


def _official_alpha(value: float, name: str) -> int:
    # the package's LoraConfig.check asserts isinstance(lora_alpha, int), for the expert_lora block too
    require(float(value).is_integer(), f"{name} ({value}) must be an integer to export: the official MixLoRA "
                                       "config asserts an int lora_alpha")
    return int(value)


def _check_exportable(config: MixLoraConfig, act_fn: str) -> None:
    """Refuse what the official format cannot hold or its loader would assert on, before anything is written."""
    from transformers.activations import ACT2FN

    require(config.layers_to_transform is None,
            f"layers_to_transform ({config.layers_to_transform}): the official MixLoRA format has no per-layer "
            "selection (its loader adapts every decoder layer); only a run that adapts all layers exports")
    # mixlora.lora_linear.LoraLinear asserts lora_dropout > 0; the package builds the experts with this value too
    require(config.lora_dropout > 0, f"lora_dropout ({config.lora_dropout}) must be > 0 to export: the official "
                                     "LoraLinear asserts lora_dropout > 0")
    require(act_fn in ACT2FN, f"act_fn ({act_fn!r}) is not a transformers activation name (ACT2FN), which the "
                              "official config asserts")


def ffn_activation(config: Any) -> str | None:
    """The base FFN's activation named by a transformers config (object or dict): Gemma-2 and later name it
    ``hidden_activation``, most models ``hidden_act``; None when neither is set."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return get("hidden_activation") or get("hidden_act")


def to_official_config(config: MixLoraConfig, base_model: str, act_fn: str = "silu") -> dict[str, Any]:
    """The adapter_config.json fields the official ``MixLoraConfig.from_config`` reads. ``act_fn`` (LLaMA's by
    default) must be named: the inference package applies no activation at all when it is missing."""
    _check_exportable(config, act_fn)
    experts = config.expert_lora()
    values = {
        "base_model_name_or_path": base_model, "task_type": "CAUSAL_LM", "peft_type": "MIXLORA", "bias": "none",
        "r": config.r, "lora_alpha": _official_alpha(config.lora_alpha, "lora_alpha"),
        "lora_dropout": float(config.lora_dropout), "use_rslora": config.use_rslora,
        "lora_init": "gaussian" if config.init_lora_weights == "gaussian" else "original",
        "target_modules": [*config.target_modules, *config.ffn_projections],
        "routing_strategy": "mixlora", "num_experts": config.num_experts, "top_k": config.top_k,
        "router_aux_loss_coef": float(config.router_aux_loss_coef), "router_loss": config.router_aux_loss_coef > 0,
        "router_init_range": float(config.router_init_std), "jitter_noise": float(config.jitter_noise),
        "act_fn": act_fn,
    }
    expert_values = {"r": experts.r, "lora_alpha": _official_alpha(experts.lora_alpha, "expert_alpha"),
                     "lora_dropout": float(experts.lora_dropout)}
    if any(values[k] != v for k, v in expert_values.items()):
        values["expert_lora"] = expert_values
        warnings.warn("the mixlora inference package (0.2.3) builds the experts with the attention LoRA's r and "
                      "lora_alpha and ignores expert_lora; MoE-PEFT reads it", stacklevel=2)
    return values


def from_official_config(values: dict[str, Any]) -> MixLoraConfig:
    """Our config from an official adapter_config.json (MoE-PEFT's defaults where a field is absent)."""
    require(values.get("peft_type") == "MIXLORA" and values.get("routing_strategy", "mixlora") == "mixlora",
            "peft_type/routing_strategy: only MIXLORA checkpoints with the 'mixlora' (top-k) strategy convert")
    experts = values.get("expert_lora", {})
    # MixDoRA adds a magnitude vector per LoRA: loaded as MixLoRA it would compute another function
    require(not values.get("use_dora", False) and not experts.get("use_dora", False),
            "use_dora: true (MixDoRA) does not convert: moelab's MixLoRA has no DoRA magnitude vectors")
    targets = values["target_modules"]
    targets = [t for t, on in targets.items() if on] if isinstance(targets, dict) else list(targets)
    defaults = MixLoraConfig()
    ffn = defaults.ffn_projections
    require(set(ffn) <= set(targets), f"target_modules ({targets}) must include all of {ffn}: experts on a subset "
                                      "of the FFN projections are not supported")
    # router_loss: false switches MoE-PEFT's balance loss off whatever the coefficient says
    coef = float(values.get("router_aux_loss_coef", 1e-3)) if values.get("router_loss", True) else 0.0
    return MixLoraConfig(
        target_modules=[t for t in targets if t not in ffn], r=values["r"], lora_alpha=float(values["lora_alpha"]),
        lora_dropout=float(values["lora_dropout"]), use_rslora=values.get("use_rslora", False),
        init_lora_weights="gaussian" if values.get("lora_init") == "gaussian" else "default",
        num_experts=values["num_experts"], top_k=values.get("top_k", 2), router_aux_loss_coef=coef,
        router_init_std=float(values.get("router_init_range", 0.02)),
        jitter_noise=float(values.get("jitter_noise", 0.0)),
        expert_r=experts.get("r"), expert_alpha=experts.get("lora_alpha"), expert_dropout=experts.get("lora_dropout"))


def to_official(model: nn.Module, folder: str | Path, base_model: str, act_fn: str | None = None) -> Path:
    """Write a model injected with MixLoRA as an official checkpoint folder (loadable by the ``mixlora``
    package's ``load_adapter_weights`` and by MoE-PEFT). ``act_fn`` overrides the model config's activation."""
    adapter = model.moelab_adapter
    require(adapter.name == "mixlora", f"only a MixLoRA adapter converts to the official format, not {adapter.label}")
    act_fn = act_fn or ffn_activation(getattr(model, "config", None))
    require(act_fn is not None, "act_fn: the model config names no hidden_activation or hidden_act; pass act_fn")
    return write_official(adapter_state_dict(model), adapter.config, folder, base_model, act_fn)


def write_official(state: dict[str, Tensor], config: MixLoraConfig, folder: str | Path, base_model: str,
                   act_fn: str) -> Path:
    values = to_official_config(config, base_model, act_fn)  # validates before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.cpu() for k, v in to_official_state(state, config).items()}
    torch.save(weights, folder / OFFICIAL_WEIGHTS)
    (folder / OFFICIAL_CONFIG).write_text(json.dumps(values, indent=2))
    return folder


def from_official(model: nn.Module, folder: str | Path) -> Adapter:
    """Inject MixLoRA into ``model`` with the config and weights of an official checkpoint folder."""
    folder = Path(folder)
    config = from_official_config(json.loads((folder / OFFICIAL_CONFIG).read_text()))
    adapter = inject(model, config)
    weights = torch.load(folder / OFFICIAL_WEIGHTS, map_location="cpu", weights_only=True)
    load_official_state(model, weights, source=str(folder / OFFICIAL_WEIGHTS))
    return adapter
