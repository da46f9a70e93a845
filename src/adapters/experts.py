"""Stacked LoRA experts: E low-rank updates of one linear map, computed as two matmuls.

Notation of methods.md ("Notation"): expert ``e`` has ``A_e ∈ R^{r×d_in}``, ``B_e ∈ R^{d_out×r}`` and
scale ``s_e``; its update is ``ΔW_e = s_e B_e A_e``. The experts are stored stacked, ``A: [E, r, d_in]``
and ``B: [E, d_out, r]``, so that the mix ``Σ_e w_e(x) s_e B_e A_e x`` of all experts for all tokens is

    H = dropout(x) @ A.view(E·r, d_in)ᵀ                  [T, E·r]   every expert's down projection
    y = (H ⊙ expand(w · s)) @ B.permute(0, 2, 1).view(E·r, d_out)

with routing weights ``w: [T, E]`` that are zero for experts a token does not use. No Python loop over
experts, no data-dependent shapes, no host synchronisation (design.md "Speed by design"). For E·r on
the order of a LoRA's rank this costs what one LoRA of rank E·r costs. :meth:`LoraExperts.reference`
is the per-expert loop that tests compare the fast path with.

Conventions follow HF PEFT's LoRA layer (methods.md §1.2): ``A`` initialised like ``nn.Linear``
(``kaiming_uniform_(a=√5)``), ``B = 0``, scale ``α/r`` (``α/√r`` with rsLoRA), dropout on the LoRA input
only. One dropout mask is shared by all experts of a call (PEFT-style per-expert masks would need E
copies of the input); in eval mode, where parity is tested, there is no difference.

Experts of different ranks (loaded LoRAs keep their own r and α) are stacked by zero-padding A and B to
the largest rank: the padded rows and columns contribute exactly nothing.

**Grouped top-k** (``expert_compute: grouped``). When every token uses only k of the E experts, the dense
path above still multiplies by every expert's B. The grouped path computes only the selected slots: the
k·T routing slots are sorted by expert (:func:`slot_order`), each slot picks its expert's r columns of the
down projection (the A of every expert stays one GEMM on the input as it is, rather than k gathered copies
of it), and one GEMM per expert maps its contiguous run of slots through its B (:func:`grouped_matmul`).
The per-expert GEMMs (:func:`segment_mm`, and :func:`segment_outer` for the weights' gradients) write into one
output rather than concatenating per-expert pieces: ``torch._grouped_mm`` where it is a real grouped GEMM
(CUDA, bf16, compute capability 9.0 or later, 16-byte aligned strides), a loop of ``torch.mm`` everywhere
else. Callers that hold per-slot intermediates too large to keep whole (MixLoRA's FFN) walk the slots in
chunks (:func:`expert_chunks`). Moving rows out of the sorted order is a gather whose
backward is again a gather (:func:`permute_rows`). The slot counts are read on the host once per call (the
loop and the chunks need them): a synchronisation that costs nothing on a CPU and one small copy on a GPU,
and the one departure from the no-sync rule above. :meth:`LoraExperts.forward` (dense, masked) is the
reference the tests compare the grouped path with, outputs and gradients.

**Shared dropout masks** (``lora_dropout_sharing``). ``per_module`` (PEFT's behaviour): every LoRA module
draws its own mask. ``per_input``: modules that read the same tensor in one forward (q/k/v of an attention
block, gate/up of an FFN) draw one mask between them (:class:`SharedDropout`), which saves the mask
draws and the masked copies of the input; all experts of one stack share a mask in both modes.

The last section reads trained LoRAs (moelab runs and HF PEFT folders) into such stacks, frozen, for the
methods that compose existing LoRAs (MoLE, LoRA-Mixer).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import AdapterConfigError, require


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter weights follow an fp32/fp64 base and stay fp32 under a bf16/fp16 base (PEFT's
    ``autocast_adapter_dtype``): low-rank updates of small magnitude lose too much in 8 mantissa bits."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale: ``α/r``, or ``α/√r`` with rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


EXPERT_COMPUTES = ("dense", "grouped")
DROPOUT_SHARINGS = ("per_module", "per_input")


def check_expert_compute(value: str) -> None:
    require(value in EXPERT_COMPUTES, f"expert_compute ({value!r}) must be one of {EXPERT_COMPUTES}")


def check_dropout_sharing(value: str) -> None:
    require(value in DROPOUT_SHARINGS, f"lora_dropout_sharing ({value!r}) must be one of {DROPOUT_SHARINGS}")


# ---------------------------------------------------------------------------------------------- shared dropout


class _DropoutMemo:
    """The last (input, p) → dropped tensor of the process. The input is held weakly, so a stale entry never
    keeps an activation alive, and its version counter must match, so an in-place change invalidates it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.output: Tensor | None = None

    def lookup(self, x: Tensor, p: float) -> Tensor | None:
        if self.key is None:
            return None
        ref, version, prob = self.key
        return self.output if ref() is x and version == x._version and prob == p else None

    def store(self, x: Tensor, p: float, output: Tensor) -> None:
        self.key, self.output = (weakref.ref(x), x._version, p), output


_SHARED_DROPOUT = _DropoutMemo()


class SharedDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is shared by every ``SharedDropout`` of the same ``p`` that receives the same
    tensor object next (``lora_dropout_sharing: per_input``): q, k and v of one attention block see one
    ``dropout(x)``. Calling a module twice on the very same tensor in training reuses the mask too."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        cached = _SHARED_DROPOUT.lookup(x, self.p)
        if cached is None:
            cached = super().forward(x)
            _SHARED_DROPOUT.store(x, self.p, cached)
        return cached

    def __getstate__(self) -> dict:
        return self.__dict__  # nothing of the memo travels with the module


def make_dropout(p: float, sharing: str) -> nn.Module:
    if p <= 0:
        return nn.Identity()
    return SharedDropout(p) if sharing == "per_input" else nn.Dropout(p)


# ---------------------------------------------------------------------------------------------- grouped top-k


@dataclass(frozen=True)
class SlotOrder:
    """The ``S = T·k`` routing slots of T tokens (slot ``t·k + j`` is token t's j-th choice) sorted by expert.

    ``order[i]`` is the slot at sorted position i, ``inverse`` its inverse permutation, ``experts[i]`` the
    expert of sorted position i and ``counts[e]`` (host ints) how many slots expert e received."""

    order: Tensor
    inverse: Tensor
    experts: Tensor
    counts: tuple[int, ...]
    top_k: int

    @functools.cached_property
    def tokens(self) -> Tensor:
        """The token of every sorted position (computed once: a chunked caller reads it per chunk)."""
        return self.order // self.top_k


def slot_order(selected: Tensor, num_experts: int) -> SlotOrder:
    """Sort the slots of ``selected`` [T, k] (expert indices) by expert; stable, so ties keep token order."""
    flat = selected.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return SlotOrder(order, inverse, flat[order], tuple(counts), selected.shape[-1])


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward is the gather by the inverse permutation
    (not a scatter-add, which the generic indexing backward would run)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    return _PermuteRows.apply(x, index, inverse)


def from_sorted(rows: Tensor, order: SlotOrder) -> Tensor:
    """Sorted rows [S, d] → per token and slot, [T, k, d]."""
    return permute_rows(rows, order.inverse, order.order).unflatten(0, (-1, order.top_k))


def _segments(counts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every expert that received slots."""
    bounds, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            bounds.append((expert, start, start + count))
        start += count
    return bounds


@dataclass(frozen=True)
class ExpertChunk:
    """Sorted rows ``start … end − 1``: ``counts[i]`` of them belong to expert ``first + i``."""

    first: int
    start: int
    end: int
    counts: tuple[int, ...]

    @property
    def rows(self) -> slice:
        return slice(self.start, self.end)

    @property
    def experts(self) -> slice:
        return slice(self.first, self.first + len(self.counts))

    def segments(self) -> list[tuple[int, int, int]]:
        """``(expert, start, end)`` of each of its experts that has rows, counted from the chunk's first."""
        return _segments(self.counts)


def expert_chunks(counts: tuple[int, ...], max_rows: int) -> list[ExpertChunk]:
    """The sorted rows in consecutive chunks of at most ``max_rows``, each with its rows per expert (an expert's rows
    may go on in the next chunk), so that a computation over the slots holds one chunk's intermediates at a time."""
    ends = list(itertools.accumulate(counts))
    chunks, start = [], 0
    while start < ends[-1]:
        end = min(start + max_rows, ends[-1])
        first, last = bisect.bisect_right(ends, start), bisect.bisect_left(ends, end)
        rows = tuple(min(ends[e], end) - max(ends[e] - counts[e], start) for e in range(first, last + 1))
        chunks.append(ExpertChunk(first, start, end, rows))
        start = end
    return chunks


def matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a plain matmul of ``x`` by ``weight`` computes in: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _grouped_mm_is_fast(*tensors: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` beats a loop of ``torch.mm``: only its CUDA kernels for bf16 on compute
    capability 9.0 and later are grouped GEMMs (elsewhere it loops itself, with host synchronisations), and
    they need every pointer and stride aligned to 16 bytes."""
    x = tensors[0]
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(t.dtype == torch.bfloat16 and t.data_ptr() % 16 == 0
                    and all(stride % 8 == 0 for stride in t.stride() if stride != 1) for t in tensors))


def _offsets(counts: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def segment_mm(x: Tensor, weight: Tensor, counts: tuple[int, ...], add_to: Tensor | None = None) -> Tensor:
    """``x[rows of e] @ weight[e]`` for rows sorted by expert (``counts[e]`` rows each) and ``weight`` [E, a, b]
    (any strides): [S, a] → [S, b], written into one output, or added in place to ``add_to`` [S, b]."""
    if _grouped_mm_is_fast(x, weight):
        out = torch._grouped_mm(x, weight, offs=_offsets(counts, x.device))
        return out if add_to is None else add_to.add_(out)
    out = x.new_empty(x.shape[0], weight.shape[-1]) if add_to is None else add_to
    for expert, start, end in _segments(counts):
        if add_to is None:
            torch.mm(x[start:end], weight[expert], out=out[start:end])
        else:
            torch.addmm(out[start:end], x[start:end], weight[expert], out=out[start:end])
    return out


def segment_outer(x: Tensor, y: Tensor, counts: tuple[int, ...]) -> Tensor:
    """``x[rows of e]ᵀ @ y[rows of e]`` per expert (a weight's gradient): [S, a], [S, b] → [E, a, b], zero for
    an expert without rows."""
    if _grouped_mm_is_fast(x, y):
        out = torch._grouped_mm(x.T, y, offs=_offsets(counts, x.device))
        for expert in (e for e, count in enumerate(counts) if not count):
            out[expert].zero_()  # an empty group's sum, not left to the kernel
        return out
    out = x.new_zeros(len(counts), x.shape[1], y.shape[1])
    for expert, start, end in _segments(counts):
        torch.mm(x[start:end].T, y[start:end], out=out[expert])
    return out


class _GroupedMatmul(torch.autograd.Function):
    """``out[s] = x[s] @ weight[e(s)]ᵀ`` for rows sorted by expert (:func:`segment_mm`), and its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, counts: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return segment_mm(x, weight.transpose(1, 2), counts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        with torch.autocast(device_type=grad.device.type, enabled=False):  # a backward run inside autocast
            grad_x = segment_mm(grad, weight, ctx.counts) if ctx.needs_input_grad[0] else None
            grad_w = segment_outer(grad, x, ctx.counts) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def grouped_matmul(x: Tensor, weight: Tensor, order: SlotOrder) -> Tensor:
    """``x`` [S, a] sorted by expert times each row's ``weight[e]ᵀ`` (``weight``: [E, b, a]) → [S, b].

    Under autocast both run in the autocast dtype, as a plain matmul would; the GEMMs themselves run with autocast
    off, since ``torch.mm(out=...)`` cannot change dtype."""
    dtype = matmul_dtype(x, weight)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _GroupedMatmul.apply(x.to(dtype).contiguous(), weight.to(dtype), order.counts)


def _stacked(lora_B: Tensor) -> Tensor:
    """B [E, d_out, r] as the [E·r, d_out] factor of one rank-E·r product (a copy: B's layout does not allow a view)."""
    return lora_B.permute(0, 2, 1).reshape(-1, lora_B.shape[1])


class _StackedUp(torch.autograd.Function):
    """``h @ B_cat`` for ``h`` [N, E·r] and B [E, d_out, r], keeping B for backward and building ``B_cat`` again
    there: autograd would keep the [E·r, d_out] copy of every adapted linear until its backward (at SmolLM2 shapes
    1.2 MiB per decoder layer of the per-linear host, 2 % of LoRA r16's step memory)."""

    @staticmethod
    def forward(ctx, h: Tensor, lora_B: Tensor) -> Tensor:
        ctx.save_for_backward(h, lora_B)
        return h @ _stacked(lora_B)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        h, lora_B = ctx.saved_tensors
        grad_h = grad @ _stacked(lora_B).T if ctx.needs_input_grad[0] else None
        grad_B = None
        if ctx.needs_input_grad[1]:
            grad_B = (h.T @ grad).view(lora_B.shape[0], lora_B.shape[2], -1).transpose(1, 2).contiguous()
        return grad_h, grad_B


def stacked_up(h: Tensor, lora_B: Tensor) -> Tensor:
    """``Σ_e B_e h_e`` for ``h`` [..., E·r] (expert-major) and B [E, d_out, r] → [..., d_out]; under autocast in
    its dtype, as a plain matmul (see :func:`grouped_matmul`)."""
    dtype = matmul_dtype(h, lora_B)
    with torch.autocast(device_type=h.device.type, enabled=False):
        out = _StackedUp.apply(h.reshape(-1, h.shape[-1]).to(dtype), lora_B.to(dtype))
    return out.reshape(*h.shape[:-1], -1)


class LoraExperts(nn.Module):
    """E stacked LoRA experts for one ``d_in → d_out`` linear map."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", dtype: torch.dtype | None = None,
                 device: torch.device | None = None, dropout_sharing: str = "per_module") -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out, self.rank = num_experts, d_in, d_out, rank
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, d_out, rank, **factory))
        # One scale per expert, so loaded LoRAs with their own r and α can share a stack.
        self.register_buffer("scaling", torch.full((num_experts,), lora_scaling(alpha, rank, use_rslora),
                                                   dtype=torch.float32, device=device))
        self.dropout = make_dropout(dropout, dropout_sharing)
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "default") -> None:
        """``default``: A like nn.Linear (kaiming_uniform, a=√5), B = 0; ``gaussian``: A ~ N(0, 1/r), B = 0;
        ``random``: B also random (a non-identity start, used by tests guarding equivalence checks)."""
        with torch.no_grad():
            if init == "gaussian":
                self.lora_A.normal_(0.0, 1.0 / self.rank)
            else:
                bound = 1.0 / math.sqrt(self.d_in)  # what kaiming_uniform_(a=√5) gives for fan_in = d_in
                self.lora_A.uniform_(-bound, bound)
            if init == "random":
                self.lora_B.uniform_(-1.0 / math.sqrt(self.rank), 1.0 / math.sqrt(self.rank))
            else:
                self.lora_B.zero_()

    # -- the fast path --------------------------------------------------------------------------------

    def down(self, x: Tensor) -> Tensor:
        """Every expert's ``A_e · dropout(x)``: [..., d_in] → [..., E, r]."""
        a = self.lora_A.reshape(self.num_experts * self.rank, self.d_in)
        return (self.dropout(x).to(a.dtype) @ a.T).unflatten(-1, (self.num_experts, self.rank))

    def up(self, h: Tensor, lora_B: Tensor | None = None) -> Tensor:
        """``Σ_e s_e B_e h_e``: [..., E, r] → [..., d_out]. Zeroed experts in ``h`` contribute nothing.
        ``lora_B`` ([E, d_out, r]) stands in for the stored B when a method re-parametrises it (FURINA)."""
        h = h * self.scaling.to(h.dtype)[:, None]
        return stacked_up(h.flatten(-2), self.lora_B if lora_B is None else lora_B)

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Σ_e w_e s_e B_e A_e x`` for ``x: [..., d_in]`` and weights ``[..., E]`` (all ones if None)."""
        h = self.down(x)
        if weights is not None:
            h = h * weights.to(h.dtype).unsqueeze(-1)
        return self.up(h)

    # -- the grouped top-k path --------------------------------------------------------------------------

    def slot_down(self, x: Tensor, order: SlotOrder, h: Tensor | None = None) -> Tensor:
        """Each sorted slot's ``A_e dropout(x_t)`` [S, r], picked from the dense down projection of every
        expert (``h`` [T, E, r] when the caller has it already)."""
        h = self.down(x) if h is None else h
        rows = order.tokens * self.num_experts + order.experts  # unique (token, expert) pairs
        return h.reshape(-1, self.rank).index_select(0, rows)

    def scale_slots(self, h: Tensor, order: SlotOrder) -> Tensor:
        """Sorted rows ``h`` [S, r] times their expert's scale ``s_e``."""
        return h * self.scaling.to(h.dtype).index_select(0, order.experts)[:, None]

    def grouped_up(self, h: Tensor, order: SlotOrder) -> Tensor:
        """``s_e B_e h_s`` for sorted rows ``h`` [S, r]: only the selected B."""
        return grouped_matmul(self.scale_slots(h, order), self.lora_B, order)

    def routed(self, x: Tensor, selected: Tensor, slot_weights: Tensor, h: Tensor | None = None) -> Tensor:
        """``Σ_j w_j s_e B_e A_e x`` over each token's k slots (``selected``, ``slot_weights``: [T, k]) for
        ``x`` [T, d_in], computing only the selected experts' B; equals :meth:`forward` with the dense weights."""
        order = slot_order(selected, self.num_experts)
        weights = slot_weights.reshape(-1).index_select(0, order.order)
        h = self.slot_down(x, order, h)
        h = h * weights.to(h.dtype)[:, None]
        return from_sorted(self.grouped_up(h, order), order).sum(dim=1)

    # -- merging and the reference --------------------------------------------------------------------

    def delta_weight(self, weights: Tensor | None = None) -> Tensor:
        """``Σ_e w_e s_e B_e A_e`` as a dense [d_out, d_in] matrix (input-independent weights only)."""
        scale = self.scaling.to(self.lora_B.dtype)
        if weights is not None:
            scale = scale * weights.to(scale.dtype)
        return torch.einsum("e,eor,eri->oi", scale, self.lora_B, self.lora_A)

    def low_rank_factors(self, lora_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The whole stack as one LoRA of rank E·r and scale 1: ``A_cat = [A_1; …; A_E]`` [E·r, d_in] and
        ``B_cat = [s_1 B_1 … s_E B_E]`` [d_out, E·r], so that ``B_cat @ A_cat = Σ_e s_e B_e A_e``
        (methods.md §6.4). ``lora_B`` as in :meth:`up`."""
        b = (self.lora_B if lora_B is None else lora_B) * self.scaling.to(self.lora_B.dtype)[:, None, None]
        return (self.lora_A.reshape(self.num_experts * self.rank, self.d_in),
                b.permute(1, 0, 2).reshape(self.d_out, self.num_experts * self.rank))

    def expert_delta(self, x: Tensor, expert: int) -> Tensor:
        """One expert's ``s_e B_e A_e dropout(x)``, computed on its own."""
        a, b = self.lora_A[expert], self.lora_B[expert]
        return (self.dropout(x).to(a.dtype) @ a.T @ b.T) * self.scaling[expert].to(a.dtype)

    def reference(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """The per-expert loop that :meth:`forward` must equal (outputs and gradients)."""
        out = x.new_zeros(*x.shape[:-1], self.d_out, dtype=self.lora_A.dtype)
        for expert in range(self.num_experts):
            delta = self.expert_delta(x, expert)
            out = out + (delta if weights is None else weights[..., expert, None].to(delta.dtype) * delta)
        return out

    # -- loading experts of other shapes --------------------------------------------------------------

    def load_expert(self, expert: int, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Copy one LoRA (``A: [r_e, d_in]``, ``B: [d_out, r_e]``, ``r_e <= rank``) into slot ``expert``,
        zero-padding its rank; fails naming the shapes when they do not fit."""
        r = lora_A.shape[0]
        if lora_A.shape[1] != self.d_in or lora_B.shape != (self.d_out, r) or r > self.rank:
            raise ValueError(f"LoRA of shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} does not fit an "
                             f"expert slot of d_in={self.d_in}, d_out={self.d_out}, rank<={self.rank}")
        with torch.no_grad():
            self.lora_A[expert].zero_()
            self.lora_B[expert].zero_()
            self.lora_A[expert, :r].copy_(lora_A)
            self.lora_B[expert, :, :r].copy_(lora_B)
            self.scaling[expert] = scaling

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"


# ================================================================================================================
# Trained LoRAs as experts (MoLE methods.md §2.1, LoRA-Mixer §5.1: composing LoRAs that already exist)
# ================================================================================================================
#
# Two folder formats, told apart by their ``adapter_config.json``:
#
# * moelab: a run of method ``lora`` (its run folder, or the run's ``adapter/`` folder) as written by
#   ``moelab.modules.training``; tensors ``<module>.lora.lora_A [1, r, d_in]``, ``.lora_B [1, d_out, r]`` and
#   ``.scaling [1]``, the exact scale the run used;
# * HF PEFT (``peft_type: LORA``): tensors ``base_model.model.<module>.lora_A.weight [r, d_in]`` and
#   ``.lora_B.weight [d_out, r]``; the scale is recomputed as PEFT does, ``α/r`` or ``α/√r`` (rsLoRA), with
#   per-module ``alpha_pattern`` / ``rank_pattern`` entries matched as PEFT matches them.
#
# ``<module>`` is the module's path in the transformers model (``model.layers.0.self_attn.q_proj``) in both.
# Every LoRA keeps its own rank and scale; :func:`stack_trained_loras` zero-pads ranks into one stack. PEFT
# options that change the forward pass (DoRA, LoRA bias, ``fan_in_fan_out``, extra trained modules) are
# refused by name rather than loaded wrongly, and so are the initialisations that rewrite the base weights
# (PiSSA, OLoRA, CorDA, LoftQ subtract the initial LoRA from W0 or quantise it): such a LoRA's update only
# holds on the rewritten base, not on the pristine one the experts are added to, unless PEFT converted it to
# a plain LoRA on saving (``save_pretrained(path_initial_model_for_weight_conversion=...)``, which writes
# ``init_lora_weights: true``).

ADAPTER_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                     "layer_replication", "modules_to_save", "trainable_token_indices", "target_parameters")
_PEFT_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")  # prefixes: "pissa_niter_16" is PiSSA too


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA's update of one linear map: ``ΔW = scaling · lora_B @ lora_A``."""

    lora_A: Tensor  # [r, d_in]
    lora_B: Tensor  # [d_out, r]
    scaling: float


@dataclass(frozen=True)
class TrainedLora:
    """A LoRA read from disk: its weights per module path of the base model."""

    path: Path
    format: str  # "moelab" or "peft"
    modules: dict[str, LoraWeights]


def lora_folder(path: str | Path) -> tuple[Path, str, dict]:
    """``(folder, format, adapter_config)`` of a trained LoRA; fails naming the path when it is not one.

    Cheap (reads the JSON only), so configs call it to fail before any model is loaded."""
    path = Path(path)
    folder = next((f for f in (path, path / "adapter") if (f / ADAPTER_CONFIG_FILE).is_file()), None)
    require(folder is not None, f"expert LoRA {path}: no {ADAPTER_CONFIG_FILE} there or in {path / 'adapter'}")
    require(any((folder / name).is_file() for name in LORA_WEIGHT_FILES),
            f"expert LoRA {folder}: none of {list(LORA_WEIGHT_FILES)} there")
    meta = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    if "peft_type" in meta:
        require(meta["peft_type"] == "LORA", f"expert LoRA {folder}: peft_type {meta['peft_type']!r} is not LORA")
        used = [option for option in _PEFT_UNSUPPORTED if meta.get(option)]
        require(not used, f"expert LoRA {folder}: PEFT option(s) {used} are not supported for experts")
        init = meta.get("init_lora_weights")
        require(not (isinstance(init, str) and init.lower().startswith(_PEFT_BASE_REWRITING_INITS)),
                f"expert LoRA {folder}: PEFT option init_lora_weights={init!r} rewrites the base weights and is not "
                "supported for experts; save it converted to a plain LoRA (path_initial_model_for_weight_conversion)")
        return folder, "peft", meta
    require("method" in meta, f"expert LoRA {folder}: {ADAPTER_CONFIG_FILE} is neither moelab's nor PEFT's")
    require(meta["method"] == "lora",
            f"expert LoRA {folder}: a moelab run of method {meta['method']!r}; only 'lora' runs can be experts")
    return folder, "moelab", meta


def read_trained_lora(path: str | Path) -> TrainedLora:
    """Read a moelab or PEFT LoRA folder (see the section comment) into per-module weights."""
    folder, kind, meta = lora_folder(path)
    tensors = _read_weights(folder)
    modules = _moelab_modules(tensors, folder) if kind == "moelab" else _peft_modules(tensors, meta, folder)
    require(bool(modules), f"expert LoRA {folder}: no LoRA tensors in its weights file")
    return TrainedLora(folder, kind, modules)


def _read_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / LORA_WEIGHT_FILES[0]).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / LORA_WEIGHT_FILES[0]))
    return torch.load(folder / LORA_WEIGHT_FILES[1], map_location="cpu", weights_only=True)


def _moelab_modules(tensors: dict[str, Tensor], folder: Path) -> dict[str, LoraWeights]:
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        module, sep, name = key.rpartition(".lora.")
        require(bool(sep) and name in ("lora_A", "lora_B", "scaling"),
                f"expert LoRA {folder}: unexpected tensor {key!r} in a moelab LoRA")
        parts.setdefault(module, {})[name] = tensor
    modules = {}
    for module, part in parts.items():
        require(len(part) == 3, f"expert LoRA {folder}: {module} lacks one of lora_A, lora_B, scaling")
        modules[module] = LoraWeights(part["lora_A"][0], part["lora_B"][0], float(part["scaling"][0]))
    return modules


def _peft_pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_modules(tensors: dict[str, Tensor], meta: dict, folder: Path) -> dict[str, LoraWeights]:
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(_PEFT_PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        require(match is not None, f"expert LoRA {folder}: unexpected tensor {key!r} in a PEFT LoRA")
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    modules = {}
    for module, part in parts.items():
        require(len(part) == 2, f"expert LoRA {folder}: {module} lacks lora_A or lora_B")
        rank = part["lora_A"].shape[0]
        declared = _peft_pattern(meta.get("rank_pattern"), module, meta["r"])
        require(rank == declared, f"expert LoRA {folder}: {module} has rank {rank}, its config says {declared}")
        alpha = _peft_pattern(meta.get("alpha_pattern"), module, meta["lora_alpha"])
        modules[module] = LoraWeights(part["lora_A"], part["lora_B"],
                                      lora_scaling(alpha, rank, bool(meta.get("use_rslora"))))
    return modules


def stack_trained_loras(loras: list[TrainedLora], module: str, linear: nn.Linear, dropout: float = 0.0,
                        dropout_sharing: str = "per_module") -> LoraExperts:
    """The frozen expert stack of ``module``: slot i holds LoRA i's update there, zero if it has none.

    Ranks are zero-padded to the largest; each slot keeps its LoRA's own scale. A LoRA whose shapes do not
    fit ``linear`` fails naming its folder, a module that no LoRA adapts naming the module."""
    present = {i: lora.modules[module] for i, lora in enumerate(loras) if module in lora.modules}
    require(bool(present), f"no expert LoRA adapts {module!r} (experts.paths: {[str(lora.path) for lora in loras]})")
    rank = max(weights.lora_A.shape[0] for weights in present.values())
    stack = LoraExperts(len(loras), linear.in_features, linear.out_features, rank, alpha=rank, dropout=dropout,
                        dtype=adapter_dtype(linear.weight.dtype), device=linear.weight.device,
                        dropout_sharing=dropout_sharing)
    with torch.no_grad():
        stack.lora_A.zero_()
        stack.scaling.zero_()  # absent experts: no update at all
    for i, weights in present.items():
        try:
            stack.load_expert(i, weights.lora_A, weights.lora_B, weights.scaling)
        except ValueError as error:
            raise AdapterConfigError(f"expert LoRA {loras[i].path}: {module}: {error}") from error
    return stack.requires_grad_(False)
