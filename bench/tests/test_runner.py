"""The benchmark runner tested with fake implementations of known cost (see ``fakes``).

Bounds on times are generous: the fakes sleep, so their cost is known, but the machine may be
busy. No test here needs more than a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pandas as pd
import pytest
from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec

from bench import report, store
from bench.__main__ import main
from bench.memory import memray_available
from bench.store import ResultStore, read_table, write_atomically
from bench.sweep import Settings, Sweep, plan
from bench.tests.fakes import (
    FAKE_CASE,
    PLAIN_SECONDS_PER_EXAMPLE,
    FakeImplementation,
    Refuses,
    tiny_rows,
)
from bench.timing import CellTimeout, Stats, time_limit

FAST = Settings(threads=1, rounds=2, min_run_time=0.02, budget_s=5.0)


def sweep(tmp_path, implementations, batch_sizes=(16,), settings=FAST, resume=False, **kw):
    results = ResultStore(tmp_path / "cpu", keep=resume)
    runner = Sweep(results, settings, implementations, progress=False)
    cells = plan([FAKE_CASE], list(implementations), batch_sizes=batch_sizes, **kw)
    runner.run(cells)
    print(results.frame()[["implementation", "batch_size", "status", "reason", "correct"]])
    return results, runner


def rows_by_implementation(results):
    frame = results.frame()
    return {r["implementation"]: r for r in frame.to_dict("records")}


def test_known_cost_gives_known_ratio_and_memory(tmp_path):
    mib = 2**20
    fake = FakeImplementation(
        seconds_per_example=3 * PLAIN_SECONDS_PER_EXAMPLE, bytes_per_example=mib
    )
    results, _ = sweep(tmp_path, {"fake": fake}, batch_sizes=(16, 32), quantities=["norms"])
    frame = results.frame().sort_values("batch_size")
    assert list(frame["status"]) == ["ok", "ok"]
    assert list(frame["correct"]) == ["ok", "ok"]
    for row in frame.to_dict("records"):
        b = row["batch_size"]
        assert 2.0 < row["ratio"] < 5.0, row
        assert 0.7 * 0.003 * b < row["time_median_s"] < 2.0 * 0.003 * b + 0.01
        assert row["n_samples"] == len(store.samples(row["samples_s"])) >= 2
        if memray_available():
            assert b * mib <= row["memory_peak_bytes"] <= b * mib + 8 * mib
            assert row["plain_peak_bytes"] < mib
            assert row["memory_ratio"] > 10
        else:
            assert "memray" in row["memory_note"]
    # the table on disk is the one in memory
    on_disk = read_table(tmp_path / "cpu" / store.TABLE_NAME)
    assert len(on_disk) == 2 and set(on_disk["status"]) == {"ok"}


def test_iqr_flag():
    def stats(times):
        spec = TaskSpec(stmt="", setup="")
        return Stats.of(Measurement(number_per_run=1, raw_times=times, task_spec=spec))

    assert not stats([1.0, 1.01, 0.99, 1.02, 1.0]).noisy
    assert stats([1.0, 2.0, 1.0, 2.0, 1.0, 2.0]).noisy


def test_time_limit_never_interrupts_an_import(tmp_path, monkeypatch):
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(0.4)\nFINISHED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(CellTimeout), time_limit(0.1):
        import slow_to_import  # noqa: F401

        time.sleep(5)
    assert 0.35 < time.perf_counter() - started < 3
    assert sys.modules["slow_to_import"].FINISHED  # whole, not half-initialised
    del sys.modules["slow_to_import"]


def test_noisy_cell_is_flagged(tmp_path):
    fake = FakeImplementation(seconds_per_example=0.002, jitter=1.0)
    results, _ = sweep(
        tmp_path,
        {"jittery": fake},
        quantities=["norms"],
        settings=Settings(threads=1, rounds=4, min_run_time=0.01, budget_s=5.0),
    )
    row = rows_by_implementation(results)["jittery"]
    assert row["status"] == "ok"
    assert "noisy:" in row["flags"]


def test_a_noisy_cell_adds_rounds_only_within_its_budget(tmp_path):
    fake = FakeImplementation(seconds_per_example=0.002, jitter=1.0)
    settings = Settings(threads=1, rounds=1, noisy_rounds=50, min_run_time=0.1, budget_s=1.5)
    results = ResultStore(tmp_path / "cpu")
    runner = Sweep(results, settings, {"jittery": fake}, progress=False)
    (row,) = runner.run(plan([FAKE_CASE], ["jittery"], batch_sizes=(16,), quantities=["norms"]))
    # 50 more rounds of >= 0.2 s would blow the 1.5 s budget (a timeout row): the cell stops
    # adding them while the alarm is still far
    assert row["status"] == "ok", row["reason"]
    assert 1 <= len(row["round_ratios"]) < 10


def test_failures_become_rows_and_the_sweep_goes_on(tmp_path):
    implementations = {
        "refuses": Refuses(),
        "slow": FakeImplementation(seconds_per_example=1.0),  # 16 s a call, budget 1.5 s
        "oom": FakeImplementation(
            fail=RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")
        ),
        "broken": FakeImplementation(fail=ValueError("a bug")),
        "stalls": FakeImplementation(seconds_per_example=0.001, stall_at=16),  # check is B=8
        "fine": FakeImplementation(seconds_per_example=0.001),
    }
    settings = Settings(threads=1, rounds=1, min_run_time=0.01, budget_s=1.5)
    results, _ = sweep(tmp_path, implementations, settings=settings, quantities=["norms"])
    rows = rows_by_implementation(results)
    assert rows["refuses"]["status"] == "unsupported"
    assert "fake refuses" in rows["refuses"]["reason"]
    assert rows["slow"]["status"] == "timeout"
    assert rows["slow"]["wall_s"] < 4
    assert "oracle check" in rows["slow"]["reason"]  # already too slow on the check's batch
    assert rows["stalls"]["status"] == "timeout" and rows["stalls"]["correct"] == "ok"
    assert "one call ran past" in rows["stalls"]["reason"]
    assert rows["stalls"]["wall_s"] < 4
    assert rows["oom"]["status"] == "oom"
    assert rows["broken"]["status"] == "error"
    assert "ValueError: a bug" in rows["broken"]["reason"]
    assert rows["fine"]["status"] == "ok"


def test_wrong_answers_are_marked(tmp_path):
    results, _ = sweep(
        tmp_path, {"wrong": FakeImplementation(0.0005, wrong=True)}, quantities=["gram"]
    )
    row = rows_by_implementation(results)["wrong"]
    assert row["status"] == "ok" and row["correct"] == "WRONG", row["reason"]


def test_cells_that_would_blow_the_budget_are_skipped(tmp_path):
    fake = FakeImplementation(seconds_per_example=0.02)  # B=4: 0.08 s; B=64: 1.3 s
    settings = Settings(threads=1, rounds=1, min_run_time=0.01, budget_s=2.0)
    results, _ = sweep(
        tmp_path, {"loop": fake}, batch_sizes=(4, 64, 128), settings=settings, quantities=["norms"]
    )
    frame = results.frame().set_index("batch_size")
    assert frame.loc[4, "status"] == "ok"
    assert frame.loc[64, "status"] == "skipped"
    assert "extrapolated from B=4" in frame.loc[64, "reason"]
    assert frame.loc[128, "status"] == "skipped"
    assert 64 not in fake.calls and 128 not in fake.calls


def test_resume_measures_only_what_is_missing(tmp_path):
    fake = FakeImplementation(seconds_per_example=0.0005, interrupt_at=32)
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path, {"fake": fake}, batch_sizes=(16, 32, 64), quantities=["norms"])
    first = read_table(tmp_path / "cpu" / store.TABLE_NAME)
    assert list(first["batch_size"]) == [16]
    calls_at_16 = fake.calls[16]

    results, _ = sweep(
        tmp_path, {"fake": fake}, batch_sizes=(16, 32, 64), quantities=["norms"], resume=True
    )
    frame = results.frame().sort_values("batch_size")
    assert list(frame["batch_size"]) == [16, 32, 64]
    assert set(frame["status"]) == {"ok"}
    assert fake.calls[16] == calls_at_16  # not measured again
    kept = frame[frame["batch_size"] == 16].iloc[0]
    assert kept["measured_at"] == first.iloc[0]["measured_at"]
    assert kept["time_median_s"] == pytest.approx(first.iloc[0]["time_median_s"])

    # a store that does not keep the rows on disk starts afresh (the command's --fresh)
    results, _ = sweep(tmp_path, {"fake": fake}, batch_sizes=(64,), quantities=["norms"])
    assert list(read_table(results.path)["batch_size"]) == [64]


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    write_atomically(path, "old\n")

    def broken_replace(source, target):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomically(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temporary left


def test_plan_orders_batch_sizes_outermost():
    cells = plan([FAKE_CASE], ["a", "b"], batch_sizes=[64, 16], quantities=["norms", "gram"])
    assert [c.batch_size for c in cells] == [16] * 4 + [64] * 4
    assert [(c.quantity, c.implementation) for c in cells[:4]] == [
        ("norms", "a"),
        ("norms", "b"),
        ("gram", "a"),
        ("gram", "b"),
    ]


def test_report_from_a_tiny_table(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / store.TABLE_NAME).write_text(store.to_frame(tiny_rows()).to_csv(index=False))
    (folder / store.ENVIRONMENT_NAME).write_text(
        json.dumps({"versions": {"torch": "x"}, "threads": 1})
    )
    best = report.fastest(read_table(folder / store.TABLE_NAME))
    assert set(best["implementation"]) == {"quick"}  # the WRONG one never wins

    path = report.write_report(tmp_path)
    text = path.read_text()
    assert "## Headline (cpu)" in text
    assert "| fake norms | quick 1.20x | quick 1.20x |" in text
    assert "1.20x~" in text  # the noisy cell is marked
    assert "timeout" in text and "ran past its 1 s budget" in text
    assert "oracle check **WRONG**" in text
    assert "5.00x (5 MiB)" in text
    if report.plot_case(pd.DataFrame(tiny_rows()), tmp_path / "probe.png") is not None:
        assert (folder / "plots" / "fake.png").stat().st_size > 1000
        assert "](cpu/plots/fake.png)" in text


def test_a_plain_environment_degrades_gracefully(tmp_path, monkeypatch):
    for module in ("memray", "matplotlib", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    results, _ = sweep(tmp_path, {"fake": FakeImplementation(0.0005)}, quantities=["norms"])
    row = rows_by_implementation(results)["fake"]
    assert row["status"] == "ok" and row["memory_note"].startswith("memray not installed")
    text = report.write_report(tmp_path).read_text()
    assert "matplotlib is not installed" in text and "| fake | " in text


def test_cli_report_and_bad_arguments(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert "No results yet" in (tmp_path / "REPORT.md").read_text()
    assert main(["--impls", "no_such_implementation", "--out", str(tmp_path)]) == 2
    assert main(["--cases", "no_such_case", "--out", str(tmp_path)]) == 2
    assert "unknown" in capsys.readouterr().err
