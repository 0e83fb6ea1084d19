"""Low precision: the autocast a caller runs an implementation under, and the dtype results and
reductions are computed in.

Two ways a model runs below float32, and both are honoured by every implementation:

- **low-precision parameters** (``model.to(torch.bfloat16)``): the forward and backward run in
  the parameters' dtype, as in the caller's own training step;
- **autocast**: the caller calls ``impl.norms(...)`` / ``impl.inner(...)`` inside
  ``torch.autocast(device_type, dtype=...)``, as they would wrap their training step's forward.
  The implementation finds that region (:func:`ambient_autocast`), runs the caller's forward
  (``model(...)`` and ``loss_fn``) under it and nothing else: its own backward and reductions run
  outside it, as a training step's backward does (a model that enters autocast inside its own
  ``forward`` needs nothing: that is part of the model).

Results (norms, inner products) are in :func:`accumulation_dtype` of the parameters: float32 for
bfloat16 / float16 parameters and for float32 parameters under autocast, float64 for float64.
Per-example gradients and their factors may be in the low dtype; every product and sum over them
is formed in the accumulation dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def accumulation_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """float32, or a wider floating dtype among ``dtypes`` (float64): never below float32.

    The same as promoting float32 with each floating dtype in turn (float16, bfloat16 and the
    float8 kinds promote to float32), without a dispatched ``promote_types`` per parameter:
    ``Side.result_dtype`` asks this several times a call."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


@dataclass(frozen=True)
class Autocast:
    """An autocast region (``torch.autocast(device_type, dtype, cache_enabled=...)``)."""

    device_type: str
    dtype: torch.dtype
    cache_enabled: bool = True

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)

    def __str__(self) -> str:
        return f"autocast({self.device_type}, {str(self.dtype).removeprefix('torch.')})"


def ambient_autocast(device_type: str) -> Autocast | None:
    """The autocast region the caller is in for ``device_type``, or None."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return Autocast(
        device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()
    )


def without_autocast(device_type: str):
    """A context in which ``device_type``'s autocast is off (a no-op where it is off already):
    what an implementation computes beyond the caller's forward is not cast down."""
    if ambient_autocast(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
