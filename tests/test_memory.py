"""Peak memory for the cost columns: CUDA's allocator peak over the fit, the process's peak RSS elsewhere."""

import resource

import torch

from moelab.modules.memory import MIB, PeakMemory, peak_rss_bytes


def test_on_the_cpu_the_peak_is_the_processes_resident_set_and_says_so():
    report = PeakMemory(torch.device("cpu")).report()
    assert report["measure"] == "peak_rss" and report["device"] == "cpu"
    assert report["peak_mib"] * MIB == peak_rss_bytes() > 0
    assert peak_rss_bytes() >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "KiB on Linux, never less"


def test_on_cuda_the_peak_counter_is_reset_at_the_start_and_read_at_the_end(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("read", device)) or 3 * MIB)
    memory = PeakMemory(torch.device("cuda", 1))
    assert calls == [("reset", torch.device("cuda", 1))]
    report = memory.report()
    assert calls[-1] == ("read", torch.device("cuda", 1))
    assert report == {"peak_mib": 3.0, "measure": "cuda_max_allocated", "span": "fit", "device": "cuda:1"}
