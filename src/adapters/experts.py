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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter weights follow an fp32/fp64 base and stay fp32 under a bf16/fp16 base (PEFT's
    ``autocast_adapter_dtype``): low-rank updates of small magnitude lose too much in 8 mantissa bits."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale: ``α/r``, or ``α/√r`` with rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraExperts(nn.Module):
    """E stacked LoRA experts for one ``d_in → d_out`` linear map."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out, self.rank = num_experts, d_in, d_out, rank
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, d_out, rank, **factory))
        # One scale per expert, so loaded LoRAs with their own r and α can share a stack.
        self.register_buffer("scaling", torch.full((num_experts,), lora_scaling(alpha, rank, use_rslora),
                                                   dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
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

    def up(self, h: Tensor) -> Tensor:
        """``Σ_e s_e B_e h_e``: [..., E, r] → [..., d_out]. Zeroed experts in ``h`` contribute nothing."""
        h = h * self.scaling.to(h.dtype)[:, None]
        b = self.lora_B.permute(0, 2, 1).reshape(self.num_experts * self.rank, self.d_out)
        return h.flatten(-2) @ b

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """``Σ_e w_e s_e B_e A_e x`` for ``x: [..., d_in]`` and weights ``[..., E]`` (all ones if None)."""
        h = self.down(x)
        if weights is not None:
            h = h * weights.to(h.dtype).unsqueeze(-1)
        return self.up(h)

    # -- merging and the reference --------------------------------------------------------------------

    def delta_weight(self, weights: Tensor | None = None) -> Tensor:
        """``Σ_e w_e s_e B_e A_e`` as a dense [d_out, d_in] matrix (input-independent weights only)."""
        scale = self.scaling.to(self.lora_B.dtype)
        if weights is not None:
            scale = scale * weights.to(scale.dtype)
        return torch.einsum("e,eor,eri->oi", scale, self.lora_B, self.lora_A)

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
