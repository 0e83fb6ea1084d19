"""The bench's dtype axis (``bench.precision``): cells per precision, the ``dtype`` column, the
plain step under autocast, and a report that keeps the dtypes apart."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stderr, redirect_stdout

import torch

from bench import precision, store
from bench.__main__ import main, sweep_dtypes
from bench.cases import LOW_PRECISION, get_case
from bench.sweep import plain_step, plan
from bench.tests.fakes import FAKE_CASE, tiny_rows

QUICK = ["--no-memory", "--rounds", "1", "--min-run-time", "0.01", "--threads", "1",
         "--no-progress"]  # fmt: skip


def test_cells_per_precision_have_their_own_keys():
    cells = plan([FAKE_CASE], ["ghost"], quantities=["norms"], batch_sizes=[4],
                 dtypes=[None, "bf16", "autocast-bf16"])  # fmt: skip
    assert [c.dtype for c in cells] == ["float32", "bf16", "autocast-bf16"]
    assert len({c.key for c in cells}) == 3 and len({c.group for c in cells}) == 3
    bf16 = cells[1].case
    assert bf16.name == "fake" and bf16.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.make_model().parameters()} == {torch.bfloat16}
    inputs, targets = bf16.make_batch(4)
    assert inputs.dtype == torch.bfloat16 and targets.dtype == torch.long
    autocast = cells[2].case
    assert {p.dtype for p in autocast.make_model().parameters()} == {torch.float32}
    # the case's own precision is the case itself
    assert precision.in_precision(FAKE_CASE, "float32") is FAKE_CASE


def test_the_quick_sweep_adds_low_precision_for_the_mlp_and_the_transformer():
    cases = [get_case(name) for name in ("mlp_mnist", "transformer_t64", "cnn_cifar")]
    quick = sweep_dtypes(argparse.Namespace(dtypes=None, quick=True), cases)
    assert quick == {"mlp_mnist": [None, *LOW_PRECISION["mlp_mnist"]],
                     "transformer_t64": [None, *LOW_PRECISION["transformer_t64"]],
                     "cnn_cifar": [None]}  # fmt: skip
    full = sweep_dtypes(argparse.Namespace(dtypes=None, quick=False), cases)
    assert all(d == [None] for d in full.values())
    chosen = sweep_dtypes(argparse.Namespace(dtypes=["bf16"], quick=True), cases)
    assert all(d == ["bf16"] for d in chosen.values())


def test_plain_step_runs_the_forward_under_autocast_and_the_backward_outside():
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            seen["forward"] = torch.is_autocast_enabled("cpu")
            out = self.linear(x)
            out.register_hook(lambda g: seen.update(backward=torch.is_autocast_enabled("cpu")))
            return out

    model, batch = Spy(), FAKE_CASE.make_batch(4)
    step = plain_step(model, FAKE_CASE.loss_fn, batch,
                      lambda: torch.autocast("cpu", dtype=torch.bfloat16))  # fmt: skip
    step()
    assert seen == {"forward": True, "backward": False}
    assert model.linear.weight.grad.dtype == torch.float32


def test_a_table_without_the_dtype_column_reads_as_float32(tmp_path):
    old = store.to_frame(tiny_rows()).drop(columns="dtype")
    (tmp_path / store.TABLE_NAME).write_text(old.to_csv(index=False))
    frame = store.read_table(tmp_path / store.TABLE_NAME)
    assert set(frame["dtype"]) == {store.DEFAULT_DTYPE}
    assert store.cell_key(tiny_rows()[0])[-1] == store.DEFAULT_DTYPE


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_an_unknown_dtype_is_one_line(tmp_path):
    code, out, err = _run(["--dtype", "bf8", "--out", str(tmp_path)])
    assert code == 2 and not out and err.count("\n") == 1
    assert err.startswith("sweep: argument --dtype/--dtypes: invalid choice: 'bf8'")


def test_dtype_is_refused_under_nproc(tmp_path):
    code, out, err = _run(["--dtype", "bf16", "--nproc", "2", "--out", str(tmp_path)])
    assert code == 2 and not out
    assert err == "sweep: --dtype runs in one process only: not with --nproc\n"


def test_a_sweep_in_two_precisions_and_its_report(tmp_path):
    argv = ["--cases", "mlp_mnist", "--impls", "ghost", "--batch-sizes", "16", "--quantities",
            "norms", "--dtype", "bf16", "autocast-bf16", "--out", str(tmp_path),
            *QUICK]  # fmt: skip
    code, out, _ = _run(argv)
    assert code == 0, out
    frame = store.read_table(tmp_path / "cpu" / store.TABLE_NAME)
    assert list(frame["dtype"]) == ["bf16", "autocast-bf16"]
    assert set(frame["status"]) == {"ok"} and set(frame["correct"]) == {"ok"}
    text = (tmp_path / "REPORT.md").read_text()
    assert "### mlp_mnist in bf16" in text and "### mlp_mnist in autocast-bf16" in text
    assert "| mlp_mnist in bf16 norms | ghost" in text
    assert "In autocast-bf16: float32 parameters, called inside torch.autocast" in text
    # a float32 sweep of the same cell adds its row beside them
    code, _, _ = _run([*argv[: argv.index("--dtype")], "--out", str(tmp_path), *QUICK])
    frame = store.read_table(tmp_path / "cpu" / store.TABLE_NAME)
    assert code == 0 and sorted(frame["dtype"]) == ["autocast-bf16", "bf16", "float32"]
    text = (tmp_path / "REPORT.md").read_text()
    assert text.index("### mlp_mnist\n") < text.index("### mlp_mnist in bf16")


def test_the_quick_plan_measures_low_precision_at_the_smallest_size(monkeypatch, tmp_path):
    from bench import __main__ as bench_main
    from bench import sweep

    planned = []
    monkeypatch.setattr(sweep.Sweep, "run", lambda self, cells, remeasure: planned.extend(cells))
    argv = ["--quick", "--cases", "mlp_mnist", "--impls", "ghost", "--no-report"]
    args = bench_main.parse_and_validate([*argv, "--out", str(tmp_path)])
    bench_main.run_sweep(args)
    sizes = {}
    for cell in planned:
        sizes.setdefault(cell.dtype, set()).add(cell.batch_size)
    assert sizes == {"float32": {16, 64}, "bf16": {16}, "autocast-bf16": {16}}
