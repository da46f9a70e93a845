"""LoRA (Hu et al., arXiv 2106.09685) with HF PEFT's conventions — implements methods.md §1.

    h = W0 x + s · B A dropout(x),     s = α / r   (α / √r with ``use_rslora``)

* Init (PEFT ``init_lora_weights=True``): ``A`` as ``nn.Linear`` does (``kaiming_uniform_(a=√5)``), ``B = 0``,
  so the model starts exactly at the base model; ``"gaussian"``: ``A ~ N(0, 1/r)``.
* Dropout acts on the input of ``A`` only (methods.md §1.2); one mask per module (PEFT), or with
  ``lora_dropout_sharing=per_input`` one mask per input tensor, shared by q/k/v and by gate/up (experts.py).
* Precision: adapter weights stay fp32 under a bf16/fp16 base, and the LoRA output is added to the base
  output before one cast to the base dtype (PEFT's ``result + lora_B(...)``, then ``.to(result.dtype)``).
* Merge: ``W ← W0 + s B A`` (PEFT's ``get_delta_weight``); unmerge subtracts it again.
* Targets: module names (suffix match) or ``"all-linear"`` (every linear except the LM head). PEFT's LLaMA
  default is ``q_proj, v_proj``; so is ours.

Fidelity: ``official-code-parity`` — tests compare the output with ``peft.tuners.lora.layer.Linear`` on
identical weights. Deviations from PEFT: none in the forward pass; ``lora_bias`` and ``fan_in_fan_out``
(Conv1D models) are not supported, because the causal LMs moelab targets use ``nn.Linear``.

The layer is a single-expert :class:`~moelab.adapters.experts.LoraExperts` stack, so "one expert and no
gate ≡ plain LoRA" holds by construction for every method built on the same stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import Adapter, AdapterConfig, AdapterLayer, register, require
from .experts import LoraExperts, adapter_dtype, check_dropout_sharing

LORA_INITS = ("default", "gaussian", "random")


@dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    """PEFT's ``LoraConfig`` vocabulary: ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``."""

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: str = "default"  # "default" (B = 0), "gaussian", or "random" (tests only: B ≠ 0)
    # "per_module": every LoRA draws its own dropout mask (PEFT); "per_input": modules reading one tensor share one
    lora_dropout_sharing: str = "per_module"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.r, int) and self.r > 0, f"r ({self.r}) must be a positive integer")
        require(self.lora_alpha > 0, f"lora_alpha ({self.lora_alpha}) must be positive")
        require(0.0 <= self.lora_dropout < 1.0, f"lora_dropout ({self.lora_dropout}) must be in [0, 1)")
        require(self.init_lora_weights in LORA_INITS,
                f"init_lora_weights ({self.init_lora_weights!r}) must be one of {LORA_INITS}")
        check_dropout_sharing(self.lora_dropout_sharing)

    def make_experts(self, linear: nn.Linear, num_experts: int = 1) -> LoraExperts:
        """A stack of ``num_experts`` LoRAs with this config's r, α, dropout and init, shaped for ``linear``."""
        return LoraExperts(num_experts, linear.in_features, linear.out_features, self.r, self.lora_alpha,
                           self.lora_dropout, self.use_rslora, self.init_lora_weights,
                           dtype=adapter_dtype(linear.weight.dtype), device=linear.weight.device,
                           dropout_sharing=self.lora_dropout_sharing)


class LoraLinear(AdapterLayer):
    """``nn.Linear`` plus one LoRA: ``base_layer(x) + s · B A dropout(x)``."""

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        super().__init__(base_layer)
        self.lora = config.make_experts(base_layer, num_experts=1)

    def adapted_forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        # PEFT adds the (fp32, under a bf16 base) LoRA output to the base output and casts once
        return (result + self.lora(x)).to(result.dtype)

    def get_delta_weight(self) -> Tensor:
        return self.lora.delta_weight()

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        return self.lora.low_rank_factors()


@register
class Lora(Adapter):
    name = "lora"
    config_class = LoraConfig
    placement = "linear"
    mergeable = True
    fidelity = "official-code-parity"

    def make_layer(self, name: str, module: nn.Module) -> LoraLinear:
        return LoraLinear(module, self.config)
