"""Timing: a measured call and the plain forward+backward, interleaved, with torch's Timer.

Each round runs ``Timer.blocked_autorange`` once for the call and once for the plain step, in
alternating order; the rounds of each are merged with ``Measurement.merge``, so drift on a busy
machine lands on both sides of the ratio. All times are seconds per call.

Two clocks (``CLOCKS``): "wall", elapsed time (CUDA synchronised), what a user waits for; and
"cpu", the process's CPU time (``time.process_time``: every thread of the process, so torch's
intra-op threads count too). On a shared machine another process's burst stretches the wall
time of whatever runs meanwhile but not its CPU time, so the regression gate times in CPU time;
a CUDA kernel's time is not the host's CPU time, so "cpu" is refused for CUDA.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Measurement, Timer

#: IQR / median above which a measurement is flagged as noisy (torch's own warning threshold)
NOISY_RELATIVE_IQR = 0.10


class CellTimeout(BaseException):  # noqa: N818 - an interruption, like KeyboardInterrupt
    """A cell ran past its time budget (raised from a SIGALRM handler).

    A BaseException so that an implementation's ``except Exception`` cannot swallow it.
    """


@dataclass(frozen=True)
class Stats:
    """Summary of one side's per-call times, in seconds."""

    median: float
    iqr: float
    samples: tuple[float, ...]
    #: the median of each interleaved round, in order (empty when not timed by ``interleaved``)
    round_medians: tuple[float, ...] = ()

    @property
    def relative_iqr(self) -> float:
        return self.iqr / self.median if self.median > 0 else float("nan")

    @property
    def noisy(self) -> bool:
        return self.relative_iqr > NOISY_RELATIVE_IQR

    @classmethod
    def of(cls, measurement: Measurement, rounds: Sequence[Measurement] = ()) -> Stats:
        """Stats of a (merged) measurement; ``rounds``: the per-round measurements behind it."""
        return cls(
            measurement.median,
            measurement.iqr,
            tuple(measurement.times),
            tuple(r.median for r in rounds),
        )


CLOCKS = ("wall", "cpu")


def device_timer(device: str | torch.device, clock: str = "wall") -> Callable[[], float]:
    """A clock in seconds: "wall" (first waiting for queued CUDA work when timing on CUDA) or
    "cpu" (the process's CPU time; ValueError on CUDA)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu":
        if torch.device(device).type != "cpu":
            raise ValueError(f"the cpu clock times CPU work only, not {device}: use wall time")
        return time.process_time
    if torch.device(device).type == "cuda":

        def cuda_timer() -> float:
            torch.cuda.synchronize()
            return timeit.default_timer()

        return cuda_timer
    return timeit.default_timer


def time_once(call: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Wall seconds of one untimed-by-Timer call (a warm-up or a probe), CUDA synchronised."""
    clock = device_timer(device)
    start = clock()
    call()
    return clock() - start


def interleaved(
    call: Callable[[], object],
    plain: Callable[[], object],
    *,
    threads: int,
    rounds: int = 3,
    min_run_time: float = 0.1,
    device: str | torch.device = "cpu",
    clock: str = "wall",
    label: str = "",
    sub_label: str = "",
    description: str = "",
    noisy_rounds: int = 0,
    room: Callable[[float], bool] | None = None,
) -> tuple[Stats, Stats]:
    """Time ``call`` and ``plain`` in ``rounds`` alternating blocked_autorange runs, on
    ``clock`` ("wall" or "cpu", see ``CLOCKS``).

    While either side is noisy (``Stats.noisy``), up to ``noisy_rounds`` more rounds are run,
    each only if ``room(s)`` says another round fits, ``s`` the wall seconds the longest round
    so far took (a caller's budget; None: always). A round's spread on a busy machine is what
    the median of more rounds outlasts; a side that stays noisy is reported as such.

    Only ``call()`` / ``plain()`` are inside the timed statements; build their arguments
    beforehand (e.g. with ``functools.partial``). Returns (call stats, plain stats).
    """
    clock = device_timer(device, clock)

    def timer(fn, name):
        return Timer(
            stmt="fn()",
            globals={"fn": fn},
            timer=clock,
            num_threads=threads,
            label=label,
            sub_label=sub_label or name,
            description=description,
        )

    call_timer, plain_timer = timer(call, "call"), timer(plain, "plain")
    measured: dict[str, list[Measurement]] = {"call": [], "plain": []}
    longest = 0.0

    def one_round(index: int) -> None:
        nonlocal longest
        start = timeit.default_timer()
        order = [("call", call_timer), ("plain", plain_timer)]
        for name, t in order if index % 2 == 0 else reversed(order):
            measured[name].append(t.blocked_autorange(min_run_time=min_run_time))
        longest = max(longest, timeit.default_timer() - start)

    def merged() -> tuple[Stats, Stats]:
        (call_m,) = Measurement.merge(measured["call"])
        (plain_m,) = Measurement.merge(measured["plain"])
        return Stats.of(call_m, measured["call"]), Stats.of(plain_m, measured["plain"])

    base = max(1, rounds)
    for index in range(base):
        one_round(index)
    stats = merged()
    for index in range(base, base + max(0, noisy_rounds)):
        if not (stats[0].noisy or stats[1].noisy) or (room is not None and not room(longest)):
            break
        one_round(index)
        stats = merged()
    return stats


#: seconds to wait before trying again when the alarm finds an import in progress
IMPORT_GRACE_S = 0.05


def _importing(frame) -> bool:
    """Whether the interrupted code is inside importlib (a module being imported)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def time_limit(seconds: float | None, message: str = ""):
    """Raise ``CellTimeout`` in the main thread after ``seconds`` of wall time.

    ``message`` is the exception's text (default: "ran past its <seconds> s budget").
    Uses SIGALRM, so it works on Unix in the main thread; elsewhere (or with ``seconds`` None or
    not positive) it does nothing and the caller's after-the-fact checks are the only guard.
    A long single ATen kernel is interrupted when it returns to Python. An import in progress
    is never interrupted (that would leave a half-initialised module behind for every later
    call, e.g. torch._dynamo imported lazily by the first vmap): the alarm waits for it.
    """
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def interrupt(signum, frame):
        if _importing(frame):
            signal.setitimer(signal.ITIMER_REAL, IMPORT_GRACE_S)
            return
        raise CellTimeout(message or f"ran past its {seconds:.3g} s budget")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
