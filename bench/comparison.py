"""Every implementation on your own model, before adopting one: ``bench.compare`` (a notebook)
and ``python -m bench compare FILE`` (a thin wrapper over it). See docs/compare.md.

From a notebook::

    import bench
    frame = bench.compare(model, loss_fn, make_batch, batch_sizes=[16, 64], quick=True)
    print(frame.attrs["recommendation"][64])

``compare``

1. checks the model (one forward and loss on a batch of 2: ``bench.user_model``; a mistake is a
   ``UserModelError``, one line naming it) and the keyword arguments (``ValueError``);
2. checks every implementation's norms and Gram matrix against the float64 oracle on a small
   batch (ok with its relative error / unsupported with the reason / WRONG / error);
3. times and memory-profiles every implementation at each batch size with ``bench.sweep``
   (time and peak memory as ratios to a plain forward+backward of the same model and batch),
   with a progress bar (``tqdm.auto``: a widget in Jupyter, text in a terminal);
4. returns the table, one row per implementation x quantity x batch size, with the verdict
   attached (``frame.attrs``, see ``compare``).

The command loads ``FILE`` (``make_case()`` returning ``(model, loss_fn, make_batch)``), checks
its arguments and the file before anything is measured (one line on stderr and exit code 2 on
a problem), calls ``compare`` and prints the verdict.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench.floor import FLOOR
from correctness import cli

#: the default run: the sweep's own defaults, three batch sizes
DEFAULT = dict(batch_sizes=(16, 64, 256), rounds=3, min_run_time=0.1, budget=10.0)
#: ``quick=True`` / ``--quick``: two small batch sizes, two short rounds
QUICK = dict(batch_sizes=(8, 32), rounds=2, min_run_time=0.05, budget=5.0)


@dataclass(frozen=True)
class Options:
    """What ``compare`` measures: implementation names, batch sizes (ascending, distinct) and
    the sweep's ``Settings``."""

    implementations: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    settings: Any  # bench.sweep.Settings


def options(keywords: Mapping[str, Any]) -> Options:
    """``compare``'s option keywords (``batch_sizes``, ``implementations``, ``quick``,
    ``threads``, ``rounds``, ``min_run_time``, ``budget``, ``check_batch_size``, ``memory``;
    other keys are ignored) checked and resolved with ``quick`` and the defaults; ``ValueError``
    naming the first bad one."""
    import impls
    from bench.sweep import Settings

    known = [*impls.names(), FLOOR]
    implementations = keywords["implementations"]
    if isinstance(implementations, str):
        implementations = [implementations]
    cli.check_known("implementation", implementations, known)
    preset = QUICK if keywords["quick"] else DEFAULT
    batch_sizes = keywords["batch_sizes"]
    if batch_sizes is None:
        batch_sizes = preset["batch_sizes"]
    sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes is empty")
    for size in sizes:
        cli.check_whole("batch_sizes", size, 1, cli.MAX_BATCH_SIZE)
    threads = cli.check_whole("threads", keywords["threads"], 1, cli.MAX_THREADS)
    check_batch_size = keywords["check_batch_size"]
    cli.check_whole("check_batch_size", check_batch_size, 1, cli.MAX_BATCH_SIZE)

    def pick(key, check):
        return preset[key] if keywords[key] is None else check(key, keywords[key])

    settings = Settings(
        threads=threads,
        rounds=pick("rounds", cli.check_whole),
        min_run_time=pick("min_run_time", _seconds),
        budget_s=pick("budget", _seconds),
        check=True,
        check_batch_size=check_batch_size,
        measure_memory=bool(keywords["memory"]),
    )
    names = tuple(implementations or impls.names())
    return Options(names, tuple(sorted(set(sizes))), settings)


def _seconds(name: str, value) -> float:
    return cli.check_number(name, value, above=0, most=cli.MAX_SECONDS)


def compare(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    make_batch: Callable[[int], tuple],
    *,
    batch_sizes: Sequence[int] | None = None,
    implementations: Sequence[str] | None = None,
    quick: bool = False,
    threads: int = 1,
    rounds: int | None = None,
    min_run_time: float | None = None,
    budget: float | None = None,
    check_batch_size: int = 8,
    memory: bool = True,
    progress: bool = True,
    out: str | Path | None = None,
    name: str | None = None,
) -> pd.DataFrame:
    """Check and time every implementation on your model; the table with the verdict.

    ``model``, ``loss_fn(outputs, targets)`` (per-example losses, shape [B]) and
    ``make_batch(batch_size)`` (``(inputs, targets)``; inputs a Tensor, a tuple or a dict of
    names, called as ``model(**inputs)``; see ``bench.user_model``). The model is measured as
    given: its mode, dtype and device.

    - ``batch_sizes``: to time (default 16, 64, 256; with ``quick`` 8 and 32);
    - ``implementations``: names (default every registered one, ``impls.names()``);
    - ``quick``: 2 interleaved rounds of 0.05 s and 5 s per cell (default 3, 0.1 s, 10 s);
    - ``threads``: torch intra-op threads while measuring (default 1: steady ratios);
    - ``rounds``, ``min_run_time``, ``budget``: timing rounds, seconds per round, seconds per
      cell (override ``quick``); ``check_batch_size``: examples in the oracle check (8);
    - ``memory``: read peak memory (memray on CPU, the allocator on CUDA);
    - ``progress``: a progress bar (``tqdm.auto``); ``out``: also keep the rows in
      ``OUT/<device>/cells.csv`` (merged into a table already there); ``name``: the ``case``
      column (default the model's class name).

    Returns a DataFrame, one row per implementation x quantity ("norms", "gram") x batch size,
    with the columns of ``bench.store.COLUMNS``: ``status`` (ok / unsupported / oom / timeout /
    skipped / error) and ``reason``, ``correct`` (the oracle check: ok / WRONG / unsupported /
    error / timeout) and ``check_error``, ``ratio`` and ``time_median_s`` (time, and its ratio
    to a plain forward+backward), ``memory_ratio`` and ``memory_peak_bytes``. ``frame.attrs``:

    - ``"recommended"``: batch size -> the implementation to adopt (None when none is correct);
    - ``"recommendation"``: batch size -> that choice in one line, with why;
    - ``"verdict"``: batch size -> the verdict as ``python -m bench compare`` prints it;
    - ``"agreement"``: the agreement with the float64 oracle, as text;
    - ``"implementations"``, ``"batch_sizes"``, ``"settings"``: what was measured, and how.

    Raises ``bench.user_model.UserModelError`` (a ValueError, one line) when the model, loss or
    batch is wrong, and ``ValueError`` for a bad argument, before measuring anything.
    """
    from bench import user_model

    chosen = options(locals())  # the keywords above, checked
    case = user_model.case_from(model, loss_fn, make_batch, name=name)
    return measure(case, chosen, progress=progress, out=out)


def measure(case, chosen: Options, progress: bool = True, out: str | Path | None = None):
    """Measure a ``bench.user_model.UserCase`` with ``chosen`` options: ``compare``'s table."""
    from bench import verdict
    from bench.store import ResultStore, to_frame
    from bench.sweep import Sweep, plan

    names, sizes = list(chosen.implementations), list(chosen.batch_sizes)
    measured = names if FLOOR in names else [*names, FLOOR]  # the floor: what any method pays
    names = [n for n in names if n != FLOOR]
    cells = plan([case], measured, devices=[case.device], batch_sizes=sizes)
    with tempfile.TemporaryDirectory(prefix="pegbench-compare-") as folder:
        root = Path(out) if out is not None else Path(folder)
        store = ResultStore(root / torch.device(case.device).type, keep=out is not None)
        rows = Sweep(store, chosen.settings, progress=progress).run(cells, remeasure=True)
    frame = to_frame(rows)
    picks = {b: verdict.recommend(frame, names, b) for b in sizes}
    frame.attrs.update(
        implementations=names,
        batch_sizes=sizes,
        settings=chosen.settings.as_dict(),
        agreement=verdict.agreement_table(
            frame, names, chosen.settings.check_batch_size, case.dtype
        ),
        verdict={b: verdict.verdict(frame, names, b) for b in sizes},
        recommendation={b: line for b, (_, line) in picks.items()},
        recommended={b: name for b, (name, _) in picks.items()},
    )
    return frame


# -- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", type=Path, help="a Python file defining make_case() -> (model, loss_fn, make_batch)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: batch sizes {list(QUICK['batch_sizes'])}, {QUICK['rounds']} rounds",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=cli.BATCH_SIZE,
        default=None,
        help=f"batch sizes to time (default {list(DEFAULT['batch_sizes'])})",
    )
    cli.add_impls_argument(parser, "implementations (default: every registered one)")
    parser.add_argument(
        "--threads",
        type=cli.THREADS,
        default=1,
        help="torch intra-op threads (default 1: steady ratios on a shared machine; give the "
        f"number your training uses, up to {torch.get_num_threads()} here, to time that)",
    )
    parser.add_argument("--rounds", type=cli.ROUNDS, default=None, help="interleaved timing rounds")
    parser.add_argument(
        "--min-run-time", type=cli.SECONDS, default=None, help="seconds per blocked_autorange round"
    )
    parser.add_argument("--budget", type=cli.SECONDS, default=None, help="wall seconds per cell")
    parser.add_argument(
        "--check-batch-size",
        type=cli.BATCH_SIZE,
        default=8,
        help="examples in the oracle check's batch (default %(default)s)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip memory readings")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also keep the measured rows in OUT/<device>/cells.csv (merged into a table there)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate(args: argparse.Namespace) -> None:
    """Check the options, load and probe the file, check ``--out``: ``cli.UsageError`` (one
    line) on a problem, before anything is measured. Adds to ``args`` ``keywords`` (for
    ``compare``), ``options`` (the same resolved) and ``case`` (the loaded model)."""
    from bench import store, user_model

    args.keywords = dict(
        batch_sizes=args.batch_sizes,
        implementations=args.impls,
        quick=args.quick,
        threads=args.threads,
        rounds=args.rounds,
        min_run_time=args.min_run_time,
        budget=args.budget,
        check_batch_size=args.check_batch_size,
        memory=not args.no_memory,
    )
    with cli.usage("compare"):
        args.options = options(args.keywords)
        if args.out is not None:
            cli.check_output_folder(args.out, "--out")
        args.case = user_model.load(args.path)  # UserModelError is a ValueError
        if args.out is not None:
            folder = args.out / torch.device(args.case.device).type
            store.read_table(folder / store.TABLE_NAME)


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command on validated arguments: ``compare``, then the verdict printed."""
    from bench.sweep import QUANTITIES

    case, chosen = args.case, args.options
    settings, names = chosen.settings, chosen.implementations
    print(
        f"compare {args.path}: {type(case.model).__name__}, {case.parameter_count:,} trainable "
        f"parameters, {str(case.dtype).removeprefix('torch.')} on {case.device}, "
        f"{settings.threads} thread(s); {len(names)} implementations x {len(QUANTITIES)} "
        f"quantities x batch sizes {', '.join(map(str, chosen.batch_sizes))}",
        flush=True,
    )
    started = time.perf_counter()
    frame = compare(
        case.model,
        case.loss_fn,
        case.user_make_batch,
        **args.keywords,
        progress=not args.no_progress,
        out=args.out,
        name=case.name,
    )
    print()
    print(frame.attrs["agreement"])
    for batch_size in chosen.batch_sizes:
        print()
        print(frame.attrs["verdict"][batch_size])
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0
