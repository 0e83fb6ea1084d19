"""One allocator behaviour for every measurement: glibc malloc's two adaptive thresholds pinned.

glibc adapts ``M_MMAP_THRESHOLD`` (a block above it gets a mapping of its own) and
``M_TRIM_THRESHOLD`` (free memory at the top of the heap above it goes back to the OS) to what the
process did before: both rise when a mapped block is freed. Until they have risen far enough, a
step that frees a few megabytes at the top of the heap hands them back, and its next call faults
them in again, page by page. Measured here (2 threads, ``ghost`` norms, the CNN at B=128):
8062 minor page faults and 26 ms of kernel time a call, 60.9 ms in all, in one process; none and
37.8 ms once the thresholds were fixed. Which calls pay depends on what ran earlier in the same
process, so a cell's time took one of several levels per process, and one implementation's calls
could pay where the plain step's did not.

:func:`pin` fixes both for the process (``mallopt``) and exports them as glibc's environment
variables, so that the processes a measurement starts (fresh-process repeats, the gate's run of
the baseline's commit, distributed workers) start with them: ``M_MMAP_THRESHOLD`` at glibc's
largest, 32 MiB, and ``M_TRIM_THRESHOLD`` at 1 GiB (freed memory stays with the process, as with
the caching allocators PyTorch's CPU performance guide recommends, jemalloc and TCMalloc). Memory
readings are unaffected: memray counts allocations, not the pages the process holds.

Elsewhere than glibc (macOS, musl) nothing is changed and :func:`state` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}

_pinned: str | None = None  # what pin() did, once it ran


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def pin() -> str:
    """Fix glibc malloc's thresholds for this process and the processes it starts; what was done
    (also :func:`state`). Idempotent."""
    global _pinned
    if _pinned is None:
        libc = _glibc()
        if libc is None:
            _pinned = f"default (not glibc: {platform.system()} {platform.libc_ver()[0] or '?'})"
        elif not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                  and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):  # fmt: skip
            _pinned = "default (glibc refused mallopt)"
        else:
            os.environ.update(ENVIRONMENT)
            _pinned = f"glibc, mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold " \
                      f"{TRIM_THRESHOLD >> 20} MiB"  # fmt: skip
    return _pinned


def state() -> str:
    """The allocator's behaviour for the record: pinned by :func:`pin`, inherited pinned from a
    parent that pinned it, or glibc's adaptive default."""
    if _pinned is not None:
        return _pinned
    if all(os.environ.get(k) == v for k, v in ENVIRONMENT.items()):
        return "glibc, thresholds inherited from the environment"
    return "default (adaptive thresholds)"
