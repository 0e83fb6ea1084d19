"""A fake case and fake implementations of known cost, to test the runner itself; a small
hand-made results table (``tiny_rows``).

The fake model's forward sleeps ``PLAIN_SECONDS_PER_EXAMPLE`` per example, so a plain step costs
about that times B; a ``FakeImplementation`` sleeps its own seconds per example and allocates
its own bytes per example, so its time ratio and memory are known in advance. Its answers are
the oracle's (computed on the first call for a batch, returned from a cache after), so the
oracle check passes unless ``wrong=True``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from correctness import oracle
from correctness.cases import Case
from impls import Unsupported

PLAIN_SECONDS_PER_EXAMPLE = 0.001


class SleepyLinear(nn.Module):
    """Linear(4, 3) whose forward sleeps a known time per example."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seconds_per_example = PLAIN_SECONDS_PER_EXAMPLE

    def forward(self, x):
        time.sleep(self.seconds_per_example * x.shape[0])
        return self.linear(x)


def _batch(batch_size, generator):
    return (
        torch.randn(batch_size, 4, generator=generator),
        torch.randint(0, 3, (batch_size,), generator=generator),
    )


def _cross_entropy(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


FAKE_CASE = Case("fake", SleepyLinear, _batch, _cross_entropy, tags=("fake",))


class FakeImplementation:
    """Sleeps ``seconds_per_example * B`` and allocates ``bytes_per_example * B`` bytes.

    ``jitter``: every third call sleeps ``1 + jitter`` times longer (a noisy implementation).
    ``fail``: an exception raised on every call; ``interrupt_at``: a batch size at which the
    call raises KeyboardInterrupt once (a sweep killed by the user); ``stall_at``: from this
    batch size on, a call sleeps an hour (only a time limit ends it).
    """

    def __init__(
        self,
        seconds_per_example: float = 0.003,
        bytes_per_example: int = 0,
        *,
        jitter: float = 0.0,
        fail: BaseException | None = None,
        interrupt_at: int | None = None,
        stall_at: int | None = None,
        wrong: bool = False,
    ):
        self.seconds_per_example = seconds_per_example
        self.bytes_per_example = bytes_per_example
        self.jitter = jitter
        self.fail = fail
        self.interrupt_at = interrupt_at
        self.stall_at = stall_at
        self.wrong = wrong
        self.calls: dict[int, int] = {}  # batch size -> number of calls
        self._answers: dict[tuple, torch.Tensor] = {}

    def _work(self, model, loss_fn, batch, quantity):
        inputs, targets = batch
        size = inputs.shape[0]
        self.calls[size] = self.calls.get(size, 0) + 1
        if self.fail is not None:
            raise self.fail
        if self.interrupt_at == size:
            self.interrupt_at = None
            raise KeyboardInterrupt
        seconds = self.seconds_per_example * size
        if self.stall_at is not None and size >= self.stall_at:
            seconds = 3600.0
        if self.jitter and self.calls[size] % 3 == 0:
            seconds *= 1 + self.jitter
        # untouched pages cost no time; memray counts the allocation's size all the same
        allocation = torch.empty(self.bytes_per_example * size, dtype=torch.uint8)
        time.sleep(seconds)
        key = (id(model), inputs.data_ptr(), size, quantity)
        if key not in self._answers:
            grads = oracle.per_example_gradients(model, loss_fn, batch)
            answer = oracle.norms(grads) if quantity == "norms" else oracle.inner(grads, grads)
            self._answers[key] = answer.float() * (2.0 if self.wrong else 1.0)
        del allocation
        return self._answers[key]

    def norms(self, model, loss_fn, batch, per_param=False):
        return self._work(model, loss_fn, batch, "norms")

    def inner(self, model, loss_fn, batch, other=None, other_model=None):
        return self._work(model, loss_fn, batch, "gram")


class Refuses(FakeImplementation):
    def __init__(self):
        super().__init__(fail=Unsupported("fake refuses every model"))


def tiny_rows() -> list[dict]:
    """A hand-made results table of the fake case: a slow, a quick and a WRONG implementation
    at B=16 and 32, and a timeout at B=64."""
    base = dict(
        device="cpu",
        case="fake",
        quantity="norms",
        threads=1,
        flags="",
        reason="",
        memory_note="",
        plain_median_s=0.01,
        plain_peak_bytes=2**20,
        n_samples=3,
        check_error=1e-7,
    )
    rows = []
    for b in (16, 32):
        rows += [
            dict(
                base,
                implementation="slowpoke",
                batch_size=b,
                status="ok",
                correct="ok",
                time_median_s=0.05,
                ratio=5.0,
                memory_peak_bytes=5 * 2**20,
                memory_ratio=5.0,
            ),
            dict(
                base,
                implementation="quick",
                batch_size=b,
                status="ok",
                correct="ok",
                time_median_s=0.012,
                ratio=1.2,
                memory_peak_bytes=2**20,
                memory_ratio=1.0,
                flags="noisy: IQR 12% of median" if b == 32 else "",
            ),
            dict(
                base,
                implementation="liar",
                batch_size=b,
                status="ok",
                correct="WRONG",
                check_error=0.5,
                time_median_s=0.001,
                ratio=0.1,
                memory_peak_bytes=1,
                memory_ratio=0.0,
            ),
        ]
    rows.append(
        dict(
            base,
            implementation="slowpoke",
            batch_size=64,
            status="timeout",
            correct="ok",
            reason="ran past its 1 s budget",
        )
    )
    return rows
