"""MoLE — Mixture of LoRA Experts (Wu, Huang, Wei; ICLR 2024; arXiv 2404.13628), adapted to causal LMs.

Implements methods.md §2.1 point 3 — **an adaptation of ours, not the paper's method as published**: the
paper gates whole fixed-length sequences (Flan-T5, CLIP, Stable Diffusion) with a gate matrix whose size
depends on the sequence length, which has no causal, variable-length counterpart — plus §2.2 (the gating
balancing loss, Eq. 14, as written) and §2.3 (masking experts at inference, as written).

N LoRAs (frozen; trained earlier or in stage ``hard`` of this run, see ``composition.py``) are composed per
adapted projection with frozen deltas ``u_i(x) = s_i B_i A_i dropout(x)``:

    y = W0 x + Σ_i g_i u_i(x)                                    (Eq. 12–13, contributions, §2.1 point 2)
    g = softmax(ε / τ),   ε = Norm(z)ᵀ e,   e ∈ R^{ξ×N},  τ = exp(log τ)              (Eq. 9–11)
    L_balance = −Σ_i log q_i,   q = mean of g over gated sites and masked-in tokens   (Eq. 14)
    aux = balance_coef · L_balance,   balance_coef = α = 0.5                          (§2.2)

Init ``e = 0`` (uniform mixing) and ``τ = 1``; only ``e`` and ``log τ`` train ("gating function only"),
plus the experts themselves in stage ``hard`` when they are trained in the run.

Choices, each with its flag (defaults from methods.md's [R] table):

* ``gate_level`` — ``layer`` (l-MoLE, one gate per decoder layer, default), ``matrix`` (m-MoLE, one per
  projection), ``block`` (one per group of ``gate_block_layers`` consecutive decoder layers: our reading of
  b-MoLE, which the paper ranks between l-MoLE and n-MoLE), ``network`` (n-MoLE, one gate). A gate shared
  by several projections reads the state of the first of them in module order (for attention targets
  ``q_proj``, whose input is the normalised layer input ``input_layernorm(h)``, the state the released V&L
  code's gate reads) and its expert deltas (a loaded LoRA that does not adapt that projection contributes
  zeros to them).
* ``gate_scope`` — ``token`` (default): a gate per token, causal. ``prompt_mean``: one gate per sequence
  from the mean of the gate input over the prompt tokens (``context.prompt_mask``), used for every token
  of the sequence. Without a prompt mask (lm-eval, generation) the prompt is unknown, so token t uses the
  mean over tokens 1..t, which keeps the gate causal: for a continuation scored by lm-eval the gate then
  also sees the continuation's earlier tokens, and with left padding the pad tokens. Rows without any
  prompt token use the same causal mean. Under KV-cached generation each call sees only its new tokens.
* ``gate_input`` — ``expert_deltas`` (default): ``z = u_0(x) ⊕ … ⊕ u_{N−1}(x)`` (Eq. 9, ξ = N·d_out);
  ``hidden``: ``z = x`` (ξ = d_in, as the released V&L code).
* ``gate_norm`` — ``layernorm`` (default; parameter-free, so the gate's only weights remain ``e`` and
  ``τ``) or ``l2`` (the released code's L2 normalisation).
* The balance loss is differentiable; the released code computes it from detached values (no flag).
  ``q`` is averaged over the tokens of the trainer's token mask (non-pad tokens by default) in both scopes,
  so under ``prompt_mean`` longer sequences weigh more.
* ``masked_experts`` (§2.3, inference): in eval mode the listed experts get weight 0 and the others
  ``g'_i = g_i / Σ_{j kept} g_j``; training always mixes all experts. :meth:`Mole.mask_experts` changes the
  set on an injected model, without retraining.

Not mergeable: the gate depends on the input. Every gate site reports ``Routing(probs=g, selected=argmax g)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchContext, register, require
from .composition import SITE_LEVELS, ComposedAdapter, ComposedConfig, composed_layers, site_key
from .experts import LoraExperts
from .routing import Routing, _masked_mean

GATE_SCOPES = ("token", "prompt_mean")
GATE_INPUTS = ("expert_deltas", "hidden")
GATE_NORMS = ("layernorm", "l2")


@dataclass(kw_only=True)
class MoleConfig(ComposedConfig):
    """MoLE's gate and loss flags (methods.md §2.1–§2.3) on top of the shared ``experts`` block."""

    gate_level: str = "layer"
    gate_block_layers: int = 4  # decoder layers per gate when gate_level is "block"
    gate_scope: str = "token"
    gate_input: str = "expert_deltas"
    gate_norm: str = "layernorm"
    balance_coef: float = 0.5  # α of L = L_D + α·L_balance (§4.1–§4.2)
    masked_experts: list[int] = field(default_factory=list)  # dropped at inference, the rest renormalised

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.gate_level in SITE_LEVELS, f"gate_level ({self.gate_level!r}) must be one of {SITE_LEVELS}")
        require(isinstance(self.gate_block_layers, int) and self.gate_block_layers >= 1,
                f"gate_block_layers ({self.gate_block_layers}) must be a positive integer")
        require(self.gate_scope in GATE_SCOPES, f"gate_scope ({self.gate_scope!r}) must be one of {GATE_SCOPES}")
        require(self.gate_input in GATE_INPUTS, f"gate_input ({self.gate_input!r}) must be one of {GATE_INPUTS}")
        require(self.gate_norm in GATE_NORMS, f"gate_norm ({self.gate_norm!r}) must be one of {GATE_NORMS}")
        require(self.balance_coef >= 0, f"balance_coef ({self.balance_coef}) must be >= 0")
        self.masked_experts = self.require_expert_ids("masked_experts", self.masked_experts)
        require(len(self.masked_experts) < self.experts.count,
                f"masked_experts ({self.masked_experts}) must keep at least one of the {self.experts.count} experts")


def expert_deltas(experts: LoraExperts, h: Tensor) -> Tensor:
    """Every expert's own output ``u_e = s_e B_e h_e``: ``h`` [..., E, r] → [..., E, d_out]."""
    scaled = h * experts.scaling.to(h.dtype)[:, None]
    return torch.einsum("...er,eor->...eo", scaled, experts.lora_B.to(h.dtype))


def sequence_gate_input(z: Tensor, prompt_mask: Tensor | None) -> Tensor:
    """``gate_scope=prompt_mean``: each row's mean over its prompt tokens, for all its tokens; the causal
    mean over tokens 1..t where there is no prompt mask (or a row has no prompt token). ``z``: [B, S, ξ]."""
    steps = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)
    causal = z.cumsum(dim=1) / steps[:, None]
    if prompt_mask is None or prompt_mask.shape != z.shape[:2]:
        return causal
    mask = prompt_mask.to(z.device, z.dtype).unsqueeze(-1)
    count = mask.sum(dim=1, keepdim=True)
    prompt = (z * mask).sum(dim=1, keepdim=True) / count.clamp_min(1.0)
    return torch.where(count > 0, prompt.expand_as(z), causal)


def renormalise_kept(gates: Tensor, kept: Tensor) -> Tensor:
    """§2.3: masked experts get 0, the kept ones ``g_i / Σ_{j kept} g_j``."""
    gates = gates * kept.to(gates.dtype)
    return gates / gates.sum(dim=-1, keepdim=True)


def balance_loss(gates: list[tuple[Tensor, Tensor | None]]) -> Tensor:
    """Eq. 14, ``−Σ_i log q_i``: ``q`` is each site's mean gate over its unmasked tokens, averaged over the
    sites. ``gates``: one ``(g [T, N], token mask [T] or None)`` per gated site."""
    q = torch.stack([_masked_mean(g, mask) for g, mask in gates]).mean(dim=0)
    return -q.log().sum()


class MoleGate(nn.Module):
    """One gate site: ``g = softmax(Norm(z)ᵀ e / τ)`` in fp32 (at least), ``e = 0`` and ``τ = 1`` at init."""

    def __init__(self, in_features: int, num_experts: int, config: MoleConfig) -> None:
        super().__init__()
        self.e = nn.Parameter(torch.zeros(in_features, num_experts, dtype=torch.float32))
        self.log_tau = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.scope, self.input, self.norm = config.gate_scope, config.gate_input, config.gate_norm
        self.register_buffer("kept", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.masking = False

    def forward(self, x: Tensor, h: Tensor, experts: LoraExperts, context: BatchContext) -> tuple[Tensor, Routing]:
        dtype = torch.promote_types(self.e.dtype, torch.float32)
        z = (expert_deltas(experts, h).flatten(-2) if self.input == "expert_deltas" else x).to(dtype)
        if self.scope == "prompt_mean":
            require(z.dim() == 3, "gate_scope 'prompt_mean' needs inputs shaped [batch, seq, features]")
            z = sequence_gate_input(z, context.prompt_mask)
        z = F.layer_norm(z, z.shape[-1:]) if self.norm == "layernorm" else F.normalize(z, dim=-1)
        logits = (z @ self.e.to(dtype)) / self.log_tau.to(dtype).exp()
        gates = logits.softmax(dim=-1)
        if self.masking and not self.training:
            gates = renormalise_kept(gates, self.kept)
        flat = gates.reshape(-1, gates.shape[-1])
        return gates, Routing(flat, flat.argmax(dim=-1, keepdim=True), logits.reshape(flat.shape))


@register
class Mole(ComposedAdapter):
    name = "mole"
    config_class = MoleConfig
    merge_refusal = "its gates mix the LoRA experts with input-dependent weights"
    config: MoleConfig

    def site_of(self, module: str) -> str:
        return site_key(module, self.config.gate_level, self.config.gate_block_layers)

    def make_site(self, linear: nn.Linear, experts: LoraExperts) -> MoleGate:
        features = (experts.num_experts * linear.out_features if self.config.gate_input == "expert_deltas"
                    else linear.in_features)
        return MoleGate(features, experts.num_experts, self.config)

    def inject(self, model: nn.Module) -> None:
        super().inject(model)
        self.mask_experts(model, self.config.masked_experts)

    def mask_experts(self, model: nn.Module, experts: list[int]) -> None:
        """Drop ``experts`` at inference from now on (§2.3); an empty list restores all of them."""
        masked = self.config.require_expert_ids("masked_experts", experts)
        require(len(masked) < self.config.experts.count, f"masked_experts ({masked}) must keep at least one expert")
        self.config.masked_experts = masked
        for _, layer in composed_layers(model):
            if layer.is_leader:
                layer.site.kept.fill_(True)
                layer.site.kept[masked] = False
                layer.site.masking = bool(masked)

    def aux_losses(self, model: nn.Module) -> dict[str, Tensor]:
        gates = [(routing.probs, mask) for routing, mask in self.soft_routing(model)]
        return {"balance": self.config.balance_coef * balance_loss(gates)} if gates else {}
