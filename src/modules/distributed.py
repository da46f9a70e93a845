"""The few collectives the trainer needs beyond Lightning's, each a no-op on a single process.

They go through ``torch.distributed`` directly: Lightning's ``strategy.reduce`` has no "max", and these run
inside hooks (losses, checkpoints) where every process calls them in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def num_processes() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if num_processes() > 1 else 0


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """A reduced copy of ``tensor`` (sum or max over processes); no gradient flows through it."""
    result = tensor.detach().clone()
    if num_processes() > 1:
        dist.all_reduce(result, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return result


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on some process."""
    return bool(all_reduce(torch.tensor(float(flag), device=device), op="max").item())


def gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order."""
    if num_processes() == 1:
        return [value]
    values: list[Any] = [None] * num_processes()
    dist.all_gather_object(values, value)
    return values
