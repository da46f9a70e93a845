"""Peak memory of a training run, for the cost columns of the comparison table.

On a CUDA device the peak is ``torch.cuda.max_memory_allocated`` over the fit alone (the counter is reset
when the measurement starts): the memory the method needs to train, without the allocator's cache. Elsewhere
it is the process's peak resident set size (``resource.getrusage``), which the operating system cannot reset:
it covers the whole process up to the end of the fit, loading and base-model scoring included. ``measure``
in the report says which of the two a number is, so that the table never puts them side by side unlabelled.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

MIB = 2**20


class PeakMemory:
    """Started before the fit, read after it (:meth:`report`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def report(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_mib": torch.cuda.max_memory_allocated(self.device) / MIB,
                    "measure": "cuda_max_allocated", "span": "fit", "device": str(self.device)}
        return {"peak_mib": peak_rss_bytes() / MIB, "measure": "peak_rss", "span": "process until the end of the fit",
                "device": str(self.device)}


def peak_rss_bytes() -> int:
    """The process's peak resident set size: ``ru_maxrss`` is in KiB on Linux and in bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
