"""Lightning modules, base-model loading, the lm-eval bridge and the training pipeline."""

from .lm_module import AdapterLM
from .models import BaseModel, build_tiny_random, load_pretrained

__all__ = ["AdapterLM", "BaseModel", "build_tiny_random", "load_pretrained"]
