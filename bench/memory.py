"""Peak memory of one call, in bytes above what was allocated before it.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  allocation at the start (the caching allocator's view: tensors, not reserved blocks).
- CPU: the peak heap seen by memray while the call runs. memray intercepts malloc/mmap, so it
  sees ATen's allocations (tracemalloc sees only Python objects). Without memray the reading is
  missing and the note says why.

With ``allocated=True`` the reading also has the bytes allocated during the call in all (every
allocation counted, freed or not: what the regression gate counts): the CUDA allocator's
``allocated_bytes.all.allocated``, or the sum of memray's allocation records (malloc, calloc,
realloc, the aligned allocators and mmap; Python's small-object allocator is not counted).
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
    #: bytes allocated during the call in all (only when asked for)
    allocated_bytes: int | None = None


def memray_available() -> bool:
    try:
        import memray  # noqa: F401
    except ImportError:
        return False
    return True


def peak_memory(
    call: Callable[[], object], device: str | torch.device = "cpu", allocated: bool = False
) -> MemoryReading:
    """Run ``call()`` once and return its peak memory above the baseline, in bytes (and the
    bytes it allocated in all, with ``allocated``)."""
    if torch.device(device).type == "cuda":
        return _cuda_peak(call, torch.device(device))
    return _heap_peak(call, allocated)


def _cuda_peak(call, device: torch.device) -> MemoryReading:
    gc.collect()
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    before = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
    torch.cuda.reset_peak_memory_stats(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    total = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0) - before
    del result
    return MemoryReading(int(peak), allocated_bytes=int(total))


def _allocators() -> frozenset:
    import memray

    kinds = memray.AllocatorType
    return frozenset(
        {kinds.MALLOC, kinds.CALLOC, kinds.REALLOC, kinds.POSIX_MEMALIGN, kinds.ALIGNED_ALLOC,
         kinds.MEMALIGN, kinds.VALLOC, kinds.PVALLOC, kinds.MMAP}
    )  # fmt: skip


def _heap_peak(call, allocated: bool = False) -> MemoryReading:
    try:
        import memray
    except ImportError:
        return MemoryReading(None, "memray not installed: no CPU memory reading")
    # no gc.collect() first: memray ignores frees of memory allocated before tracking began
    with tempfile.TemporaryDirectory(prefix="pegbench-memray-") as folder:
        path = os.path.join(folder, "call.bin")
        # aggregated format: a small file, and the reader's metadata still has the peak; every
        # allocation's record only when their sum is asked for
        kind = (
            memray.FileFormat.ALL_ALLOCATIONS
            if allocated
            else memray.FileFormat.AGGREGATED_ALLOCATIONS
        )
        with memray.Tracker(path, file_format=kind):
            result = call()
            del result
        reader = memray.FileReader(path)
        try:
            peak = reader.metadata.peak_memory
            total = None
            if allocated:
                counted = _allocators()
                records = reader.get_allocation_records()
                total = sum(r.size for r in records if r.allocator in counted)
        finally:
            reader.close()
    return MemoryReading(int(peak), allocated_bytes=total)
