"""``bench.compare`` from a notebook: the table it returns, its verdict, the same recommendation
as ``python -m bench compare`` prints for the same case, mapping inputs and targets, and bad
arguments refused before anything is measured."""

from __future__ import annotations

import runpy
import textwrap

import pytest
import torch
from torch import nn

import bench
from bench import user_model
from bench.__main__ import main
from bench.sweep import Sweep, plain_step
from bench.tests.test_compare import TINY

NAMES = ["naive", "ghost"]
#: short timing, no memory reading, no progress bar
QUICK = dict(quick=True, memory=False, rounds=1, min_run_time=0.01, progress=False)
COLUMNS = (
    "implementation",
    "quantity",
    "batch_size",
    "status",
    "reason",
    "correct",
    "check_error",
    "ratio",
    "memory_ratio",
    "time_median_s",
)


def test_compare_returns_the_table_and_the_command_prints_its_recommendation(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent(TINY))
    model, loss_fn, make_batch = runpy.run_path(str(path))["make_case"]()
    measured, run = [], Sweep.run

    def recording(self, cells, remeasure=False):
        measured.append(run(self, cells, remeasure))
        return measured[-1]

    monkeypatch.setattr(Sweep, "run", recording)
    frame = bench.compare(
        model, loss_fn, make_batch, implementations=NAMES, batch_sizes=[4, 8], **QUICK
    )

    assert set(COLUMNS) <= set(frame.columns)
    cells = {(r.implementation, r.quantity, r.batch_size) for r in frame.itertuples()}
    # two implementations and the floor (measured beside them), two quantities, two sizes
    assert len(frame) == len(cells) == 3 * 2 * 2
    assert {name for name, _, _ in cells} == {*NAMES, "floor"}
    assert set(frame["status"]) == {"ok"} and (frame["ratio"] > 0).all()
    checked = frame[frame["implementation"] != "floor"]
    assert set(checked["correct"]) == {"ok"} and (checked["check_error"] < 1e-4).all()
    assert set(frame[frame["implementation"] == "floor"]["correct"]) == {"unchecked"}
    assert frame["memory_ratio"].isna().all()  # memory=False
    assert frame.attrs["batch_sizes"] == [4, 8] and frame.attrs["implementations"] == NAMES
    for batch_size in (4, 8):
        name = frame.attrs["recommended"][batch_size]
        assert name in NAMES
        line = frame.attrs["recommendation"][batch_size]
        assert line.startswith(f"recommendation: {name}: correct on norms and Gram")
        assert frame.attrs["verdict"][batch_size].endswith(line)
    assert frame.attrs["agreement"].startswith("agreement with the float64 oracle on 8 examples")

    # the command on the same file, fed the same measurements (timings differ between runs)
    monkeypatch.setattr(Sweep, "run", lambda self, cells, remeasure=False: measured[0])
    argv = ["compare", str(path), "--impls", *NAMES, "--quick", "--batch-sizes", "4", "8"]
    code = main([*argv, "--no-memory", "--rounds", "1", "--min-run-time", "0.01", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    printed = [line for line in out.splitlines() if line.startswith("recommendation: ")]
    assert printed == [frame.attrs["recommendation"][4], frame.attrs["recommendation"][8]]
    assert frame.attrs["agreement"] in out
    assert all(frame.attrs["verdict"][b] in out for b in (4, 8))


class Masked(nn.Module):
    """A model called with keywords: ``model(tokens=..., mask=..., scale=2.0)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens, mask, scale=1.0):
        hidden = self.embed(tokens) * mask.unsqueeze(-1)
        return self.head(hidden.sum(1)) * scale


def masked_case():
    torch.manual_seed(0)
    model = Masked()

    def loss_fn(outputs, targets):
        losses = nn.functional.cross_entropy(outputs, targets["label"], reduction="none")
        return losses * targets["weight"]

    def make_batch(batch_size):
        inputs = {
            "tokens": torch.randint(0, 10, (batch_size, 5)),
            "mask": torch.ones(batch_size, 5),
            "scale": 2.0,  # not a Tensor: passed through
        }
        targets = {"label": torch.randint(0, 3, (batch_size,)), "weight": torch.rand(batch_size)}
        return inputs, targets

    return model, loss_fn, make_batch


def test_mapping_inputs_and_targets():
    model, loss_fn, make_batch = masked_case()
    case = user_model.case_from(model, loss_fn, make_batch)  # probes model(**inputs)
    assert case.name == "Masked"
    plain_step(model, loss_fn, make_batch(3))()
    assert model.head.weight.grad is not None
    frame = bench.compare(
        model, loss_fn, make_batch, implementations=["naive"], batch_sizes=4, **QUICK
    )
    naive = frame[frame["implementation"] == "naive"]
    assert list(naive["status"]) == ["ok", "ok"] and list(naive["correct"]) == ["ok", "ok"]
    assert frame.attrs["recommended"] == {4: "naive"}


@pytest.mark.parametrize(
    "batch, expected",
    [
        (({1: torch.zeros(2, 3)}, torch.zeros(2)), "a dict of inputs needs names"),
        (({"x": "text"}, torch.zeros(2)), "inputs must be a Tensor, a tuple of Tensors or a dict"),
        (({"x": torch.zeros(3, 4)}, torch.zeros(2)), "every input needs the batch dimension"),
        ((torch.zeros(2, 4), {"y": torch.zeros(5)}), "targets need the batch dimension first"),
    ],
)
def test_mapping_mistakes_are_one_line(batch, expected):
    with pytest.raises(user_model.UserModelError, match=expected):
        user_model.check_batch(batch, 2, "make_batch(2)")


def test_bad_arguments_are_refused_before_measuring(monkeypatch):
    monkeypatch.setattr(Sweep, "run", lambda *a, **k: pytest.fail("measured"))
    model, loss_fn, make_batch = masked_case()
    for keywords, expected in (
        (dict(threads=0), "threads must be a whole number from 1 to 1024; got 0"),
        (dict(batch_sizes=[8, -1]), "batch_sizes must be a whole number from 1"),
        (dict(budget=float("nan")), "budget must be a number > 0"),
        (dict(implementations=["nope"]), "unknown implementation 'nope'; known: naive"),
    ):
        with pytest.raises(ValueError, match=expected):
            bench.compare(model, loss_fn, make_batch, **keywords)
    with pytest.raises(user_model.UserModelError, match="the model must be a torch.nn.Module"):
        bench.compare("model", loss_fn, make_batch)
    with pytest.raises(user_model.UserModelError, match="^loss_fn must return per-example"):
        bench.compare(model, lambda outputs, targets: outputs.sum(), make_batch)
