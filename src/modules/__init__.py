"""Lightning modules, base-model loading, the lm-eval bridge and the training pipeline.

Attributes load on first use, so that tools which only read finished runs (compare, plots) do not pay
for importing Lightning.
"""

from importlib import import_module

_EXPORTS = {"AdapterLM": ".lm_module", "BaseModel": ".models", "build_tiny_random": ".models",
            "load_pretrained": ".models"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
