"""The gate's deterministic counters (``bench.counters``, ``bench.memory`` with allocated=True)
on real calls: known FLOPs of a Linear forward and backward, equal counts on repeated calls,
and ghost forced to materialise counting more work while giving the same answer."""

from __future__ import annotations

import pytest
import torch

import impls
from bench import counters, memory
from correctness.cases import get_case
from impls.factors import COSTS


def test_flops_and_operators_of_a_linear_step():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)

    def step():
        layer(x).sum().backward()

    counted = counters.count(step)
    # forward 2*5*8*4; backward: the weight's gradient (2*5*8*4); x needs no gradient
    assert counted.flops == 2 * (2 * 5 * 8 * 4)
    assert counted.operators > 3 and counted.note == ""
    assert counters.count(step) == counted  # deterministic


def test_a_failing_call_is_not_counted_and_says_why():
    def boom():
        raise RuntimeError("no dispatch mode here\nsecond line")

    counted = counters.count(boom)
    assert counted.flops is None and counted.operators is None
    assert counted.note == "not counted: RuntimeError: no dispatch mode here"


@pytest.mark.skipif(not memory.memray_available(), reason="memray not installed")
def test_allocated_bytes_count_every_allocation_even_when_freed():
    def two_buffers():
        for _ in range(2):
            buffer = torch.ones(1 << 20, dtype=torch.uint8)  # 1 MiB, freed each time
            del buffer

    reading = memory.peak_memory(two_buffers, allocated=True)
    assert reading.allocated_bytes >= 2 << 20
    assert reading.peak_bytes < 2 << 20 <= reading.allocated_bytes
    assert memory.peak_memory(two_buffers).allocated_bytes is None  # only when asked for


def test_ghost_forced_to_materialise_counts_more_work_for_the_same_answer(monkeypatch):
    case = get_case("mlp")
    model, batch = case.make_model(0, "cpu"), case.make_batch(16, 0, "cpu")
    ghost = impls.get("ghost")

    def gram():
        return ghost.inner(model, case.loss_fn, batch)

    factored, expected = counters.count(gram), gram()
    monkeypatch.setattr(COSTS, "force", "materialised")
    materialised = counters.count(gram)
    assert materialised.flops > factored.flops
    torch.testing.assert_close(gram(), expected)
