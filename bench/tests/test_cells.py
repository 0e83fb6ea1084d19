"""The sweep's cells as pytest-benchmark tests: ``pytest bench --benchmark-only``.

Same cells as the default sweep (``bench.sweep.plan`` over ``bench.cases``, every registered
implementation, norms and gram, the default devices); plain ``pytest`` skips them
(``--benchmark-skip`` in pyproject). Filter with ``-k``, e.g.
``pytest bench --benchmark-only -k "mlp_mnist and B16"``. Each test's ``extra_info`` carries
the implementation, case, quantity, batch size, device, peak memory of one call and of the plain
step (bytes), the plain step's median (seconds) and the time ratio to it.

Environment: ``PEGBENCH_BUDGET`` (seconds, default 30) skips cells whose probe call shows that
pytest-benchmark's minimum of rounds would take longer.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch

import impls
from bench import memory
from bench.cases import BENCH_CASES
from bench.sweep import default_devices, plain_step, plan, quantity_call, torch_threads
from bench.timing import interleaved, time_once

BUDGET_S = float(os.environ.get("PEGBENCH_BUDGET", "30"))
MIN_ROUNDS = 5  # pytest-benchmark's default min_rounds

CELLS = plan(BENCH_CASES, impls.names(), devices=default_devices())


def _id(cell) -> str:
    return (
        f"{cell.device}-{cell.case.name}-{cell.implementation}-{cell.quantity}-B{cell.batch_size}"
    )


@cache
def _model(device, case_name):
    case = next(c for c in BENCH_CASES if c.name == case_name)
    return case.make_model(0, device)


@cache
def _batch(device, case_name, batch_size):
    case = next(c for c in BENCH_CASES if c.name == case_name)
    return case.make_batch(batch_size, 0, device)


@pytest.mark.parametrize("cell", CELLS, ids=_id)
def test_cell(benchmark, cell):
    if torch.device(cell.device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    threads = torch.get_num_threads()
    model = _model(cell.device, cell.case.name)
    batch = _batch(cell.device, cell.case.name, cell.batch_size)
    call = quantity_call(
        impls.get(cell.implementation), cell.quantity, model, cell.case.loss_fn, batch
    )
    plain = plain_step(model, cell.case.loss_fn, batch)
    with torch_threads(threads):
        try:
            probe_s = time_once(call, cell.device)
        except impls.Unsupported as refusal:
            pytest.skip(f"unsupported: {refusal}")
        if probe_s * MIN_ROUNDS > BUDGET_S:
            pytest.skip(f"one call takes {probe_s:.3g} s: {MIN_ROUNDS} rounds > {BUDGET_S:g} s")
        _, plain_stats = interleaved(
            plain, plain, threads=threads, rounds=1, min_run_time=0.1, device=cell.device
        )
        call_memory = memory.peak_memory(call, cell.device)
        plain_memory = memory.peak_memory(plain, cell.device)
        model.zero_grad(set_to_none=True)
        benchmark.extra_info.update(
            implementation=cell.implementation,
            case=cell.case.name,
            quantity=cell.quantity,
            batch_size=cell.batch_size,
            device=cell.device,
            threads=threads,
            memory_peak_bytes=call_memory.peak_bytes,
            plain_peak_bytes=plain_memory.peak_bytes,
            memory_note=call_memory.note,
            plain_median_s=plain_stats.median,
        )
        benchmark(call)
    if benchmark.stats is not None:
        benchmark.extra_info["ratio"] = benchmark.stats.stats.median / plain_stats.median
