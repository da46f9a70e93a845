"""FURINA (Han et al., arXiv 2509.14900): a router-free mixture of LoRA experts — implements methods.md §6.1–§6.5.

Per adapted linear ``W0`` (``d_out × d_in``), N LoRA experts of rank r share one stack (experts.py):
the first ``N_SE`` are *shared* experts (plain LoRA, always on), the other ``N_sr = N − N_SE`` are
*self-routing* experts whose direction and magnitude are decoupled (§6.1):

    W_j = B_j A_j,    d_j = ‖W_j[k, :]‖₂ per output row k,    Ŵ_j = diag(d_j + ε)⁻¹ W_j
    y   = W0 x + Σ_{i shared} s B_i A_i x + Σ_{j self-routing} diag(v) Ŵ_j x,      s = α / r

with one learnable magnitude vector ``v ∈ R^{d_out}`` shared by the layer's self-routing experts. Because
``v``, ``d_j`` and ``ε`` depend on weights only, the whole update is one linear map (§6.4):
``B̃_j = diag(v ⊘ (d_j + ε)) B_j``, ``B̃_i = s B_i``, and ``ΔW = [B̃_1 … B̃_N] [A_1; …; A_N]``, a rank-N·r LoRA.
The forward pass uses exactly that form, and merging adds the same ``ΔW``, so merged and unmerged models
agree to rounding. Per step it computes ``d_j`` once (for ``B̃`` and the selection loss), one normalisation
factor ``v ⊘ (d_j + ε)`` [N_sr, d_out], folds it and the shared experts' ``α/r`` into the weight-side
factor, and adds ``h @ [s B̃_1 … s B̃_N]ᵀ`` to the base output in one ``addmm`` (no loop over experts and no
activation-sized scaling or sum). What a training step keeps for backward is the parameters, ``h`` and the
[N_sr, d_out] factors: the folded factor, ``B̃_j`` of the selection loss and ``B_j G_j`` of the row norms, each
as large as the experts' B, are formed again in backward (:class:`_ScaledUpdate`, :func:`recomputed`) rather
than held through the step in every adapted linear.

``d_j`` is computed without forming ``B_j A_j`` (§6.5): with ``G_j = A_j A_jᵀ`` (r × r),
``d_j² = rowsum((B_j G_j) ⊙ B_j)``.

Expert selection loss (§6.3, the concrete version), per layer and over the non-pad tokens of the batch:

    a_j(x) = ‖v ⊙ Ŵ_j x‖₂          (``loss_activation=unscaled``: ‖Ŵ_j x‖₂)
    q      = a / (Σ_j a_j + 1e-9),   top = TopK(q, K)
    L_div  = 1 − mean_t Σ_{j ∈ top(t)} q_tj,    L_bal = N_sr Σ_j F_j P_j,
    F_j    = mean_t 1[j ∈ top(t)] / K,           P_j = mean_t q_tj
    aux    = α (L_div + L_bal)       (reported as ``selection_div`` and ``selection_bal``; the trainer
                                      averages each over layers)

The activations are computed cheaply and exactly as ``a_j² = h_jᵀ (B̂_jᵀ B̂_j) h_j`` with ``B̂_j`` the
row-scaled ``B_j`` (r × r Gram matrices instead of a [tokens, N_sr, d_out] tensor) and ``h_j = A_j dropout(x)``,
the forward's own down projection: in training the activations see the same dropout mask as the output, so
with ``lora_dropout > 0`` they are ``‖v ⊙ Ŵ_j dropout(x)‖₂`` (the paper does not say which; reusing ``h`` costs
no second pass over x, and eval has no dropout). ``unscaled`` reuses the forward's ``d_j`` as well. They
feed the loss and the routing statistics only and never the output. They are computed in training, and in
eval mode only when the trainer has set a token mask for these tokens (dev routing statistics);
a plain eval forward (lm-eval, latency) costs the adapter matmuls and nothing more. Every such forward
exposes ``Routing(probs=q, selected=top)``, so FURINA shares the metrics and activation-map path of the
routed methods; for that record the mass ``1 − Σ_j q_j`` withheld by the 1e-9 guard (all of it while
``v = 0``) is spread uniformly, so that rows sum to 1. The loss uses ``q`` exactly as written above.

Choices the paper does not report ([R], each a config field, methods.md "[R] flags at a glance"):

* ``magnitude_norm``: ``l2_row`` (default, ``d_j[k] = ‖W_j[k, :]‖₂``, DoRA-style) or ``row_sum`` (``d_j = W_j·1``
  as the summaries quote the formula; it can be negative or near −ε, an ablation only).
* ``eps`` = 1e-6; ``d_j`` and ``v ⊘ (d_j + ε)`` are computed in at least fp32, whatever the model dtype.
* ``detach_norm`` = false: gradients flow through ``d_j`` (true: DoRA-style, ``d_j`` treated as a constant).
* ``loss_activation`` = ``scaled`` (``‖v ⊙ Ŵ_j x‖₂``) or ``unscaled``.
* Init (§6.5): every ``A`` as ``nn.Linear`` does (Kaiming uniform, a = √5, PEFT's default), shared ``B = 0``
  (PEFT), self-routing ``B_j ~ N(0, self_routing_init_std = 1e-3)`` and ``v = 0``. ``v = 0`` makes the model
  equal the base at step 0, and a non-zero ``B_j`` makes ``Ŵ_j x ≠ 0``, so ``v`` receives a gradient on the
  first step and, once ``v ≠ 0``, so do the self-routing ``A_j, B_j``. (PEFT's ``B = 0`` for them would give
  ``Ŵ_j = 0/ε`` and a 1/ε-amplified first update.) ``init_lora_weights`` applies to every ``A`` and to the
  shared ``B`` only.
* Defaults follow the paper's "MixLoRA settings" (§6.6): N = 8, N_SE = 1, r = 16, K = 2, α = 0.01; the
  shared expert's ``lora_alpha`` = 32 and ``lora_dropout`` = 0.05 are MixLoRA's expert values. Targets: all
  seven LLaMA projections. Dropout acts on the input of every ``A`` (one mask for all experts).

Deviations: none in the forward pass or the merge identity. The selection-loss reductions and the init are
ours (the paper does not define them), hence the flags above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import LLAMA_PROJECTIONS, Adapter, AdapterLayer, register, require
from .experts import adapter_dtype, matmul_dtype
from .lora import LoraConfig
from .routing import Routing, balance_loss_terms, full_precision, masked_mean

MAGNITUDE_NORMS = ("l2_row", "row_sum")
LOSS_ACTIVATIONS = ("scaled", "unscaled")
SHARE_GUARD = 1e-9  # q = a / (Σa + 1e-9), methods.md §6.3


@dataclass(kw_only=True)
class FurinaConfig(LoraConfig):
    """``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights`` as in LoRA (the shared
    experts' scale is ``α/r``); the FURINA fields below."""

    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    aux_loss_coef: float = 0.01
    magnitude_norm: str = "l2_row"
    eps: float = 1e-6
    detach_norm: bool = False
    loss_activation: str = "scaled"
    self_routing_init_std: float = 1e-3

    @property
    def num_self_routing(self) -> int:
        return self.num_experts - self.num_shared_experts

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.num_experts, int) and self.num_experts >= 1,
                f"num_experts ({self.num_experts}) must be a positive integer")
        require(isinstance(self.num_shared_experts, int) and 0 <= self.num_shared_experts <= self.num_experts,
                f"num_shared_experts ({self.num_shared_experts}) must be between 0 and num_experts "
                f"({self.num_experts})")
        require(isinstance(self.top_k, int) and self.top_k >= 1, f"top_k ({self.top_k}) must be a positive integer")
        require(self.num_self_routing == 0 or self.top_k <= self.num_self_routing,
                f"top_k ({self.top_k}) must be <= the number of self-routing experts "
                f"(num_experts − num_shared_experts = {self.num_self_routing})")
        require(self.aux_loss_coef >= 0, f"aux_loss_coef ({self.aux_loss_coef}) must be >= 0")
        require(self.magnitude_norm in MAGNITUDE_NORMS,
                f"magnitude_norm ({self.magnitude_norm!r}) must be one of {MAGNITUDE_NORMS}")
        require(self.eps > 0, f"eps ({self.eps}) must be positive")
        require(self.loss_activation in LOSS_ACTIVATIONS,
                f"loss_activation ({self.loss_activation!r}) must be one of {LOSS_ACTIVATIONS}")
        require(self.self_routing_init_std > 0,
                f"self_routing_init_std ({self.self_routing_init_std}) must be positive")


def safe_sqrt(z: Tensor) -> Tensor:
    """``√max(z, 0)`` whose gradient is 0 where ``z ≤ 0`` (the norm of a zero vector), not ``∞ · 0 = NaN``."""
    positive = z > 0
    return torch.where(positive, torch.where(positive, z, 1.0).sqrt(), 0.0)


def recomputed(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors)``, its intermediates recomputed in backward (a checkpoint) instead of kept: for the
    weight-side products below, as large as the experts' B, which a step would otherwise hold from forward to
    backward in every layer, while redoing them costs a few elementwise passes over weights."""
    if not torch.is_grad_enabled():
        return fn(*tensors)
    return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=False)


def _l2_row_norms(a: Tensor, b: Tensor) -> Tensor:
    return safe_sqrt(((b @ (a @ a.mT)) * b).sum(-1))


def _output_norms(h: Tensor, b: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    b = (b if scale is None else b * scale[..., None]).to(dtype)
    h = h.flatten(0, -3).to(dtype)
    return safe_sqrt(torch.einsum("tjr,jrs,tjs->tj", h, b.mT @ b, h))


def output_norms(h: Tensor, b: Tensor, scale: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``‖b_j h_j‖₂`` [T, J] for ``h: [..., J, r]``, ``b: [J, d_out, r]`` (its rows scaled by ``scale`` [J, d_out]
    when given), through the r × r Gram matrices ``b_jᵀ b_j``, in ``dtype`` (default: h's). Everything it forms
    (scaled b, the tokens' h in one block and in ``dtype``, h times the Gram matrices) is recomputed in backward:
    kept, each would be the size of the experts' B or of h once more."""
    return recomputed(_output_norms, h, b, scale, dtype or h.dtype)


def selection_loss(activations: Tensor, top_k: int, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """methods.md §6.3 for activations ``a: [T, N_sr]``: returns ``(q, top, L_div, L_bal)``."""
    shares = activations / (activations.sum(-1, keepdim=True) + SHARE_GUARD)
    top = shares.topk(top_k, dim=-1).indices
    divergence = 1.0 - masked_mean(shares.gather(-1, top).sum(-1), mask)
    slot_load, importance = balance_loss_terms(shares, top, mask)  # F per top-k slot [K, N_sr], P [N_sr]
    balance = shares.shape[-1] * (slot_load.sum(0) / top_k * importance).sum()
    return shares, top, divergence, balance


def _fold(lora_B: Tensor, factor: Tensor, scaling: Tensor) -> Tensor:
    """The update's right factor [d_out, N·r], as ``experts.low_rank_factors(effective_B())`` computes it: B_j's
    rows times ``factor`` [N, d_out] (in its dtype, then rounded to B's), then times the stack's scale ``s_j``."""
    n, d_out, r = lora_B.shape
    b = (lora_B.to(factor.dtype) * factor[..., None]).to(lora_B.dtype) * scaling.to(lora_B.dtype)[:, None, None]
    return b.permute(1, 0, 2).reshape(d_out, n * r)


class _ScaledUpdate(torch.autograd.Function):
    """``result + h @ _fold(lora_B, factor, scaling)ᵀ`` (``result`` [T, d_out], ``h`` [T, N·r]) as one ``addmm``,
    the same values as :meth:`FurinaLinear._add_update`, but keeping ``lora_B`` (a parameter) and ``factor`` for
    backward instead of the folded factor: that is as large as the experts' B, held from forward to backward in
    every adapted linear, while folding again in backward is an elementwise pass over weights."""

    @staticmethod
    def forward(ctx, result: Tensor, h: Tensor, lora_B: Tensor, factor: Tensor, scaling: Tensor) -> Tensor:
        folded = _fold(lora_B, factor, scaling)
        ctx.save_for_backward(h, lora_B, factor, scaling)
        ctx.matmul_dtype, ctx.result_dtype = matmul_dtype(h, folded), result.dtype
        return torch.addmm(result.to(folded.dtype), h.to(folded.dtype), folded.T)  # under autocast as it stands

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, None]:
        h, lora_B, factor, scaling = ctx.saved_tensors
        dtype = ctx.matmul_dtype
        grad_h = grad_B = grad_factor = None
        with torch.autocast(device_type=grad.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                grad_h = (grad.to(dtype) @ _fold(lora_B, factor, scaling).to(dtype)).to(h.dtype)
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
                n, d_out, r = lora_B.shape
                folded_grad = (grad.to(dtype).T @ h.to(dtype)).to(lora_B.dtype).view(d_out, n, r).permute(1, 0, 2)
                # back through _fold: the stack's scale, the rounding to B's dtype, the row factor
                rows_grad = (folded_grad * scaling.to(lora_B.dtype)[:, None, None]).to(factor.dtype)
                if ctx.needs_input_grad[2]:
                    grad_B = (rows_grad * factor[..., None]).to(lora_B.dtype)
                if ctx.needs_input_grad[3]:
                    grad_factor = (rows_grad * lora_B.to(factor.dtype)).sum(-1)
        return grad.to(ctx.result_dtype), grad_h, grad_B, grad_factor, None


def _forget_inference_B_on_load(module: FurinaLinear, *args) -> None:
    """``load_state_dict`` pre-hook (a module-level function, so that the layer still pickles)."""
    module.forget_inference_B()


class FurinaLinear(AdapterLayer):
    """``nn.Linear`` plus N_SE shared LoRA experts and N_sr self-routing experts with a shared magnitude ``v``."""

    def __init__(self, base_layer: nn.Linear, config: FurinaConfig) -> None:
        super().__init__(base_layer)
        self.config = config
        self.num_shared = config.num_shared_experts
        self.num_self_routing = config.num_self_routing
        self.experts = config.make_experts(base_layer, config.num_experts)
        self.losses: dict[str, Tensor] = {}
        self._inference_cache: tuple[tuple, Tensor] | None = None
        self.register_load_state_dict_pre_hook(_forget_inference_B_on_load)
        if self.num_self_routing:
            self.magnitude = nn.Parameter(torch.zeros(base_layer.out_features, dtype=self.experts.lora_B.dtype,
                                                      device=self.experts.lora_B.device))
            with torch.no_grad():
                self.experts.lora_B[self.num_shared:].normal_(0.0, config.self_routing_init_std)
                self.experts.scaling[self.num_shared:] = 1.0  # only v sets their size; α/r has no effect

    # -- the normalised experts (§6.1, §6.5) ------------------------------------------------------------

    def row_norms(self) -> Tensor:
        """``d_j`` [N_sr, d_out] of every self-routing ``W_j = B_j A_j``, never forming ``W_j``."""
        dtype = adapter_dtype(self.experts.lora_B.dtype)
        a = self.experts.lora_A[self.num_shared:].to(dtype)
        b = self.experts.lora_B[self.num_shared:].to(dtype)
        with full_precision(b):  # bf16 autocast would round the norms that every expert is divided by
            if self.config.magnitude_norm == "l2_row":
                norms = recomputed(_l2_row_norms, a, b)
            else:
                norms = (b @ a.sum(-1, keepdim=True)).squeeze(-1)  # W_j · 1 = B_j (A_j 1)
        return norms.detach() if self.config.detach_norm else norms

    def magnitude_factor(self, norms: Tensor | None = None) -> Tensor:
        """``v ⊘ (d_j + ε)`` [N_sr, d_out], in at least fp32: the row scale of every self-routing B in the update.
        ``norms``: the :meth:`row_norms` of this step when the caller has them already."""
        norms = self.row_norms() if norms is None else norms
        return self.magnitude.to(adapter_dtype(self.magnitude.dtype)) / (norms + self.config.eps)

    def effective_B(self, norms: Tensor | None = None) -> Tensor:
        """``[B_1 … B_N]`` with ``B̃_j = diag(v ⊘ (d_j + ε)) B_j`` for the self-routing experts (§6.4);
        the stack's scale (``α/r`` for shared experts, 1 otherwise) applies on top. The normalisation is one
        ``[N_sr, d_out]`` factor (:meth:`magnitude_factor`) applied to B once (not a division and then a product
        over the whole ``[N_sr, d_out, r]``); ``norms`` as there."""
        shared = self.experts.lora_B[:self.num_shared]
        if not self.num_self_routing:
            return shared
        factor = self.magnitude_factor(norms)
        routed = self.experts.lora_B[self.num_shared:].to(factor.dtype) * factor[..., None]
        return torch.cat([shared, routed.to(shared.dtype)])

    # -- the inference cache -----------------------------------------------------------------------------

    def inference_B(self) -> Tensor:
        """:meth:`effective_B`, cached for forwards without autograd in eval mode (lm-eval, generation),
        where the normalisation is weight-side work that would otherwise be redone for every token.

        The cache is dropped whenever the weights may have changed behind autograd's back: on
        ``train()``/``eval()``, on ``.to()``/``.cuda()``/dtype casts (``_apply``) and on ``load_state_dict``
        (which :func:`~moelab.adapters.base.load_adapter_state_dict` goes through). Within one eval phase
        the tensors' version counters, storage, dtype and device must also match, which catches in-place
        updates such as an optimiser step. What none of these sees is a write through ``.data`` (FSDP's
        storage swaps, ``p.data.mul_()``) with no mode switch in between: call :meth:`forget_inference_B`
        after one. Inference-mode tensors keep no version counter, so for them nothing is cached."""
        key = self._weights_key()
        if key is None:
            return self.effective_B()
        cached = self._inference_cache
        if cached is None or cached[0] != key:
            cached = self._inference_cache = (key, self.effective_B())
        return cached[1]

    def forget_inference_B(self) -> None:
        """Drop the cached :meth:`inference_B`; the next plain eval forward computes it afresh."""
        self._inference_cache = None

    def _weights_key(self) -> tuple | None:
        tensors = (self.experts.lora_A, self.experts.lora_B, self.experts.scaling,
                   *([self.magnitude] if self.num_self_routing else []))
        try:
            return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None

    def train(self, mode: bool = True) -> FurinaLinear:
        self.forget_inference_B()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.forget_inference_B()  # the cached tensor is a plain attribute: .to() would leave it behind
        return super()._apply(fn, recurse)

    # -- forward -------------------------------------------------------------------------------------------

    def adapted_forward(self, x: Tensor) -> Tensor:
        h = self.experts.down(x)  # [..., N, r]: every expert's A_j x
        result = self.base_layer(x)
        self.routing, self.losses = None, {}
        routed_h = h[..., self.num_shared:, :]
        if not (self.training or torch.is_grad_enabled()):  # inference: the cached B̃, no autograd to feed
            b = self.inference_B()
            if self.num_self_routing:
                self._observe_selection(routed_h, *self._selection_rows(b[self.num_shared:], None, None))
            return self._add_update(result, h, b)
        # training: B and its row factors, never a B̃ kept for backward (:class:`_ScaledUpdate`); d_j once per step
        norms = self.row_norms() if self.num_self_routing else None
        factor = self.magnitude_factor(norms) if self.num_self_routing else None
        flat = result.reshape(-1, result.shape[-1])
        out = _ScaledUpdate.apply(flat, h.reshape(flat.shape[0], -1), self.experts.lora_B, self._row_factors(factor),
                                  self.experts.scaling)
        if self.num_self_routing:
            self._observe_selection(routed_h, *self._selection_rows(self.experts.lora_B[self.num_shared:], norms,
                                                                    factor))
        return out.to(result.dtype).reshape(result.shape)

    def _row_factors(self, factor: Tensor | None) -> Tensor:
        """The row factor of every expert's B [N, d_out]: 1 for a shared expert, :meth:`magnitude_factor` for a
        self-routing one."""
        dtype = adapter_dtype(self.experts.lora_B.dtype) if factor is None else factor.dtype
        ones = torch.ones(self.num_shared, self.experts.d_out, dtype=dtype, device=self.experts.lora_B.device)
        return ones if factor is None else torch.cat([ones, factor])

    def _add_update(self, result: Tensor, h: Tensor, b: Tensor) -> Tensor:
        """``result + [s B̃_1 … s B̃_N] h`` as one ``addmm``: the scales are folded into the (weight-side) factor,
        so no activation-sized product or sum is formed. The adapter's fp32 output is added before the single
        cast to the base dtype, as PEFT does."""
        _, folded = self.experts.low_rank_factors(b)  # [d_out, N·r]
        flat = result.reshape(-1, result.shape[-1])
        out = torch.addmm(flat.to(folded.dtype), h.reshape(flat.shape[0], -1).to(folded.dtype), folded.T)
        return out.to(result.dtype).reshape(result.shape)

    def _selection_rows(self, b: Tensor, norms: Tensor | None, factor: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The self-routing B rows the selection loss measures, and their row scale (None: ``b`` is scaled
        already): ``v ⊙ Ŵ_j`` (``scaled``: the update's ``B̃_j``) or ``Ŵ_j`` (``unscaled``). ``b``: B̃ (inference)
        or the plain B; ``norms``, ``factor``: this forward's, when it computed them."""
        if self.config.loss_activation == "scaled":
            return b, factor
        b = self.experts.lora_B[self.num_shared:]
        norms = self.row_norms() if norms is None else norms
        return b, 1.0 / (norms + self.config.eps)

    def _observe_selection(self, h: Tensor, b: Tensor, scale: Tensor | None) -> None:
        """Selection loss and routing record from the self-routing experts' ``h_j = A_j x`` [..., N_sr, r];
        skipped in a plain eval forward. ``b``, ``scale``: :meth:`_selection_rows`."""
        mask = self.context.flat_token_mask(h.shape[:-2].numel())
        if not (self.training or mask is not None):
            return
        dtype = adapter_dtype(h.dtype)  # the loss in at least fp32, like every router, autocast or not
        with full_precision(h):
            activations = output_norms(h, b, None if scale is None else scale.to(dtype), dtype)
            shares, top, divergence, balance = selection_loss(activations, self.config.top_k, mask)
        coef = self.config.aux_loss_coef
        self.losses = {"selection_div": coef * divergence, "selection_bal": coef * balance}
        completed = shares + (1.0 - shares.sum(-1, keepdim=True)) / shares.shape[-1]
        self.routing = Routing(probs=completed.float(), selected=top)

    def aux_losses(self) -> dict[str, Tensor]:
        return self.losses if self.routing is not None else {}

    # -- merging (§6.4) ------------------------------------------------------------------------------------

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        return self.experts.low_rank_factors(self.effective_B())

    def get_delta_weight(self) -> Tensor:
        lora_A, lora_B = self.low_rank_factors()
        return lora_B @ lora_A


@register
class Furina(Adapter):
    name = "furina"
    config_class = FurinaConfig
    routing_meaning = ("FURINA has no router: its \"routing\" is the share of each self-routing expert in the "
                       "sum of the experts' output norms ‖v ⊙ Ŵ_j x‖ (its shared experts are not counted), with "
                       "the top-k of those shares as the selected experts; it enters the expert-selection loss "
                       "only, never the output.")
    placement = "linear"
    mergeable = True
    fidelity = "paper-equations"

    def make_layer(self, name: str, module: nn.Module) -> FurinaLinear:
        return FurinaLinear(module, self.config)
