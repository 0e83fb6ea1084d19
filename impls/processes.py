"""Run a function on N local processes of one ``torch.distributed`` group, with timeouts.

The tests (``impls/tests/test_distributed.py``) and the benchmark (``python -m bench --nproc
2``) both run their distributed work this way: ``run(fn, nproc, *args)`` spawns ``nproc``
processes (``torch.multiprocessing``, spawn), each initialises a gloo group on a free local port
(its init waits at most ``init_timeout_s``), calls ``fn(rank, world, *args)`` and sends back its
result. The parent waits at most ``timeout_s`` for all of them: past it, the processes it
started are terminated and :class:`ProcessesTimedOut` says which ranks did not answer, so a hang
is a failure and never a stuck run. A rank that raises is a :class:`ProcessesFailed` with its
traceback.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


class ProcessesFailed(RuntimeError):
    """A rank raised; the message holds each failed rank's traceback."""


class ProcessesTimedOut(RuntimeError):
    """Some ranks did not finish in time (they were terminated)."""


def free_port() -> int:
    """A TCP port free on this machine right now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    timeout_s: float = 300.0,
    init_timeout_s: float = 60.0,
    threads: int = 1,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """``[fn(0, nproc, *args), ..., fn(nproc - 1, nproc, *args)]``, each on its own process.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function); so must the results.
    ``threads``: torch intra-op threads per process. ``env``: variables set in each process.
    """
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_child,
            args=(rank, nproc, port, fn, args, results, threads, backend, init_timeout_s, env),
            daemon=True,
        )
        for rank in range(nproc)
    ]
    for process in processes:
        process.start()
    answers: dict[int, tuple[bool, bytes]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(answers) < nproc:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in processes):
                    dead = [r for r, p in enumerate(processes) if p.exitcode not in (0, None)]
                    if all(r not in answers for r in dead):
                        time.sleep(0.5)  # a dying rank's last message may still be in flight
                        _drain(results, answers)
                        missing = [r for r in dead if r not in answers]
                        if missing:
                            raise ProcessesFailed(
                                f"rank {missing[0]} died with exit code "
                                f"{processes[missing[0]].exitcode} before answering"
                            ) from None
                continue
            answers[rank] = (ok, payload)
    finally:
        for process in processes:
            process.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
        for process in processes:  # only the processes started here
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    if len(answers) < nproc:
        silent = [r for r in range(nproc) if r not in answers]
        failed = [r for r, (ok, _) in answers.items() if not ok]
        detail = "".join(
            f"\n--- rank {r} ---\n{pickle.loads(answers[r][1])}" for r in sorted(failed)
        )
        raise ProcessesTimedOut(
            f"ranks {silent} did not finish within {timeout_s:g} s and were terminated{detail}"
        )
    failed = [r for r in range(nproc) if not answers[r][0]]
    if failed:
        detail = "".join(f"\n--- rank {r} ---\n{pickle.loads(answers[r][1])}" for r in failed)
        raise ProcessesFailed(f"ranks {failed} raised:{detail}")
    return [pickle.loads(answers[r][1]) for r in range(nproc)]


def _drain(results, answers) -> None:
    while True:
        try:
            rank, ok, payload = results.get_nowait()
        except queue_module.Empty:
            return
        answers[rank] = (ok, payload)


def _child(rank, world, port, fn, args, results, threads, backend, init_timeout_s, env):
    try:
        os.environ.update(env or {})
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=init_timeout_s),
        )
        try:
            value = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, pickle.dumps(traceback.format_exc())))
