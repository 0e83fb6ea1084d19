"""The agreement harness in low precision, on representative cases: an MLP, a small transformer
(Embedding, attention, LayerNorm) and a CNN (grouped, strided, reflect-padded convolutions).

Every implementation, in bf16 parameters and under bf16 autocast, is ok within the precision's
tolerance or refuses with a one-line reason (``correctness.precision``), never WRONG and never a
crash; each status matches the precision's committed snapshot
(``correctness/status-NAME.json``). The tolerances are not below what a plain per-example loop
in the precision gets on these cases (``--rounding`` measures the whole zoo).
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import correctness.__main__ as correctness_main
import impls
from correctness import precision as precisions
from correctness import status
from correctness.harness import QUANTITIES, check, loop_rounding, problem

CASES = ("mlp", "transformer", "cnn")
LOW = ("bf16", "autocast-bf16")
SNAPSHOTS = {name: status.load(status.path_for(name)) for name in precisions.PRECISIONS}

#: must answer every quantity (the double backward included) wherever gradients are defined
MUST_ANSWER = {"naive": QUANTITIES, "ghost": QUANTITIES,
               "hooks": tuple(q for q in QUANTITIES if q != "double_backward")}  # fmt: skip


@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", impls.names())
def test_agrees_with_oracle_in_low_precision(implementation, case, precision):
    outcomes = [check(implementation, case, q, precision) for q in QUANTITIES]
    failures = [f"{o.quantity}: {o.status} {o.detail}" for o in outcomes if o.failed]
    assert not failures, "\n".join(failures)
    changed = status.differences(outcomes, SNAPSHOTS[precision])
    assert not changed, "\n".join(changed)
    for o in outcomes:
        if o.status == "unsupported":
            assert o.detail and "\n" not in o.detail, f"refusal needs a one-line reason: {o}"
    refused = [
        f"{o.quantity}: {o.detail}"
        for o in outcomes
        if o.status == "unsupported" and o.quantity in MUST_ANSWER.get(implementation, ())
    ]
    assert not refused, "\n".join(refused)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_ghost_in_float32_and_float64(precision):
    """The wider precisions convert the case too (a float32 case made float64 and back)."""
    outcomes = [check("ghost", "transformer", q, precision) for q in QUANTITIES]
    assert all(o.status == "ok" for o in outcomes), outcomes
    assert problem("transformer", precision).model.blocks[0].ln1.weight.dtype == getattr(
        torch, precision
    )


@pytest.mark.parametrize("precision", LOW)
def test_tolerances_are_not_below_a_loops_rounding(precision):
    chosen = precisions.get(precision)
    for case in CASES:
        for quantity, error in loop_rounding(case, precision).items():
            derived = precisions.tolerance_from(error, chosen.floor)
            assert derived <= chosen.tolerance_for(quantity), (case, quantity, error)


def test_a_far_worse_answer_is_wrong(monkeypatch):
    """An implementation whose norms are 5% off is WRONG in bf16, however coarse bf16 is."""
    ghost = impls.get("ghost")
    original = type(ghost).norms

    def off(self, *args, **kwargs):
        return original(self, *args, **kwargs) * 1.05

    monkeypatch.setattr(type(ghost), "norms", off)
    outcome = check("ghost", "mlp", "norms", "bf16")
    assert outcome.status == "WRONG" and outcome.error > precisions.get("bf16").tolerance["norms"]


def test_problem_holds_the_converted_model_and_batch():
    p = problem("transformer", "bf16")
    assert {q.dtype for q in p.model.parameters()} == {torch.bfloat16}
    tokens, targets = p.batch
    assert tokens.dtype == torch.long and targets.dtype == torch.long  # indices untouched
    p = problem("mlp", "autocast-bf16")
    assert {q.dtype for q in p.model.parameters()} == {torch.float32}
    assert p.batch[0].dtype == torch.float32


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = correctness_main.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "bf8"], "argument --dtype: invalid choice"),
        (["--rounding"], "--rounding measures a precision: give it with --dtype"),
        (["--dtype", "bf16", "--rounding", "--update-status"], "there is no status to update"),
    ],
)
def test_bad_precision_arguments_are_one_line(argv, message):
    code, out, err = _run(argv)
    assert code == 2 and not out
    assert err.count("\n") == 1 and message in err and err.startswith("correctness: ")


def test_rounding_command_prints_the_loop_and_the_tolerances():
    code, out, _ = _run(["--dtype", "bf16", "--rounding", "--cases", "mlp"])
    assert code == 0
    assert "a plain per-example loop in bf16" in out
    for family, tolerance in precisions.get("bf16").tolerance.items():
        assert f"{family}: loop's largest error" in out and f"stated {tolerance:g}: ok" in out


def test_matrix_command_in_a_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(status, "PATH", tmp_path / "status.json")
    code, out, _ = _run(["--dtype", "autocast-bf16", "--cases", "mlp", "--impls", "ghost"])
    assert code == 0
    assert "precision autocast-bf16" in out and "in autocast-bf16: max relative error" in out
    assert "6 statuses differ from status-autocast-bf16.json" in out  # an empty snapshot here
    code, out, _ = _run(["--dtype", "autocast-bf16", "--cases", "mlp", "--impls", "ghost",
                         "--update-status"])  # fmt: skip
    assert code == 0 and (tmp_path / "status-autocast-bf16.json").exists()
    assert not (tmp_path / "status.json").exists()
