"""The regression gate: its decisions on synthetic baselines and samples (``bench.gate``), the
baseline file (``bench.baseline``), the command's exit codes and report (``bench.regress``,
with the measurement replaced by synthetic results), the injections, the counters on a real
model, and one short end-to-end run on the fake case of known cost."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from bench import baseline, gate, regress
from bench.__main__ import main
from bench.baseline import Baseline, BaselineError, load_baseline, write_baseline
from bench.baseline_commit import (
    CommitUnavailable,
    baseline_commit,
    measure_against_commit,
)
from bench.gate import (
    IMPROVEMENT,
    NOT_GATED,
    REGRESSION,
    UNCHANGED,
    CellResult,
    Thresholds,
    decide,
)
from bench.regress import Injected
from bench.sweep import Settings, plan
from bench.tests.fakes import FAKE_CASE, FakeImplementation, Refuses

MIB = 2**20
LOOSE = Thresholds(time=1.0, alpha=0.01)


def cell(
    ratio=2.0,
    samples=(1.9, 2.0, 2.1, 2.02, 1.95, 2.05),
    memory_ratio=1.5,
    status="ok",
    implementation="ghost",
    plain_peak=100 * MIB,
    flops=1_000_000,
    aten_ops=100,
    allocated=200 * MIB,
    **kw,
) -> CellResult:
    ok = status == "ok"
    return CellResult(
        case=kw.pop("case", "mlp_mnist"),
        implementation=implementation,
        quantity=kw.pop("quantity", "norms"),
        batch_size=kw.pop("batch_size", 16),
        status=status,
        reason=kw.pop("reason", "" if ok else f"{status} because"),
        ratio=ratio if ok else None,
        ratio_samples=tuple(samples) if ok else (),
        memory_ratio=memory_ratio if ok else None,
        memory_peak_bytes=int(memory_ratio * plain_peak) if ok else None,
        plain_peak_bytes=plain_peak if ok else None,
        flops=flops if ok else None,
        aten_ops=aten_ops if ok else None,
        allocated_bytes=allocated if ok else None,
        **kw,
    )


def scaled(values, factor):
    return tuple(v * factor for v in values)


def only(decisions, metric):
    (decision,) = [d for d in decisions if d.metric == metric]
    return decision


# -- decisions -----------------------------------------------------------------------------------


def test_unchanged_cell_passes():
    base = cell()
    run = cell(ratio=2.3, samples=scaled(base.ratio_samples, 1.15), memory_ratio=1.5)
    decisions = decide([base], [run], LOOSE)
    expected = {"time": UNCHANGED, **{name: UNCHANGED for name, _, _ in gate.COUNTERS}}
    assert {d.metric: d.verdict for d in decisions} == expected
    assert not gate.regressions(decisions)


def test_ten_times_slower_regresses_with_the_rank_test():
    base = cell()
    run = cell(ratio=20.0, samples=scaled(base.ratio_samples, 10))
    time = only(decide([base], [run], LOOSE), "time")
    assert time.verdict == REGRESSION
    assert time.change == pytest.approx(10.0)
    assert time.p_value == pytest.approx(1 / 924)  # 6 against 6, all greater: exact test


def test_beyond_threshold_but_rank_test_disagrees_is_not_a_regression():
    # one wild round drags the median up; the rounds overlap with the baseline's
    base = cell(ratio=2.0, samples=(1.0, 1.5, 2.0, 2.5, 3.0, 6.0))
    run = cell(ratio=4.5, samples=(1.1, 1.6, 2.1, 6.5, 7.0, 9.0))
    time = only(decide([base], [run], LOOSE), "time")
    assert time.verdict == UNCHANGED
    assert time.p_value > LOOSE.alpha
    assert "rank test disagrees" in time.note


def test_within_threshold_is_unchanged_even_when_significant():
    base = cell()
    run = cell(ratio=3.0, samples=scaled(base.ratio_samples, 1.5))  # 1.5x < 2x
    assert only(decide([base], [run], LOOSE), "time").verdict == UNCHANGED
    strict = Thresholds(time=0.25)
    assert only(decide([base], [run], strict), "time").verdict == REGRESSION


def test_each_cell_has_its_own_time_threshold_from_its_spread():
    steady, shaky = cell(spread=1.03), cell(spread=1.4)
    assert gate.time_threshold(1.03) == gate.MIN_TIME_THRESHOLD
    assert gate.time_threshold(1.4) == pytest.approx(gate.SPREAD_MARGIN * 0.4)
    slower = cell(ratio=2.6, samples=scaled(cell().ratio_samples, 1.3))
    per_cell = Thresholds()  # time=None: each baseline cell's own
    assert only(decide([steady], [slower], per_cell), "time").verdict == REGRESSION
    decision = only(decide([shaky], [slower], per_cell), "time")
    assert decision.verdict == UNCHANGED
    assert decision.threshold == pytest.approx(gate.SPREAD_MARGIN * 0.4)
    assert Thresholds().time_for(cell()) == gate.DEFAULT_THRESHOLD  # a cell with no spread


def test_a_cell_takes_the_largest_spread_of_its_implementation_on_its_case():
    """vmap on the LSTM: the norms cell saw both of its modes in the baseline's runs, the Gram
    cell only one; a run of the Gram cell in the other mode must not fail."""
    norms = cell(quantity="norms", spread=1.44)
    gram = cell(quantity="gram", spread=1.07)
    other = cell(quantity="gram", implementation="hooks", spread=1.02)
    assert gate.group_spreads([norms, gram, other]) == {
        ("mlp_mnist", "ghost"): 1.44, ("mlp_mnist", "hooks"): 1.02,
    }  # fmt: skip
    high_mode = cell(quantity="gram", ratio=2.6, samples=scaled(cell().ratio_samples, 1.3))
    decision = only(decide([norms, gram, other], [high_mode], Thresholds()), "time")
    assert decision.verdict == UNCHANGED
    assert decision.threshold == pytest.approx(gate.time_threshold(1.44))
    alone = only(decide([gram], [high_mode], Thresholds()), "time")
    assert alone.verdict == REGRESSION


def test_merge_repeats_pools_rounds_and_measures_the_spread():
    runs = [[cell(ratio=r, samples=(r, r))] for r in (2.0, 2.2, 2.1)]
    (merged,) = gate.merge_repeats(runs)
    assert merged.ratio == pytest.approx(2.1) and len(merged.ratio_samples) == 6
    assert merged.spread == pytest.approx(1.1)
    flicker = gate.merge_repeats([[cell()], [cell(status="timeout")]])
    assert flicker[0].status == "timeout" and "ok in 1 of 2 runs" in flicker[0].reason


def test_too_few_rounds_for_the_rank_test_the_threshold_decides():
    base = cell()
    run = cell(ratio=20.0, samples=(20.0,))  # the budget allowed one round
    time = only(decide([base], [run], LOOSE), "time")
    assert time.verdict == REGRESSION
    assert "too few" in time.note
    assert gate.smallest_p_value(1, 6) == pytest.approx(1 / 7)


def test_improvement_is_reported_not_gated():
    base = cell(ratio=20.0, samples=scaled(cell().ratio_samples, 10))
    run = cell()
    decisions = decide([base], [run], LOOSE)
    assert only(decisions, "time").verdict == IMPROVEMENT
    assert not gate.regressions(decisions)


def test_counters_are_held_tightly():
    base = cell()
    tight = Thresholds(time=1.0)
    more_flops = only(decide([base], [cell(flops=1_060_000)], tight), "flops")
    assert more_flops.verdict == REGRESSION and more_flops.change == pytest.approx(1.06)
    assert only(decide([base], [cell(flops=1_040_000)], tight), "flops").verdict == UNCHANGED
    assert only(decide([base], [cell(aten_ops=120)], tight), "aten ops").verdict == REGRESSION
    fewer = only(decide([base], [cell(aten_ops=80)], tight), "aten ops")
    assert fewer.verdict == IMPROVEMENT and not gate.regressions([fewer])
    copy = only(decide([base], [cell(allocated=300 * MIB)], tight), "bytes allocated")
    assert copy.verdict == REGRESSION and "+104,857,600 bytes" in copy.note
    peak = only(decide([base], [cell(memory_ratio=2.0)], tight), "peak bytes")
    assert peak.verdict == REGRESSION
    # 3x the bytes, but 20 KiB more: under the floor
    tiny, grown = cell(allocated=10 * 1024), cell(allocated=30 * 1024)
    assert only(decide([tiny], [grown], tight), "bytes allocated").verdict == UNCHANGED


def test_counters_of_another_torch_build_or_missing_are_not_gated():
    base = cell()
    other_build = Thresholds(time=1.0, gate_counters=False)
    decisions = decide([base], [cell(flops=9_000_000)], other_build)
    assert not gate.regressions(decisions)
    assert only(decisions, "counters").note == "counters not comparable"
    uncounted = CellResult(**{**base.__dict__, "flops": None, "counts_note": "not counted: X"})
    flops = only(decide([base], [uncounted], LOOSE), "flops")
    assert flops.verdict == NOT_GATED and flops.note == "not counted: X"


def test_no_time_gates_counters_only():
    base = cell()
    slow = cell(ratio=20.0, samples=scaled(base.ratio_samples, 10))
    decisions = decide([base], [slow], Thresholds(gate_time=False))
    assert only(decisions, "time").verdict == NOT_GATED and not gate.regressions(decisions)
    decisions = decide([base], [cell(flops=5_000_000)], Thresholds(gate_time=False))
    assert [d.metric for d in gate.regressions(decisions)] == ["flops"]
    assert "time not gated" in gate.summary(decisions, Thresholds(gate_time=False))


@pytest.mark.parametrize("status", ["unsupported", "timeout", "error", "oom", "skipped"])
def test_ok_in_baseline_and_failing_now_regresses(status):
    decisions = decide([cell()], [cell(status=status)], LOOSE)
    (decision,) = decisions
    assert decision.verdict == REGRESSION and decision.metric == "status"
    assert status in decision.note


def test_cells_not_ok_on_either_side_or_new_are_not_gated():
    refused = cell(status="unsupported", implementation="function")
    newly_ok = cell(implementation="function")
    new = cell(implementation="brand_new")
    decisions = decide([refused], [refused, new], LOOSE)
    assert [d.verdict for d in decisions] == [NOT_GATED, NOT_GATED]
    assert "new cell" in decisions[1].note
    (better,) = decide([refused], [newly_ok], LOOSE)
    assert better.verdict == IMPROVEMENT
    # baseline cells the run did not ask for are left out
    assert decide([cell(), refused], [cell()], LOOSE)[0].key == cell().key


def test_table_and_summary_name_the_regression():
    base = cell()
    run = cell(ratio=20.0, samples=scaled(base.ratio_samples, 10))
    decisions = decide([base], [run], LOOSE)
    table = gate.format_table(gate.regressions(decisions))
    assert "REGRESSION" in table and "ghost" in table and "x10.000" in table
    assert gate.summary(decisions, LOOSE).startswith("regress: FAIL")
    (command,) = gate.reproduce(decisions, ["--no-time"])
    assert command == (
        "python -m bench regress --cases mlp_mnist --impls ghost --batch-sizes 16 "
        "--quantities norms --no-time"
    )


# -- the baseline file ---------------------------------------------------------------------------


def test_baseline_round_trip(tmp_path):
    cells = [cell(), cell(status="unsupported", implementation="function")]
    original = Baseline(cells, {"cpu": "test", "torch_build": "x"}, {"threads": 1})
    path = tmp_path / "baseline.json"
    write_baseline(path, original)
    data = json.loads(path.read_text())
    assert data["format"] == baseline.BASELINE_FORMAT
    assert data["regenerate_with"] == baseline.UPDATE_COMMAND
    assert data["cells"][0]["ratio_samples"] == list(cells[0].ratio_samples)
    loaded = load_baseline(path)
    assert loaded.cells == cells
    assert loaded.environment == original.environment and loaded.settings == original.settings


def test_missing_or_unreadable_baseline(tmp_path):
    with pytest.raises(BaselineError, match="--update-baseline"):
        load_baseline(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"format": "something else", "cells": []}')
    with pytest.raises(BaselineError, match="unreadable"):
        load_baseline(tmp_path / "bad.json")


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_baseline_commit(monkeypatch):
    """The command's last step (the baseline's commit measured here) is not run by these
    tests unless one replaces this: a confirmed time regression stands, with the reason."""

    def unavailable(*args, **kwargs):
        raise CommitUnavailable("not measured in these tests")

    monkeypatch.setattr(regress, "measure_against_commit", unavailable)


@pytest.fixture
def synthetic_runs(monkeypatch):
    """Replace the measurement with synthetic results: ``runs["next"]`` is what it returns."""
    runs = {"next": [cell()], "calls": []}

    def fake_measure(cells, settings, implementations=None, progress=True):
        runs["calls"].append((len(cells), settings, dict(implementations or {})))
        return list(runs["next"])

    monkeypatch.setattr(regress, "measure", fake_measure)
    return runs


def run_gate(tmp_path, *extra):
    """The command on the synthetic measurement; a baseline from one run unless told."""
    if "--update-baseline" in extra and "--repeat" not in extra:
        extra = (*extra, "--repeat", "1")
    return main(
        ["regress", "--baseline", str(tmp_path / "b.json"), "--no-progress", "--impls", "ghost"]
        + list(extra)
    )


def test_exit_codes(tmp_path, synthetic_runs, capsys):
    assert run_gate(tmp_path) == 2  # no baseline yet
    assert "--update-baseline" in capsys.readouterr().err
    assert run_gate(tmp_path, "--update-baseline") == 0
    assert load_baseline(tmp_path / "b.json").cells == [cell()]
    assert run_gate(tmp_path) == 0
    assert "regress: PASS" in capsys.readouterr().out
    synthetic_runs["next"] = [cell(ratio=20.0, samples=scaled(cell().ratio_samples, 10))]
    assert run_gate(tmp_path, "--threshold", "1.0") == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "regress: FAIL" in out
    assert "reproduce each regressed cell alone with:" in out
    assert "python -m bench regress --cases mlp_mnist --impls ghost --batch-sizes 16" in out
    synthetic_runs["next"] = [cell(flops=2_000_000)]
    assert run_gate(tmp_path, "--no-time") == 1
    assert "flops" in capsys.readouterr().out
    synthetic_runs["next"] = [cell(status="timeout")]
    assert run_gate(tmp_path) == 1
    # --update-baseline accepts the new state and exits 0
    assert run_gate(tmp_path, "--update-baseline") == 0
    assert load_baseline(tmp_path / "b.json").cells[0].status == "timeout"
    assert run_gate(tmp_path) == 0


def test_confirm_keeps_only_repeated_regressions():
    base = cell()
    slow = cell(ratio=20.0, samples=scaled(base.ratio_samples, 10))
    first = decide([base], [slow], LOOSE)
    (kept,) = gate.regressions(gate.confirm(first, decide([base], [slow], LOOSE)))
    assert "confirmed: measured again, x10.00" in kept.note
    # counters are deterministic: a counter regression stands without a second measurement
    more = decide([base], [cell(flops=2_000_000)], LOOSE)
    assert only(gate.confirm(more, []), "flops").verdict == REGRESSION
    dropped = only(gate.confirm(first, decide([base], [cell()], LOOSE)), "time")
    assert dropped.verdict == UNCHANGED and dropped.note.startswith(gate.NOT_CONFIRMED)
    # a cell that timed out, then measured fine
    timed_out = decide([base], [cell(status="timeout")], LOOSE)
    (status,) = gate.confirm(timed_out, decide([base], [cell()], LOOSE))
    assert status.verdict == UNCHANGED and "x1.00" in status.note


def test_a_burst_that_does_not_repeat_passes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(regress, "measure", lambda *args, **kwargs: [cell()])
    run_gate(tmp_path, "--update-baseline")
    burst = [cell(ratio=20.0, samples=scaled(cell().ratio_samples, 10))]
    queue, sizes = [], []

    def measure(cells, settings, implementations=None, progress=True):
        sizes.append(len(cells))
        return queue.pop(0)

    monkeypatch.setattr(regress, "measure", measure)
    queue[:] = [burst, [cell()]]
    assert run_gate(tmp_path) == 0
    out = capsys.readouterr().out
    assert "measuring them again (1/1)" in out and "not confirmed" in out
    assert sizes[-1] == 1  # only the suspect cell was measured again
    queue[:] = [burst, burst]
    assert run_gate(tmp_path) == 1
    queue[:] = [burst]
    assert run_gate(tmp_path, "--confirm", "0") == 1  # the first measurement is believed
    assert not queue


def test_a_confirmed_slowdown_is_judged_against_the_baseline_commit_measured_here(
    tmp_path, monkeypatch, capsys
):
    """A time regression that repeats is measured on the baseline's commit and on this tree,
    here: when that commit is as slow here (another host), it is not one; when it is faster,
    it stands."""
    monkeypatch.setattr(regress, "measure", lambda *args, **kwargs: [cell()])
    run_gate(tmp_path, "--update-baseline")
    slow = cell(ratio=20.0, samples=scaled(cell().ratio_samples, 10))
    asked = []
    here = {}

    def against(commit, keys, options, new_options):
        asked.append((commit, set(keys), list(options), list(new_options)))
        return [here["old"]], [slow]

    monkeypatch.setattr(regress, "measure", lambda *args, **kwargs: [slow])
    monkeypatch.setattr(regress, "baseline_commit", lambda baseline: "0123456789abcdef")
    monkeypatch.setattr(regress, "measure_against_commit", against)
    here["old"] = slow  # this host makes the old code as slow: not a regression
    assert run_gate(tmp_path) == 0
    out = capsys.readouterr().out
    assert "measuring them on the baseline's commit 0123456789 and on this tree" in out
    assert "not confirmed: against 0123456789 measured here, x1.00" in out
    commit, keys, options, new_options = asked[-1]
    assert keys == {("mlp_mnist", "ghost", "norms", 16)}
    assert options[options.index("--threads") + 1] == str(regress.GATE_THREADS)
    assert new_options == []
    here["old"] = cell()  # the old code is faster here: our code got slower
    assert run_gate(tmp_path, "--inject-slowdown", "ghost=1.5") == 1
    assert "confirmed: against 0123456789 measured here, x10.00" in capsys.readouterr().out
    assert asked[-1][3] == ["--inject-slowdown=ghost=1.5"]  # this tree only
    assert run_gate(tmp_path, "--no-against-commit") == 1
    assert "baseline's commit" not in capsys.readouterr().out
    asked.clear()
    monkeypatch.setattr(regress, "measure", lambda *args, **kwargs: [cell(flops=2_000_000)])
    assert run_gate(tmp_path) == 1  # counters are deterministic: no third measurement
    assert not asked


def test_default_malloc_reaches_the_processes_a_run_starts(tmp_path, monkeypatch):
    """--default-malloc goes to the fresh-process runs of --update-baseline, and to the baseline's
    commit only when that tree knows it (its baseline records the allocator); otherwise to this
    tree's processes alone."""
    seen = []

    def measure_tree(tree, keys, options):
        seen.append(list(options))
        return [cell()]

    monkeypatch.setattr(regress, "measure_tree", measure_tree)
    assert run_gate(tmp_path, "--update-baseline", "--repeat", "2", "--default-malloc") == 0
    assert len(seen) == 2 and all("--default-malloc" in options for options in seen)
    asked = []

    def against(commit, keys, options, new_options):
        asked.append((list(options), list(new_options)))
        return [cell()], [cell()]

    monkeypatch.setattr(regress, "measure", lambda *a, **k: [cell(ratio=20.0, samples=scaled(
        cell().ratio_samples, 10))])  # fmt: skip
    monkeypatch.setattr(regress, "baseline_commit", lambda baseline: "0123456789abcdef")
    monkeypatch.setattr(regress, "measure_against_commit", against)
    assert run_gate(tmp_path, "--default-malloc") == 0
    assert "--default-malloc" in asked[-1][0] and asked[-1][1] == []
    path = tmp_path / "b.json"
    written = json.loads(path.read_text())
    del written["environment"]["malloc"]  # a baseline from before bench.allocator
    path.write_text(json.dumps(written))
    assert run_gate(tmp_path, "--default-malloc") == 0
    assert "--default-malloc" not in asked[-1][0] and asked[-1][1] == ["--default-malloc"]
    assert run_gate(tmp_path) == 0
    assert "--default-malloc" not in asked[-1][0] + asked[-1][1]


def test_the_mean_over_processes_pools_their_rounds():
    runs = [[cell(ratio=2.0, samples=(2.0, 2.1))], [cell(ratio=3.0, samples=(3.0, 2.9))]]
    (merged,) = gate.merge_repeats(runs, statistics.fmean)
    assert merged.ratio == 2.5 and merged.ratio_samples == (2.0, 2.1, 3.0, 2.9)
    (failing,) = gate.merge_repeats([[cell()], [cell(status="timeout")]], statistics.fmean)
    assert failing.status == "timeout"


def test_an_unmeasurable_baseline_commit_leaves_the_regression_standing(
    tmp_path, synthetic_runs, capsys
):
    run_gate(tmp_path, "--update-baseline")
    synthetic_runs["next"] = [cell(ratio=20.0, samples=scaled(cell().ratio_samples, 10))]
    assert run_gate(tmp_path) == 1
    out = capsys.readouterr().out
    assert "the baseline's commit cannot be measured here" in out
    assert "the time regressions stand" in out


def test_baseline_commit_refuses_what_cannot_be_rebuilt():
    with pytest.raises(CommitUnavailable, match="records no commit"):
        baseline_commit(Baseline([cell()], {}, {}))
    with pytest.raises(CommitUnavailable, match="uncommitted changes"):
        baseline_commit(Baseline([cell()], {"git_commit": "abc+dirty"}, {}))
    assert baseline_commit(Baseline([cell()], {"git_commit": "abc"}, {})) == "abc"
    with pytest.raises(CommitUnavailable, match="git cat-file failed"):
        measure_against_commit("0" * 40, [("mlp_mnist", "ghost", "norms", 16)], [], [])


def test_the_recorded_commit_is_dirty_for_code_changes_not_for_the_measurements(tmp_path):
    """A sweep rewrites results/ as it goes: that does not make the code it measured dirty."""
    import subprocess

    from bench.environment import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cells.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_commit(tmp_path)
    assert clean is not None and not clean.endswith("+dirty")
    (tmp_path / "results" / "cells.csv").write_text("b\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "+dirty"


def _head():
    from bench.environment import git_commit

    commit = git_commit()
    return None if commit is None else commit.removesuffix("+dirty")


@pytest.mark.skipif(_head() is None, reason="not a git checkout")
def test_measure_against_commit_runs_each_trees_own_gate():
    """HEAD unpacked and this tree, one fresh process each, on one cheap cell with this run's
    timing options; an injection reaches this tree only (real subprocesses, ~15 s)."""
    key = ("mlp_mnist", "ghost", "norms", 16)
    options = ["--threads", "1", "--rounds", "2", "--min-run-time", "0.01", "--budget", "5"]
    injection = ["--inject-memory=ghost=64"]
    (old,), (new,) = measure_against_commit(_head(), [key], options, injection, processes=1)
    assert old.key == new.key == key and old.status == new.status == "ok"
    assert len(old.ratio_samples) == len(new.ratio_samples) == 2
    assert new.memory_peak_bytes >= old.memory_peak_bytes + 60 * MIB


def test_save_writes_the_run(tmp_path, synthetic_runs):
    run_gate(tmp_path, "--update-baseline")
    assert run_gate(tmp_path, "--save", str(tmp_path / "run.json")) == 0
    assert load_baseline(tmp_path / "run.json").cells == [cell()]


def test_bad_arguments_exit_2(tmp_path, synthetic_runs, capsys):
    run_gate(tmp_path, "--update-baseline")
    capsys.readouterr()
    for extra in (
        ["--inject-slowdown", "ghost"],
        ["--inject-slowdown", "ghost=0.5"],
        ["--inject-memory", "ghost=-1"],
        ["--inject-slowdown", "nonexistent=10"],
        ["--inject-slowdown", "ghost=10", "--update-baseline"],
        ["--inject-materialise", "--update-baseline"],
        ["--update-baseline", "--repeat", "0"],
        ["--batch-sizes", "0"],
        ["--cases", "no_such_case"],
        ["--threshold", "-1"],
        ["--alpha", "0"],
    ):
        assert run_gate(tmp_path, *extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("regress: ") and err.count("\n") == 1, err
    assert main(["regress", "--baseline", str(tmp_path / "b.json"), "--impls", "nope"]) == 2


def test_injection_wraps_only_the_named_implementation(tmp_path, synthetic_runs):
    run_gate(tmp_path, "--update-baseline")
    run_gate(tmp_path, "--inject-slowdown", "ghost=10", "--inject-memory", "hooks=64")
    _, settings, implementations = synthetic_runs["calls"][-1]
    assert set(implementations) == {"ghost", "hooks"}
    assert isinstance(implementations["ghost"], Injected)
    assert implementations["ghost"].slowdown == 10 and implementations["ghost"].extra_bytes == 0
    assert (
        implementations["hooks"].slowdown == 1 and implementations["hooks"].extra_bytes == 64 * MIB
    )
    assert settings.threads == regress.GATE_THREADS and settings.rounds == regress.GATE_ROUNDS
    assert settings.clock == "cpu" and settings.count


def test_update_baseline_measures_repeats_and_records_spreads(tmp_path, monkeypatch, capsys):
    """Each run in a fresh process (replaced here by synthetic runs)."""
    ratios = iter([2.0, 2.2, 2.1])

    def measure(cells, settings, implementations=None, progress=True):
        r = next(ratios)
        return [cell(ratio=r, samples=(r,) * 3)]

    def measure_tree(tree, keys, options):
        assert tree == regress.REPOSITORY and ("mlp_mnist", "ghost", "norms", 16) in keys
        return measure(None, None)

    monkeypatch.setattr(regress, "measure_tree", measure_tree)
    assert run_gate(tmp_path, "--update-baseline", "--repeat", "3") == 0
    (written,) = load_baseline(tmp_path / "b.json").cells
    assert written.spread == pytest.approx(1.1) and len(written.ratio_samples) == 9
    assert "spread" in capsys.readouterr().out


def test_inject_materialise_forces_the_cost_model_only_while_measuring(tmp_path, monkeypatch):
    from impls.factors import COSTS

    seen = []
    monkeypatch.setattr(regress, "measure", lambda *a, **k: seen.append(COSTS.force) or [cell()])
    run_gate(tmp_path, "--update-baseline", "--repeat", "1")
    run_gate(tmp_path, "--inject-materialise", "--no-time")
    assert seen == [None, "materialised"] and COSTS.force is None


def test_gate_cells_keep_slow_implementations_at_the_smallest_size():
    cells = regress.gate_cells()
    sizes = {(c.implementation, c.batch_size) for c in cells}
    for name in regress.SLOW_IMPLEMENTATIONS:
        assert (name, min(regress.GATE_BATCH_SIZES)) in sizes
        assert (name, max(regress.GATE_BATCH_SIZES)) not in sizes
    assert ("ghost", max(regress.GATE_BATCH_SIZES)) in sizes
    assert {c.case.name for c in cells} == set(regress.GATE_CASES)


def test_injected_answers_the_same_and_holds_its_ballast(monkeypatch):
    fake = FakeImplementation(seconds_per_example=0.0)
    batch = FAKE_CASE.make_batch(4, 0, "cpu")
    model = FAKE_CASE.make_model(0, "cpu")
    model.seconds_per_example = 0.0
    seen = []
    real_empty = regress.torch.empty
    monkeypatch.setattr(
        regress.torch, "empty", lambda *a, **k: seen.append(a) or real_empty(*a, **k)
    )
    injected = Injected(fake, 3, extra_bytes=1000)
    assert injected.norms(model, FAKE_CASE.loss_fn, batch).equal(
        fake.norms(model, FAKE_CASE.loss_fn, batch)
    )
    injected.inner(model, FAKE_CASE.loss_fn, batch)
    assert fake.calls == {4: 3}  # one call each: the slowdown is a busy loop, not repeats
    assert seen.count((1000,)) == 2  # (the fake allocates its own, empty, buffers too)
    for bad in ((0.5, 0), (1, -1)):
        with pytest.raises(ValueError):
            Injected(fake, *bad)
    assert regress.parse_injection("ghost=2.5") == ("ghost", 2.5)
    assert regress.parse_injection("ghost=0", "--inject-memory", 0) == ("ghost", 0.0)
    for bad in ("ghost", "ghost=0.5", "=3", "ghost=x"):
        with pytest.raises(ValueError, match="IMPL=NUMBER"):
            regress.parse_injection(bad)


def test_end_to_end_on_the_fake_case():
    """The real sweep on a fake of known cost: per-round samples come back, a 10x injected
    slowdown regresses, a refusal stays a refusal. Margins are wide (10x against a 2x
    threshold); nothing here asserts a time."""
    settings = Settings(threads=1, rounds=4, min_run_time=0.01, budget_s=5.0, check=False)
    fake = FakeImplementation(seconds_per_example=0.002)
    cells = plan([FAKE_CASE], ["fake", "refuses"], quantities=["norms"], batch_sizes=[4])
    implementations = {"fake": fake, "refuses": Refuses()}
    reference = regress.measure(cells, settings, implementations, progress=False)
    by_name = {c.implementation: c for c in reference}
    assert by_name["fake"].status == "ok" and len(by_name["fake"].ratio_samples) == 4
    assert by_name["refuses"].status == "unsupported"
    slowed = {**implementations, "fake": Injected(fake, 10)}
    run = regress.measure(cells, settings, slowed, progress=False)
    verdicts = {(d.key[1], d.metric): d.verdict for d in decide(reference, run, LOOSE)}
    assert verdicts[("fake", "time")] == REGRESSION
    assert verdicts[("refuses", "status")] == NOT_GATED


def test_one_baseline_per_processor(tmp_path, monkeypatch):
    from bench.baseline import baseline_for, default_baseline, processor_slug

    assert processor_slug("Intel(R) Xeon(R) Processor") == "intel-r-xeon-r-processor"
    assert processor_slug("AMD EPYC") == "amd-epyc"
    monkeypatch.chdir(tmp_path)
    own = default_baseline("cpu", "AMD EPYC")
    assert own == Path("results/baseline-cpu-amd-epyc.json")
    assert baseline_for("cpu", "AMD EPYC") == own  # none at all: where one would be written
    other = Path("results/baseline-cpu-intel-r-xeon-r-processor.json")
    other.parent.mkdir()
    other.write_text("{}")
    assert baseline_for("cpu", "AMD EPYC") == other  # another processor's, for its counters
    own.write_text("{}")
    assert baseline_for("cpu", "AMD EPYC") == own


def test_times_are_not_gated_against_another_processor():
    from bench.regress import counters_comparable, environment_notes, times_comparable

    reference = Baseline([cell()], {"cpu": "Intel(R) Xeon(R) Processor", "torch_build": "x"}, {})
    here = {"cpu": "AMD EPYC", "torch_build": "x"}
    assert not times_comparable(reference, here)
    assert counters_comparable(reference, here)
    notes = environment_notes(reference, here, {})
    assert any("another processor: time ratios are not gated" in n for n in notes)
    same = {"cpu": "Intel(R) Xeon(R) Processor", "torch_build": "x"}
    assert times_comparable(reference, same)
    assert not any("not gated" in n for n in environment_notes(reference, same, {}))
