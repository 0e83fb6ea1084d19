"""``bench.timing.interleaved``'s rounds, on a fake clock: each fake call advances it by a
duration the test chooses, so which rounds run is known exactly, whatever the machine does."""

from __future__ import annotations

import pytest

from bench import timing

MS = 1e-3


class FakeClock:
    """A clock the fake calls advance. ``call``'s duration is ``durations(level)``, where the
    level counts the call's runs of blocks: it goes up each time the call runs after the plain
    step did (rounds alternate call-plain, plain-call, so rounds 1-2 share level 1, 3-4 level
    2, ...); the plain step always takes 1 ms."""

    def __init__(self, durations):
        self.now, self.level, self.last = 0.0, 0, None
        self.durations = durations

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        if self.last == "plain":
            self.level += 1
        self.last = "call"
        self.now += self.durations(self.level)

    def plain(self) -> None:
        self.last = "plain"
        self.now += 1 * MS


def rounds_run(monkeypatch, durations, rounds=2, noisy_rounds=0, room=None):
    clock = FakeClock(durations)
    monkeypatch.setattr(timing, "device_timer", lambda device, kind="wall": clock)
    call, plain = timing.interleaved(
        clock.call, clock.plain, threads=1, rounds=rounds, min_run_time=0.01,
        noisy_rounds=noisy_rounds, room=room,
    )  # fmt: skip
    assert len(call.round_medians) == len(plain.round_medians)
    return len(call.round_medians), call, plain


def test_a_quiet_cell_runs_its_rounds_only(monkeypatch):
    n, call, plain = rounds_run(monkeypatch, lambda level: 2 * MS, noisy_rounds=5)
    assert n == 2
    assert not call.noisy and not plain.noisy
    assert call.median == pytest.approx(2 * MS)


def test_a_noisy_cell_adds_rounds_up_to_the_limit(monkeypatch):
    growing = lambda level: (1 + level) * MS  # noqa: E731 - stays noisy whatever is added
    assert rounds_run(monkeypatch, growing)[0] == 2  # none unless asked
    n, call, _ = rounds_run(monkeypatch, growing, noisy_rounds=3)
    assert n == 5
    assert call.noisy  # still noisy after them: reported as such


def test_the_added_rounds_stop_once_the_cell_is_quiet(monkeypatch):
    def slow_once(level):  # rounds 1-2 slower, every other round the same
        return 1.5 * MS if level == 1 else 1 * MS

    n, call, _ = rounds_run(monkeypatch, slow_once, noisy_rounds=20)
    assert 2 < n < 22
    assert not call.noisy
    assert call.median == pytest.approx(1 * MS)


def test_no_round_is_added_without_room(monkeypatch):
    asked = []

    def room(round_s):
        asked.append(round_s)
        return len(asked) < 2  # room for one more round

    growing = lambda level: (1 + level) * MS  # noqa: E731
    n, _, _ = rounds_run(monkeypatch, growing, noisy_rounds=5, room=room)
    assert n == 3
    assert len(asked) == 2 and all(s >= 0 for s in asked)  # the longest round's wall seconds
