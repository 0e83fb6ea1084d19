"""Bad input to every command line is one line on stderr and exit code 2, checked before any
work, and leaves the files as they were: ``python -m bench`` (sweep, report, regress, compare)
and ``python -m correctness``.

The measured defects each have a test here; the last test drives every command's parsing and
checks with hypothesis-generated argument lists, the commands' work replaced by a stub (no
sweep runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import correctness.__main__ as correctness_main
from bench import __main__ as bench_main
from bench import regress, store
from bench.baseline import Baseline, write_baseline
from bench.gate import CellResult
from bench.tests.fakes import tiny_rows
from bench.tests.test_compare import TINY

ROOT = Path(__file__).resolve().parents[2]


def call(main, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)``; --help's SystemExit is its exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as done:
            code = done.code
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below ``folder``: (size, mtime in ns)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.stat()
        found[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return found


def assert_one_line(code: int, err: str, prefix: str, *expected: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert err.startswith(prefix), err
    for text in expected:
        assert text in err, err


def assert_refused(root: Path, argv, prefix: str, *expected: str, main=bench_main.main) -> None:
    """``main(argv)`` answers one line starting with ``prefix`` (and holding ``expected``),
    exit code 2, prints nothing on stdout, and leaves every file below ``root`` as it was."""
    before = snapshot(root)
    code, out, err = call(main, argv)
    assert_one_line(code, err, prefix, *expected)
    assert out == ""
    assert snapshot(root) == before


def results_folder(root: Path, rows=None, environment=None) -> Path:
    """A results folder with a tiny table and its environment.json."""
    folder = root / "cpu"
    folder.mkdir(parents=True)
    table = store.to_frame(tiny_rows() if rows is None else rows).to_csv(index=False)
    (folder / store.TABLE_NAME).write_text(table)
    environment = {"versions": {"torch": "x"}} if environment is None else environment
    (folder / store.ENVIRONMENT_NAME).write_text(json.dumps(environment))
    return root


# -- 1. non-positive batch sizes -----------------------------------------------------------------


@pytest.mark.parametrize("size", ["-3", "0"])
def test_sweep_rejects_non_positive_batch_sizes_before_measuring(tmp_path, size, monkeypatch):
    monkeypatch.setattr("bench.sweep.Sweep.run", lambda *a, **k: pytest.fail("measured"))
    argv = ["--batch-sizes", size, "--out", str(tmp_path)]
    assert_refused(tmp_path, argv, "sweep: argument --batch-sizes: ", "whole number from 1", size)
    assert snapshot(tmp_path) == {}


def test_through_a_subprocess_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--batch-sizes", "-3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line(done.returncode, done.stderr, "sweep: argument --batch-sizes")
    assert done.stdout == ""


# -- 2. numeric options in every command ---------------------------------------------------------

NUMERIC = {
    "sweep": ["--threads", "--rounds", "--budget", "--min-run-time", "--batch-sizes"],
    "regress": ["--threads", "--rounds", "--budget", "--min-run-time", "--batch-sizes"],
    "compare": ["--threads", "--rounds", "--budget", "--min-run-time", "--batch-sizes"],
    "floor": ["--threads", "--rounds", "--batch-size"],
}
NUMERIC["compare"].append("--check-batch-size")
BAD_NUMBERS = {
    "--confirm": ["-1", "x", "1.5"],
    "--alpha": ["0", "1.5", "nan"],
    "--threshold": ["-1", "inf"],
    "--counter-threshold": ["-0.5"],
}


def _numeric_cases():
    for command, options in NUMERIC.items():
        for option in options:
            for value in ("0", "-1", "nan", "x", "1e400"):
                yield command, option, value
    for option, values in BAD_NUMBERS.items():
        for value in values:
            yield "regress", option, value
    for value in ("0", "-2", "many", "100000"):
        yield "correctness", "--threads", value


@pytest.mark.parametrize("command, option, value", list(_numeric_cases()))
def test_numbers_out_of_range_are_refused(tmp_path, command, option, value):
    (tmp_path / "tiny.py").write_text(textwrap.dedent(TINY))
    argv = {
        "sweep": ["sweep", "--out", str(tmp_path / "results")],
        "regress": ["regress", "--baseline", str(tmp_path / "b.json"), "--update-baseline"],
        "compare": ["compare", str(tmp_path / "tiny.py")],
        "floor": ["floor", "mlp_mnist"],
        "correctness": [],
    }[command] + [option, value]
    main = correctness_main.main if command == "correctness" else bench_main.main
    prefix = f"{command}: argument {option}: must be "
    assert_refused(tmp_path, argv, prefix, repr(value), main=main)


# -- 3. foreign or malformed input files ---------------------------------------------------------

GOOD = tiny_rows()
FOREIGN_TABLES = {
    "another program's CSV": ("name,score\nalice,3\n", "no column 'device'"),
    "an empty file": ("", "not a readable CSV table"),
    "a bad batch size": (
        store.to_frame([dict(GOOD[0], batch_size=-3)]).to_csv(index=False),
        "line 2: batch_size '-3' is not a whole number",
    ),
    "an unknown status": (
        store.to_frame([GOOD[0], dict(GOOD[1], status="great")]).to_csv(index=False),
        "line 3: status 'great' is not one of",
    ),
    "text in a number column": (
        store.to_frame([dict(GOOD[0], ratio="fast")]).to_csv(index=False),
        "line 2: ratio 'fast' is not a number",
    ),
    "a path as a case name": (
        store.to_frame([dict(GOOD[0], case="../../etc")]).to_csv(index=False),
        "case '../../etc' is not a plain name",
    ),
    "a cell twice": (store.to_frame([GOOD[0], GOOD[0]]).to_csv(index=False), "appears twice"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_TABLES))
def test_report_refuses_a_table_it_did_not_write(tmp_path, name):
    text, expected = FOREIGN_TABLES[name]
    results_folder(tmp_path)
    table = tmp_path / "cpu" / store.TABLE_NAME
    table.write_text(text)
    (tmp_path / "REPORT.md").write_text("the previous report\n")
    # no REPORT.md, no plots written
    assert_refused(tmp_path, ["report", "--out", str(tmp_path)], f"report: {table}: ", expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1, 2]", "a JSON list, not an object"),
        ("{not json", "not readable JSON"),
        ('{"settings": "fast"}', "'settings' is not an object"),
    ],
)
def test_report_refuses_a_broken_environment(tmp_path, text, expected):
    results_folder(tmp_path)
    environment = tmp_path / "cpu" / store.ENVIRONMENT_NAME
    environment.write_text(text)
    argv = ["report", "--out", str(tmp_path)]
    assert_refused(tmp_path, argv, f"report: {environment}: ", expected)


def test_a_sweep_refuses_to_merge_into_a_foreign_table(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.sweep.Sweep.run", lambda *a, **k: pytest.fail("measured"))
    (tmp_path / "cpu").mkdir()
    table = tmp_path / "cpu" / store.TABLE_NAME
    table.write_text("name,score\nalice,3\n")
    argv = ["--cases", "mlp_mnist", "--impls", "ghost", "--out", str(tmp_path)]
    prefix = f"sweep: {table}: not a pegbench"
    assert_refused(tmp_path, argv, prefix, "--fresh starts an empty")
    args = bench_main.parse_and_validate([*argv, "--fresh"])  # replacing it is fine
    assert args.fresh and args.devices == ["cpu"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[]", "a JSON list, not an object"),
        ('{"format": "pegbench-regress-baseline/2", "cells": {}}', "no list of 'cells'"),
        (
            '{"format": "pegbench-regress-baseline/2", "cells": [{"case": "mlp_mnist", '
            '"implementation": "ghost", "quantity": "norms", "batch_size": 16, '
            '"status": "ok", "ratio": "fast"}]}',
            "cell 0 (ghost mlp_mnist 16): 'ratio' must be a number >= 0 or null",
        ),
        (
            '{"format": "pegbench-regress-baseline/2", "cells": [{"case": "mlp_mnist"}]}',
            "a cell has no 'implementation'",
        ),
        ("\x00\x01binary", "unreadable"),
    ],
)
def test_regress_refuses_a_malformed_baseline(tmp_path, monkeypatch, text, expected):
    monkeypatch.setattr(regress, "measure", lambda *a, **k: pytest.fail("measured"))
    path = tmp_path / "baseline.json"
    path.write_text(text)
    argv = ["regress", "--baseline", str(path)]
    assert_refused(tmp_path, argv, f"regress: baseline {path} is unreadable", expected)


def test_regress_checks_where_it_will_write(tmp_path, monkeypatch):
    monkeypatch.setattr(regress, "measure", lambda *a, **k: pytest.fail("measured"))
    (tmp_path / "a_folder").mkdir()
    argv = ["regress", "--baseline", str(tmp_path / "a_folder"), "--update-baseline"]
    assert_refused(tmp_path, argv, "regress: argument --baseline: ", "is not a file")
    argv = ["regress", "--update-baseline", "--baseline", str(tmp_path / "b.json")]
    argv += ["--save", str(tmp_path / "a_folder")]
    assert_refused(tmp_path, argv, "regress: argument --save: ", "is not a file")


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("")
    for command in ("sweep", "report"):
        argv = [command, "--out", str(tmp_path / "file")]
        assert_refused(tmp_path, argv, f"{command}: argument --out: ", "is not a folder")


# -- every command, fuzzed -----------------------------------------------------------------------


def _files(root: Path) -> dict[str, str]:
    """Input files of every kind a command may be handed (created once per test)."""
    root.mkdir(exist_ok=True)
    (root / "tiny.py").write_text(textwrap.dedent(TINY))
    (root / "broken.py").write_text("raise RuntimeError('no')\n")
    (root / "foreign.csv").write_text("name,score\nalice,3\n")
    (root / "garbage.bin").write_bytes(os.urandom(64))
    (root / "a_folder").mkdir(exist_ok=True)
    results_folder(root / "good_results")
    results_folder(root / "foreign_results")
    (root / "foreign_results" / "cpu" / store.TABLE_NAME).write_text("name,score\nalice,3\n")
    results_folder(root / "broken_environment", environment=[1, 2])
    cell = CellResult("mlp_mnist", "ghost", "norms", 16, "ok", ratio=2.0, ratio_samples=(2.0,))
    write_baseline(root / "baseline.json", Baseline([cell]))
    (root / "bad_baseline.json").write_text('{"format": "pegbench-regress-baseline/2"}')
    names = [
        "tiny.py",
        "broken.py",
        "foreign.csv",
        "garbage.bin",
        "a_folder",
        "good_results",
        "foreign_results",
        "broken_environment",
        "baseline.json",
        "bad_baseline.json",
        "missing/nowhere",
    ]
    return {name: str(root / name) for name in names}


NUMBERS = st.one_of(
    st.sampled_from(["0", "-1", "-3", "1", "2", "8", "16", "0.5", "1e6", "1e309", "nan", "inf"]),
    st.sampled_from(["-inf", "99999999999999999999999", "1_000", "0x10", " 4 ", "", "many"]),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
GARBAGE = st.one_of(
    st.sampled_from(["", "-", "--", "-h", "ghost=", "=3", "../x", "None"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6),
)


def _names(*known: str):
    """Mostly names the command knows, sometimes anything."""
    return st.one_of(st.sampled_from(known), st.sampled_from(known), GARBAGE)


IMPLS = _names("naive", "vmap", "hooks", "function", "ghost", "nope")
NAMES = {
    "impls": IMPLS,
    "cases": _names("mlp_mnist", "cnn_cifar", "lstm", "mlp", "transformer_t64"),
    "zoo": _names("mlp", "cnn", "lstm", "mlp_mnist"),
    "quantities": _names("norms", "gram", "per_param", "double_backward"),
    "device": _names("cpu", "cuda", "cuda:3", "meta", "cpu:0"),
    "injection": st.one_of(
        st.tuples(IMPLS, NUMBERS).map("=".join), st.sampled_from(["ghost", "ghost=10"]), GARBAGE
    ),
}

#: per command: option -> the kind of its value(s): "flag" (none), "number", "numbers",
#: "file", one name of NAMES, or "NAME+" (one or more)
OPTIONS = {
    "sweep": {
        "--device": "device+",
        "--cases": "cases+",
        "--impls": "impls+",
        "--quantities": "quantities+",
        "--batch-sizes": "numbers",
        "--out": "file",
        "--threads": "number",
        "--budget": "number",
        "--rounds": "number",
        "--min-run-time": "number",
        "--resume": "flag",
        "--fresh": "flag",
        "--quick": "flag",
        "--no-check": "flag",
        "--no-memory": "flag",
        "--no-report": "flag",
        "--no-progress": "flag",
    },
    "report": {"--out": "file"},
    "regress": {
        "--baseline": "file",
        "--threshold": "number",
        "--counter-threshold": "number",
        "--alpha": "number",
        "--no-time": "flag",
        "--update-baseline": "flag",
        "--repeat": "number",
        "--confirm": "number",
        "--save": "file",
        "--inject-slowdown": "injection",
        "--inject-memory": "injection",
        "--inject-materialise": "flag",
        "--device": "device",
        "--cases": "cases+",
        "--impls": "impls+",
        "--batch-sizes": "numbers",
        "--quantities": "quantities+",
        "--threads": "number",
        "--rounds": "number",
        "--min-run-time": "number",
        "--budget": "number",
        "--verbose": "flag",
        "--no-progress": "flag",
    },
    "compare": {
        "--quick": "flag",
        "--batch-sizes": "numbers",
        "--impls": "impls+",
        "--threads": "number",
        "--rounds": "number",
        "--min-run-time": "number",
        "--budget": "number",
        "--check-batch-size": "number",
        "--no-memory": "flag",
        "--out": "file",
        "--no-progress": "flag",
    },
    "floor": {
        "--batch-size": "number",
        "--quantity": "quantities",
        "--threads": "number",
        "--rounds": "number",
    },
    "correctness": {
        "--impls": "impls+",
        "--cases": "zoo+",
        "--quantities": "quantities+",
        "--threads": "number",
    },
}


@st.composite
def argument_lists(draw, command: str, files: dict[str, str]) -> list[str]:
    """``[COMMAND, --option value..., ...]``: known options with values of every kind, now and
    then a stray word; for compare a model file first (usually)."""
    file = st.sampled_from(sorted(files.values()))
    values = {
        "flag": st.just([]),
        "number": NUMBERS.map(lambda v: [v]),
        "numbers": st.lists(NUMBERS, min_size=1, max_size=3),
        "file": file.map(lambda v: [v]),
    }
    for kind, names in NAMES.items():
        values[kind] = names.map(lambda v: [v])
        values[kind + "+"] = st.lists(names, min_size=1, max_size=3)
    options = OPTIONS[command]
    option = st.sampled_from(sorted(options)).flatmap(
        lambda flag: values[options[flag]].map(lambda v: [flag, *v])
    )
    stray = GARBAGE.map(lambda v: [v])
    piece = st.integers(0, 9).flatmap(lambda k: stray if k == 0 else option)
    argv = [token for part in draw(st.lists(piece, max_size=4)) for token in part]
    if command == "compare" and draw(st.integers(0, 5)):
        argv.insert(0, draw(file))
    if command == "floor" and draw(st.integers(0, 5)):
        argv.insert(0, draw(NAMES["cases"]))
    prefix = {"sweep": draw(st.sampled_from([[], ["sweep"]])), "correctness": []}
    return prefix.get(command, [command]) + argv


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_command_answers_0_or_2_without_a_traceback(tmp_path, monkeypatch, command):
    files = _files(tmp_path / "inputs")
    monkeypatch.chdir(tmp_path)  # the default paths (results/...) point at nothing here
    ran = []
    for name, entry in bench_main.COMMANDS.items():
        stub = dataclasses.replace(entry, run=lambda args: ran.append(args) or 0)
        monkeypatch.setitem(bench_main.COMMANDS, name, stub)
    monkeypatch.setattr(correctness_main, "evaluate", lambda args: ran.append(args) or 0)
    main = correctness_main.main if command == "correctness" else bench_main.main

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(argv=argument_lists(command, files))
    def check(argv):
        before = snapshot(tmp_path)
        ran.clear()
        code, out, err = call(main, argv)
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
            assert not ran, argv
        else:
            assert err == "", (argv, err)
            assert ran or "usage:" in out, argv  # ran the (stub) work, or printed --help
        assert snapshot(tmp_path) == before, argv  # checking writes nothing

    check()
