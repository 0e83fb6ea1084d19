"""``python -m bench compare``: a short real run on a tiny model, the example file's loading,
and every bad input giving one line on stderr and exit code 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from bench import user_model
from bench.__main__ import main

ROOT = Path(__file__).resolve().parents[2]

TINY = """
import torch
from torch import nn


def loss_fn(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def make_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def make_batch(batch_size):
        return torch.randn(batch_size, 4), torch.randint(0, 3, (batch_size,))

    return model, loss_fn, make_batch
"""

#: name -> (file text, what the error line must say)
BAD_FILES = {
    "no_make_case": ("x = 1\n", "does not define make_case()"),
    "raises_on_import": (
        "import torch\nraise RuntimeError('no GPU here')\n",
        "importing it raised RuntimeError: no GPU here (raises_on_import.py:2)",
    ),
    "syntax_error": ("def make_case(:\n", "SyntaxError"),
    "exits_on_import": ("import sys\nsys.exit(3)\n", "importing it raised SystemExit: 3"),
    "wrong_shape": (
        "def make_case():\n    return 1, 2\n",
        "make_case() must return (model, loss_fn, make_batch); it returned a tuple of 2",
    ),
    "not_a_module": (
        TINY.replace("return model, loss_fn", "return 'model', loss_fn"),
        "the model, must be a torch.nn.Module; got a str",
    ),
    "make_case_raises": (
        "def make_case():\n    raise KeyError('checkpoint')\n",
        "make_case() raised KeyError: 'checkpoint' (make_case_raises.py:2)",
    ),
    "forward_fails": (
        TINY.replace("torch.randn(batch_size, 4)", "torch.randn(batch_size, 5)"),
        "the model's forward failed on make_batch(2) (inputs [2, 5]): RuntimeError: mat1 and mat2",
    ),
    "loss_is_a_mean": (
        TINY.replace('reduction="none"', 'reduction="mean"'),
        "loss_fn must return per-example losses, a Tensor of shape [2] for a batch of 2; "
        "it returned a Tensor of shape [] (a mean or a sum? use reduction='none')",
    ),
    "loss_wrong_shape": (
        TINY.replace('reduction="none")', 'reduction="none").unsqueeze(1)'),
        "it returned a Tensor of shape [2, 1]",
    ),
    "batch_not_a_pair": (
        TINY.replace(
            "return torch.randn(batch_size, 4),", "return [torch.randn(batch_size, 4)] or"
        ),
        "make_batch(2) must return (inputs, targets); it returned a list of 1",
    ),
    "targets_wrong_batch": (
        TINY.replace("(batch_size,))", "(batch_size + 1,))"),
        "targets need the batch dimension first (2); got shape [3]",
    ),
    "frozen": (
        TINY.replace(
            "    return model, loss_fn",
            "    model.requires_grad_(False)\n    return model, loss_fn",
        ),
        "the model has no trainable parameters",
    ),
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    line = captured.err.strip()
    assert line.startswith("compare: "), line
    return line


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_gives_one_line_and_exit_2(tmp_path, capsys, name):
    text, expected = BAD_FILES[name]
    path = write(tmp_path, name, text)
    assert main(["compare", str(path), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert str(path) in line


def test_missing_file(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nowhere.py")]) == 2
    assert one_error_line(capsys) == f"compare: no such file: {tmp_path / 'nowhere.py'}"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch-sizes", "0"], "argument --batch-sizes: must be a whole number from 1 to"),
        (["--batch-sizes", "8", "-3"], "argument --batch-sizes: must be a whole number from 1"),
        (["--impls", "nonexistent"], "unknown implementation 'nonexistent'; known: naive"),
        (["--check-batch-size", "0"], "argument --check-batch-size: must be a whole number"),
        (["--threads", "0"], "argument --threads: must be a whole number from 1 to 1024; got '0'"),
        (["--rounds", "x"], "argument --rounds: must be a whole number >= 1; got 'x'"),
        (["--budget", "0"], "argument --budget: must be a number > 0 and <= 1e+06; got '0'"),
        (["--min-run-time", "nan"], "argument --min-run-time: must be a number > 0"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_options(tmp_path, capsys, extra, expected):
    path = write(tmp_path, "tiny", TINY)
    assert main(["compare", str(path), *extra]) == 2
    assert expected in one_error_line(capsys)


def test_through_a_subprocess_exit_code_and_one_stderr_line(tmp_path):
    path = write(tmp_path, "forward_fails", BAD_FILES["forward_fails"][0])
    done = subprocess.run(
        [sys.executable, "-m", "bench", "compare", str(path), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "the model's forward failed" in done.stderr and "Traceback" not in done.stderr


def test_tiny_model_verdict(tmp_path, capsys):
    path = write(tmp_path, "tiny", TINY)
    code = main(
        [
            "compare",
            str(path),
            "--impls",
            "naive",
            "ghost",
            "function",
            "--batch-sizes",
            "4",
            "--rounds",
            "1",
            "--min-run-time",
            "0.01",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert "agreement with the float64 oracle on 8 examples" in out
    assert "B=4: a plain forward+backward takes" in out
    for name in ("naive", "ghost", "function"):
        assert f"\n{name} " in out
    assert "fastest: norms " in out and "smallest memory: " in out
    assert "recommendation: " in out
    assert "WRONG" not in out


def test_the_example_file_loads():
    case = user_model.load(ROOT / "examples" / "small_transformer.py")
    assert case.name == "small_transformer"
    inputs, targets = case.make_batch(3)
    assert inputs.shape[0] == targets.shape[0] == 3
    assert case.parameter_count > 0 and case.device == "cpu"


def test_a_batch_size_where_every_correct_implementation_ran_out_of_budget():
    """Not "no implementation answers this model correctly": the ones that agree with the
    oracle are named, with what to do (measured on examples/gpt2.py --quick at B=32)."""
    from bench import verdict

    rows = [
        {"implementation": name, "quantity": q, "batch_size": 32, "status": status,
         "correct": correct, "ratio": None, "memory_ratio": None}
        for name, status, correct in (
            ("ghost", "timeout", "ok"), ("naive", "skipped", "ok"),
            ("backpack", "unsupported", "unsupported"),
        )
        for q in ("norms", "gram")
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    name, line = verdict.recommend(frame, ["ghost", "naive", "backpack"], 32)
    assert name is None
    assert line.startswith("recommendation: none measured at this batch size: ghost, naive agree")
    refused = frame[frame.implementation == "backpack"]
    assert "answers this model correctly" in verdict.recommend(refused, ["backpack"], 32)[1]
