"""``python -m bench --nproc N``: its arguments, its table (the store's columns and three more)
and one tiny sweep under two processes, end to end."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pandas as pd
import torch.distributed as dist

from bench import __main__ as bench_main
from bench import store
from bench.distributed import EXTRA_COLUMNS, DistributedStore, shard
from bench.tests.fakes import tiny_rows


def _call(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = bench_main.main(argv)
        except SystemExit as done:
            code = done.code
    return code, out.getvalue(), err.getvalue()


def test_nproc_must_be_a_positive_whole_number(tmp_path):
    code, _, err = _call(["--nproc", "0", "--out", str(tmp_path)])
    assert code == 2 and err.startswith("sweep: ") and err.count("\n") == 1


def test_nproc_sweeps_the_cpu_into_its_own_folder(tmp_path):
    args = bench_main.parse_and_validate(["--nproc", "2", "--out", str(tmp_path)])
    assert args.nproc == 2 and args.devices == ["cpu"]


def test_the_table_keeps_its_extra_columns(tmp_path):
    folder = tmp_path / "cpu-2proc"
    table = DistributedStore(folder)
    for row in tiny_rows()[:3]:
        table.add(dict(row, nproc=2, bytes_sent=1234, traffic="1.2 KiB sent"))
    again = DistributedStore(folder, keep=True).frame()
    assert list(again.columns) == [*store.COLUMNS, *EXTRA_COLUMNS]
    assert set(again["traffic"]) == {"1.2 KiB sent"}
    assert len(store.read_table(folder / store.TABLE_NAME)) == 3  # what the report reads


def test_each_rank_takes_its_share_of_the_global_batch():
    import torch

    x = torch.arange(5)
    assert [shard((x, x), 5, r, 2)[0].tolist() for r in range(2)] == [[0, 1, 2], [3, 4]]


def test_a_tiny_sweep_under_two_processes(tmp_path):
    if not dist.is_available():
        return
    code, out, err = _call([
        "--nproc", "2", "--cases", "mlp_mnist", "--impls", "ghost", "opacus_ghost",
        "--quantities", "gram", "--batch-sizes", "8", "--rounds", "1", "--min-run-time", "0.01",
        "--budget", "20", "--no-report", "--no-progress", "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(Path(tmp_path) / "cpu-2proc" / store.TABLE_NAME)
    assert set(table["case"]) == {"mlp_mnist@ddp", "mlp_mnist@fsdp2"}
    ghost = table[table["implementation"] == "ghost"]
    assert set(ghost["status"]) == {"ok"} and set(ghost["correct"]) == {"ok"}
    assert all(b > 0 and not math.isnan(b) for b in ghost["bytes_sent"])
    assert all("factors" in t for t in ghost["traffic"])
    refused = table[table["implementation"] == "opacus_ghost"]
    assert set(refused["status"]) == {"unsupported"}
    assert (Path(tmp_path) / "cpu-2proc" / "traffic.md").exists()
