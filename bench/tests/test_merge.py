"""A sweep updates the table: the cells it measures replace their rows, every other row stays,
and the report is regenerated from the whole table. ``--fresh`` starts an empty table,
``--resume`` measures only what is missing, and a sweep interrupted before its first cell leaves
every file as it was.

Each test runs the real command on one or two cheap cells (ghost on the MLP at B=16, one short
round, no memory reading) against a hand-made table of another case.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench import store
from bench.__main__ import main
from bench.sweep import Sweep
from bench.tests.fakes import tiny_rows
from bench.tests.test_cli import snapshot

EARLIER = "2020-01-01T00:00:00+00:00"
CELL = ["--cases", "mlp_mnist", "--impls", "ghost", "--batch-sizes", "16"]
QUICK = ["--no-memory", "--rounds", "1", "--min-run-time", "0.01", "--threads", "1"]
SWEEP = [*CELL, "--quantities", "norms", "gram", *QUICK, "--no-progress"]
#: the row of the cell the sweep measures again, as an earlier sweep left it
STALE = dict(
    tiny_rows()[0],
    case="mlp_mnist",
    implementation="ghost",
    batch_size=16,
    ratio=999.0,
    measured_at=EARLIER,
)


@pytest.fixture
def results(tmp_path):
    """A results folder as an earlier sweep left it: the fake case's rows and one stale row of
    the cell the sweep measures (ghost, mlp_mnist, B=16, norms)."""
    folder = tmp_path / "cpu"
    folder.mkdir()
    rows = [dict(r, measured_at=EARLIER) for r in tiny_rows()] + [STALE]
    (folder / store.TABLE_NAME).write_text(store.to_frame(rows).to_csv(index=False))
    earlier = {"recorded_at": EARLIER, "git_commit": "earlier", "settings": {"rounds": 9}}
    (folder / store.ENVIRONMENT_NAME).write_text(json.dumps(earlier))
    (tmp_path / "REPORT.md").write_text("the earlier report\n")
    return tmp_path


def table(root):
    return store.read_table(root / "cpu" / store.TABLE_NAME)


def assert_same_other_rows(after, before):
    """The rows of the case the sweep did not measure, value for value."""

    def others(frame):
        return frame[frame["case"] == "fake"].reset_index(drop=True)

    # (a number column turns float where a new row leaves it empty: values, not dtypes)
    pd.testing.assert_frame_equal(others(after), others(before), check_dtype=False)


def test_a_partial_sweep_keeps_every_other_row(results):
    before = table(results)
    assert main([*SWEEP, "--out", str(results)]) == 0
    after = table(results)
    assert len(after) == len(before) + 1  # norms replaced, gram added
    assert_same_other_rows(after, before)
    ours = after[after["case"] == "mlp_mnist"].set_index("quantity")
    assert set(ours.index) == {"norms", "gram"} and set(ours["status"]) == {"ok"}
    assert ours.loc["norms", "ratio"] != 999.0 and ours.loc["norms", "measured_at"] > EARLIER
    environment = store.read_environment(results / "cpu")
    assert environment["previous"][0]["git_commit"] == "earlier"
    report = (results / "REPORT.md").read_text()
    assert "### fake" in report and "### mlp_mnist" in report  # from the merged table
    assert "merged table: 7 of 9 rows were measured by earlier sweeps" in report


def test_fresh_starts_an_empty_table(results):
    assert main([*SWEEP, "--fresh", "--no-report", "--out", str(results)]) == 0
    after = table(results)
    assert list(after["case"]) == ["mlp_mnist"] * 2
    assert "previous" not in store.read_environment(results / "cpu")


def test_an_interrupted_sweep_keeps_the_table_and_resume_finishes_it(results, monkeypatch):
    measure, calls = Sweep.measure, []

    def interrupted_at_the_second_cell(self, cell):
        calls.append(cell.quantity)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(self, cell)

    monkeypatch.setattr(Sweep, "measure", interrupted_at_the_second_cell)
    before = table(results)
    with pytest.raises(KeyboardInterrupt):
        main([*SWEEP, "--out", str(results)])
    after = table(results)
    assert_same_other_rows(after, before)
    ours = after[after["case"] == "mlp_mnist"]
    assert list(ours["quantity"]) == ["norms"] and ours["ratio"].iloc[0] != 999.0
    assert (results / "REPORT.md").read_text() == "the earlier report\n"

    calls.clear()
    assert main([*SWEEP, "--resume", "--no-report", "--out", str(results)]) == 0
    assert calls == ["gram"]  # norms is in the table already
    assert len(table(results)) == len(before) + 1


def test_interrupted_before_the_first_cell_changes_nothing(results, monkeypatch):
    def interrupted(self, cell):
        raise KeyboardInterrupt

    monkeypatch.setattr(Sweep, "measure", interrupted)
    before = snapshot(results)
    for extra in ([], ["--fresh"]):
        with pytest.raises(KeyboardInterrupt):
            main([*SWEEP, *extra, "--out", str(results)])
        assert snapshot(results) == before
