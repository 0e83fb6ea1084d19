"""Peak memory of one call, in bytes above what was allocated before it.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  allocation at the start (the caching allocator's view: tensors, not reserved blocks).
- CPU: the peak heap seen by memray while the call runs. memray intercepts malloc/mmap, so it
  sees ATen's allocations (tracemalloc sees only Python objects). Without memray the reading is
  missing and the note says why.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryReading:
    """Peak bytes above the pre-call baseline (None when unmeasured) and a note saying why."""

    peak_bytes: int | None
    note: str = ""


def memray_available() -> bool:
    try:
        import memray  # noqa: F401
    except ImportError:
        return False
    return True


def peak_memory(call: Callable[[], object], device: str | torch.device = "cpu") -> MemoryReading:
    """Run ``call()`` once and return its peak memory above the baseline, in bytes."""
    if torch.device(device).type == "cuda":
        return _cuda_peak(call, torch.device(device))
    return _heap_peak(call)


def _cuda_peak(call, device: torch.device) -> MemoryReading:
    gc.collect()
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return MemoryReading(int(peak))


def _heap_peak(call) -> MemoryReading:
    try:
        import memray
    except ImportError:
        return MemoryReading(None, "memray not installed: no CPU memory reading")
    # no gc.collect() first: memray ignores frees of memory allocated before tracking began
    with tempfile.TemporaryDirectory(prefix="pegbench-memray-") as folder:
        path = os.path.join(folder, "call.bin")
        # aggregated format: a small file, and the reader's metadata still has the peak
        with memray.Tracker(path, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
            result = call()
            del result
        reader = memray.FileReader(path)
        try:
            peak = reader.metadata.peak_memory
        finally:
            reader.close()
    return MemoryReading(int(peak))
