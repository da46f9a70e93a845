"""Every random stream a run draws from (Python, NumPy, torch CPU and CUDA), saved and set as one."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Whatever the block draws or reseeds (lm-eval seeds every generator), the streams continue afterwards as
    if it had not run: training then draws the same numbers whether base scores came from the cache or not."""
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)
