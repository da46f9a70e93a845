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
  prompt token use the same causal mean. KV-cached decoding continues each row's pool: in eval mode every
  gate keeps what it pooled (sum, count), and a forward that passes a non-empty cache (``cache`` /
  ``past_key_values``, seen by a forward pre-hook on the model) adds its new tokens to it. So without a
  prompt mask ``generate()`` gates every generated token as a forward over the whole sequence does, cache
  or no cache; a row whose prompt mask closed its pool in the first forward keeps its prompt gate for all
  generated tokens (§2.1's reuse; only a cached decode can do that, a full forward has no mask of the
  grown length). The check is on the cache's length and row count: a continuation that does not match
  what the gates pooled (a cropped cache, a batch of another size) fails; beam search, which reorders the
  cache's rows between steps, goes undetected and would mix the beams' pools: decode greedily (lm-eval's
  default) or by sampling with ``prompt_mean``.
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

Compute flags (composition.py): ``expert_compute`` matters only in stage ``hard``, where each token uses its
task's expert alone (``grouped`` computes that expert's B only); the gate always mixes every expert.
``lora_dropout_sharing: per_input`` lets q, k and v draw one dropout mask.

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
from .routing import Routing, full_precision, masked_mean

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


@dataclass
class GatePool:
    """What a ``prompt_mean`` gate has pooled of the sequences so far, per row: the sum and the count of the
    pooled gate inputs, whether later tokens join the pool (1: causal rows; 0: rows whose prompt closed it),
    and how many tokens the rows have had (the KV-cache length that a continuing forward must start at)."""

    total: Tensor  # [B, 1, ξ]
    count: Tensor  # [B, 1, 1]
    grows: Tensor  # [B, 1, 1]
    tokens: int


def start_pool(z: Tensor, prompt_mask: Tensor | None) -> GatePool:
    """The pool of new sequences ``z`` [B, S, ξ]: a row with prompt tokens under ``prompt_mask`` holds its
    prompt's sum, closed; rows without (no mask, as in lm-eval) start empty and grow causally. The mask comes
    from the data module's tokenisation, so it marks the prompt whether or not the loss covers it."""
    total, count = z.new_zeros(z.shape[0], 1, z.shape[-1]), z.new_zeros(z.shape[0], 1, 1)
    grows = z.new_ones(z.shape[0], 1, 1)
    if prompt_mask is not None:
        if prompt_mask.shape != z.shape[:2]:
            raise RuntimeError(f"gate_scope 'prompt_mean': the prompt mask is {tuple(prompt_mask.shape)}, the gate "
                               f"input {tuple(z.shape[:2])}: set_context was given another batch")
        mask = prompt_mask.to(z.device, z.dtype).unsqueeze(-1)
        prompt_count = mask.sum(dim=1, keepdim=True)
        has_prompt = prompt_count > 0
        total = torch.where(has_prompt, (z * mask).sum(dim=1, keepdim=True), total)
        count = torch.where(has_prompt, prompt_count, count)
        grows = (~has_prompt).to(z.dtype)
    return GatePool(total, count, grows, 0)


def sequence_gate_input(z: Tensor, pool: GatePool) -> tuple[Tensor, GatePool]:
    """``gate_scope=prompt_mean``: every token's gate input is the mean of its row's pool, which a growing
    row's tokens join first (token t: the mean over tokens 1..t); and the pool after these tokens."""
    total = pool.total + (z * pool.grows).cumsum(dim=1)
    count = pool.count + pool.grows.expand(-1, z.shape[1], -1).cumsum(dim=1)
    return total / count, GatePool(total[:, -1:], count[:, -1:], pool.grows, pool.tokens + z.shape[1])


@dataclass
class DecodingState:
    """Shared by the gates of one model: how many tokens the KV cache of the running forward already holds
    (set around every forward of the model by :meth:`Mole.inject`'s hooks; 0 outside a forward)."""

    past_tokens: int = 0


def cached_tokens(kwargs: dict) -> int:
    """Length of the KV cache passed to a transformers forward (``cache`` since transformers 5,
    ``past_key_values`` before), 0 without one. A Python int: no host synchronisation."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


def renormalise_kept(gates: Tensor, kept: Tensor) -> Tensor:
    """§2.3: masked experts get 0, the kept ones ``g_i / Σ_{j kept} g_j``."""
    gates = gates * kept.to(gates.dtype)
    return gates / gates.sum(dim=-1, keepdim=True)


def balance_loss(gates: list[tuple[Tensor, Tensor | None]]) -> Tensor:
    """Eq. 14, ``−Σ_i log q_i``: ``q`` is each site's mean gate over its unmasked tokens, averaged over the
    sites. ``gates``: one ``(g [T, N], token mask [T] or None)`` per gated site."""
    q = torch.stack([masked_mean(g, mask) for g, mask in gates]).mean(dim=0)
    return -q.log().sum()


class MoleGate(nn.Module):
    """One gate site: ``g = softmax(Norm(z)ᵀ e / τ)`` in fp32 (at least), ``e = 0`` and ``τ = 1`` at init."""

    sparse = False  # the gate mixes every expert (composition.ComposedLinear reads this)

    def __init__(self, in_features: int, num_experts: int, config: MoleConfig,
                 decoding: DecodingState | None = None) -> None:
        super().__init__()
        self.e = nn.Parameter(torch.zeros(in_features, num_experts, dtype=torch.float32))
        self.log_tau = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.scope, self.input, self.norm = config.gate_scope, config.gate_input, config.gate_norm
        self.register_buffer("kept", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.masking = False
        self.decoding = decoding if decoding is not None else DecodingState()
        self.pool: GatePool | None = None  # eval mode, prompt_mean: what the last forward left for a continuation

    def forward(self, x: Tensor, h: Tensor, experts: LoraExperts, context: BatchContext) -> tuple[Tensor, Routing]:
        dtype = torch.promote_types(self.e.dtype, torch.float32)
        with full_precision(x):  # the gate in fp32 under bf16 autocast too, like every router
            z = (expert_deltas(experts, h.to(dtype)).flatten(-2) if self.input == "expert_deltas" else x).to(dtype)
            if self.scope == "prompt_mean":
                require(z.dim() == 3, "gate_scope 'prompt_mean' needs inputs shaped [batch, seq, features]")
                z = self._pooled(z, context.prompt_mask)
            z = F.layer_norm(z, z.shape[-1:]) if self.norm == "layernorm" else F.normalize(z, dim=-1)
            logits = (z @ self.e.to(dtype)) / self.log_tau.to(dtype).exp()
            gates = logits.softmax(dim=-1)
        if self.masking and not self.training:
            gates = renormalise_kept(gates, self.kept)
        flat = gates.reshape(-1, gates.shape[-1])
        return gates, Routing(flat, flat.argmax(dim=-1, keepdim=True), logits.reshape(flat.shape))

    def _pooled(self, z: Tensor, prompt_mask: Tensor | None) -> Tensor:
        """The gate inputs of ``z`` [B, S, ξ]. A forward that continues a KV cache continues the pool that the
        eval-mode forwards filling the cache left, instead of pooling its few new tokens alone."""
        past = self.decoding.past_tokens
        if past == 0:
            pool = start_pool(z, prompt_mask)
        else:
            pool = self.pool
            if pool is None or pool.tokens != past or pool.total.shape[0] != z.shape[0]:
                seen = "nothing" if pool is None else f"{pool.tokens} tokens of {pool.total.shape[0]} rows"
                raise RuntimeError(f"gate_scope 'prompt_mean': a forward continues a KV cache of {past} tokens "
                                   f"({z.shape[0]} rows), but the gate pooled {seen} in eval mode before it; "
                                   "cached decoding must extend the preceding eval-mode forward")
        z, pool = sequence_gate_input(z, pool)
        self.pool = None if self.training else GatePool(pool.total.detach(), pool.count.detach(), pool.grows,
                                                        pool.tokens)
        return z


@register
class Mole(ComposedAdapter):
    name = "mole"
    config_class = MoleConfig
    routing_meaning = ("MoLE's gate is dense: every expert contributes with its gate weight; Entropy is that of the "
                       "gate weights, and Load CV and Dead experts count the expert with the largest weight as the "
                       "selected one.")
    merge_refusal = "its gates mix the LoRA experts with input-dependent weights"
    config: MoleConfig

    def __init__(self, config: MoleConfig) -> None:
        super().__init__(config)
        self.decoding = DecodingState()

    def site_of(self, module: str) -> str:
        return site_key(module, self.config.gate_level, self.config.gate_block_layers)

    def make_site(self, linear: nn.Linear, experts: LoraExperts) -> MoleGate:
        features = (experts.num_experts * linear.out_features if self.config.gate_input == "expert_deltas"
                    else linear.in_features)
        return MoleGate(features, experts.num_experts, self.config, self.decoding)

    def inject(self, model: nn.Module) -> None:
        super().inject(model)
        self.mask_experts(model, self.config.masked_experts)
        if self.config.gate_scope == "prompt_mean":  # the gates must know when a forward continues a KV cache
            model.register_forward_pre_hook(self._note_cache, with_kwargs=True)
            model.register_forward_hook(self._forget_cache, always_call=True)

    def _note_cache(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.decoding.past_tokens = cached_tokens(kwargs)

    def _forget_cache(self, model: nn.Module, args: tuple, output: object) -> None:
        self.decoding.past_tokens = 0

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
