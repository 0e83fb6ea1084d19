"""``python -m bench --nproc N``: the sweep under N processes, DDP and FSDP2.

N local processes of one gloo group (``impls.processes``, one torch thread each unless
``--threads``) run the same cells in lock step. For each cell the model is built on every rank
from the same seed and wrapped in ``DistributedDataParallel`` or sharded with FSDP2's
``fully_shard`` (every block of a ``ModuleList`` a unit of its own, then the root), each rank
takes its shard of the global batch (``batch_size`` is the global batch), and the
implementation's distributed call (``impls.distributed``) is timed interleaved with a distributed
plain step: the wrapped model's forward and ``loss.sum().backward()`` (DDP's gradient
all-reduce, FSDP2's all-gathers and reduce-scatter included). Times are per call, the slowest
rank's in each round; ``ratio`` is to the plain step.

Results go to ``OUT/cpu-Nproc/cells.csv`` (the table of ``bench.store``; the case column is
``<case>@ddp`` or ``<case>@fsdp2``) with three more columns: ``nproc``, ``bytes_sent`` (the most
any rank sent in one call: ``impls.distributed.Traffic.bytes_sent``) and ``traffic`` (rank 0's
bytes by kind and how many parameters went as factors or as per-example gradients), and a
summary of the bytes in ``OUT/cpu-Nproc/traffic.md``. ``python -m bench report`` includes the
table with the others (it reads the table's own columns).

"Correct" is checked as in the one-process sweep, each rank's rows of a small global batch
against the float64 oracle of the unwrapped model (the worst rank's error). Memory is not
measured here. A cell whose call ran past the most one call may take is a ``timeout`` (measured
after the fact: a rank cannot be interrupted in lock step with the others).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench import store as store_module

WRAPPERS = ("ddp", "fsdp2")
#: columns this table has beyond bench.store.COLUMNS
EXTRA_COLUMNS = ("nproc", "bytes_sent", "traffic")


def folder_name(device: str, nproc: int) -> str:
    return f"{torch.device(device).type}-{nproc}proc"


class DistributedStore(store_module.ResultStore):
    """A ``ResultStore`` that keeps :data:`EXTRA_COLUMNS` too (read back when it keeps rows)."""

    def __init__(self, folder: Path, keep: bool = False):
        super().__init__(folder, keep=keep)
        if keep and self.path.exists():
            raw = pd.read_csv(self.path, dtype=str, keep_default_na=False)
            for record in raw.to_dict("records"):
                key = store_module.cell_key(record)
                if key in self.rows:
                    self.rows[key].update({c: record.get(c, "") for c in EXTRA_COLUMNS})

    def frame(self) -> pd.DataFrame:
        frame = super().frame()
        rows = list(self.rows.values())
        for column in EXTRA_COLUMNS:
            frame[column] = [row.get(column, "") for row in rows]
        return frame


def run_sweep(args) -> int:
    """``python -m bench --nproc N [sweep options]`` (arguments validated by ``bench.__main__``)."""
    import impls
    from bench import environment
    from bench.__main__ import _previous_environments, quick_batch_sizes, settings_from
    from bench.cases import BENCH_CASES, default_batch_sizes, get_case
    from bench.floor import FLOOR
    from impls import processes

    cases = [get_case(n) for n in args.cases] if args.cases else list(BENCH_CASES)
    names = [n for n in (args.impls or impls.names()) if n != FLOOR]
    if FLOOR in (args.impls or []):
        print("the floor is a one-process measure: not swept under --nproc", flush=True)
    settings = settings_from(args)
    started = time.perf_counter()
    for device in args.devices:
        folder = args.out / folder_name(device, args.nproc)
        sizes = {}
        for case in cases:
            if args.batch_sizes is not None:
                sizes[case.name] = list(args.batch_sizes)
            elif args.quick:
                sizes[case.name] = quick_batch_sizes(case.name)
            else:
                sizes[case.name] = list(default_batch_sizes(case.name, "cpu"))
        plan = [
            (case.name, wrapper, name, quantity, batch_size)
            for case in cases
            for wrapper in WRAPPERS
            for batch_size in sorted(set(sizes[case.name]))
            for quantity in args.quantities
            for name in names
        ]
        info = environment.describe(device, settings.threads)
        info["device"] = folder.name
        info["settings"] = dict(settings.as_dict(), quick=args.quick, resumed=args.resume,
                                nproc=args.nproc, wrappers=list(WRAPPERS))  # fmt: skip
        job = dict(
            plan=plan,
            settings=settings.as_dict(),
            device=folder.name,
            folder=str(folder),
            keep=not args.fresh,
            resume=args.resume,
            environment=info,
            previous=_previous_environments(folder, args.resume) if not args.fresh else [],
            progress=not args.no_progress,
        )
        print(f"{folder.name}: {len(plan)} cells on {args.nproc} processes", flush=True)
        budget = settings.budget_s * max(1.0, max(_scale(c) for c in cases))
        processes.run(
            _worker, args.nproc, job, timeout_s=len(plan) * budget * 3 + 600,
            init_timeout_s=120, threads=settings.threads, env={"HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        table = DistributedStore(folder, keep=True).frame()
        print(summary(table))
        write_traffic(table, folder / "traffic.md")
    print(f"sweep wall time {time.perf_counter() - started:.0f} s", flush=True)
    if not args.no_report:
        from bench.report import write_report

        print(f"wrote {write_report(args.out)}")
    return 0


def _scale(case) -> float:
    from bench.cases import budget_scale

    return budget_scale(case)


# -- on every rank ---------------------------------------------------------------------------------


def _worker(rank: int, world: int, job: dict) -> None:
    from bench.sweep import Settings
    from impls import distributed

    settings = Settings(**job["settings"])
    runner = _Runner(rank, world, settings, job)
    distributed.set_collective_timeout(max(60.0, 4 * settings.budget_s))
    runner.run(job["plan"])


class _Runner:
    """One rank's side of the sweep; rank 0 keeps the table."""

    def __init__(self, rank: int, world: int, settings, job: dict):
        import torch.distributed as dist

        from impls.distributed import Channel, Traffic

        self.rank, self.world, self.settings, self.job = rank, world, settings, job
        self.channel = Channel(dist.group.WORLD, Traffic())
        self.store = None
        if rank == 0:
            self.store = DistributedStore(Path(job["folder"]), keep=job["keep"])
            environment = dict(job["environment"])
            if job["previous"] and len(self.store):
                environment["previous"] = job["previous"]
            self.store.environment = environment
        self._wrapped: tuple | None = None
        self._checks: dict[tuple, tuple] = {}
        self._references: dict[str, tuple] = {}

    def everyone(self, value: Any) -> list:
        return self.channel.objects(value)

    # -- the plan --------------------------------------------------------------------------------

    def run(self, plan: list[tuple]) -> None:
        import warnings

        from bench.sweep import _progress_bar

        todo = plan
        if self.job["resume"]:
            present = self.everyone(
                [c for c in plan if self.store is not None and self._key(c) in self.store]
            )[0]
            todo = [c for c in plan if c not in present]
        bar = _progress_bar(len(todo), self.job["progress"] and self.rank == 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            try:
                for cell in todo:
                    bar.set_postfix_str(" ".join(map(str, cell)), refresh=False)
                    row = self.measure(cell)
                    if self.store is not None:
                        self.store.add(row)
                    bar.update(1)
            finally:
                bar.close()

    def _key(self, cell: tuple) -> tuple:
        case, wrapper, name, quantity, batch_size = cell
        return (self.job["device"], f"{case}@{wrapper}", name, quantity, batch_size)

    # -- models and batches ----------------------------------------------------------------------

    def wrapped(self, case_name: str, wrapper: str):
        from bench.cases import get_case

        key = (case_name, wrapper)
        if self._wrapped is None or self._wrapped[0] != key:
            self._wrapped = None
            case = get_case(case_name)
            model = wrap(case.make_model(self.settings.seed), wrapper)
            self._wrapped = (key, model)
        return self._wrapped[1]

    def local_batch(self, case_name: str, batch_size: int, seed: int):
        from bench.cases import get_case

        batch = get_case(case_name).make_batch(batch_size, seed)
        return shard(batch, batch_size, self.rank, self.world)

    # -- one cell --------------------------------------------------------------------------------

    def measure(self, cell: tuple) -> dict:
        from bench.cases import get_case
        from bench.sweep import _now

        case_name, wrapper, name, quantity, batch_size = cell
        case = get_case(case_name)
        started = time.perf_counter()
        row: dict[str, Any] = dict(zip(store_module.KEY, self._key(cell), strict=True))
        row.update(threads=self.settings.threads, flags="", reason="", measured_at=_now(),
                   memory_note="memory is not measured under --nproc", nproc=self.world,
                   bytes_sent="", traffic="")  # fmt: skip
        status, error, detail = self.check(cell)
        row.update(correct=status, check_error=error)
        if status in ("unsupported", "timeout"):
            row.update(status=status, reason=detail)
        else:
            reason = self.everyone(self.skip_reason(cell, case) if self.rank == 0 else None)[0]
            if reason is not None:
                row.update(status="skipped", reason=reason)
            else:
                row.update(self.timed(cell, case))
                if status in ("error", "unchecked") and row["status"] == "ok":
                    row["reason"] = f"check: {detail}"
        row["wall_s"] = time.perf_counter() - started
        return row

    def check(self, cell: tuple) -> tuple[str, float, str]:
        """(status, worst rank's error, detail) of the group's oracle check (once per group)."""
        from correctness.harness import relative_error

        case_name, wrapper, name, quantity, _ = cell
        group = (case_name, wrapper, name, quantity)
        if not self.settings.check:
            return "unchecked", math.nan, "checking disabled"
        if group in self._checks:
            return self._checks[group]
        import impls
        from bench.cases import get_case

        case = get_case(case_name)
        size = self.settings.check_batch_size
        references, tolerances = self.references(case)
        rows = _rows(size, self.rank, self.world)
        model = self.wrapped(case_name, wrapper)
        batch = self.local_batch(case_name, size, self.settings.seed + 1)
        outcome: tuple
        try:
            value = _call(impls.get(name), quantity, model, case.loss_fn, batch)
            error = relative_error(value, references[quantity][rows])
            outcome = ("value", error)
        except impls.Unsupported as refusal:
            outcome = ("unsupported", str(refusal))
        except Exception as failure:  # noqa: BLE001 - reported in the rows
            from bench.sweep import one_line

            outcome = ("error", one_line(failure))
        everyone = self.everyone(outcome)
        kinds = {o[0] for o in everyone}
        if kinds == {"value"}:
            worst = max(o[1] for o in everyone)
            tolerance = tolerances[quantity]
            result = (
                ("ok", worst, "")
                if worst <= tolerance
                else ("WRONG", worst, f"relative error {worst:.2e} > {tolerance:.1e} vs oracle")
            )
        else:
            first = next(o for o in everyone if o[0] != "value")
            result = (first[0], math.nan, first[1])
        self._checks[group] = result
        return result

    def references(self, case) -> tuple[dict, dict]:
        """The oracle on the whole check batch, with the unwrapped model (as ``Sweep``)."""
        if case.name not in self._references:
            from bench.store import ResultStore
            from bench.sweep import Sweep

            sweep = Sweep(ResultStore(Path(self.job["folder"]) / ".unused"), self.settings)
            _, references, tolerances = sweep._reference("cpu", case)
            self._references = {case.name: (references, tolerances)}
        return self._references[case.name]

    def skip_reason(self, cell: tuple, case) -> str | None:
        """Rank 0's verdict from the table (the one-process sweep's rule), broadcast."""
        from bench.sweep import MIN_CALLS_PER_CELL

        key = self._key(cell)
        best = None
        for other, row in self.store.rows.items():
            if other[:4] == key[:4] and other[4] < key[4]:
                if best is None or other[4] > best["batch_size"]:
                    best = row
        if best is None:
            return None
        status, smaller = best["status"], int(best["batch_size"])
        if status in ("timeout", "skipped"):
            return f"B={smaller} was {status} already"
        if status != "ok":
            return None
        per_call = float(best["time_median_s"]) * key[4] / smaller
        budget = self.settings.budget_s * _scale(case)
        if MIN_CALLS_PER_CELL * per_call > budget:
            return (
                f"extrapolated from B={smaller}: ~{per_call:.3g} s per call, a cell needs >= "
                f"{MIN_CALLS_PER_CELL} calls > the {budget:g} s budget"
            )
        return None

    def timed(self, cell: tuple, case) -> dict:
        """Probe, then interleaved rounds of the call and the plain step, in lock step."""
        import impls
        from bench.sweep import MIN_CALLS_PER_CELL, one_line
        from impls import distributed

        case_name, wrapper, name, quantity, batch_size = cell
        s = self.settings
        budget = s.budget_s * _scale(case)
        model = self.wrapped(case_name, wrapper)
        batch = self.local_batch(case_name, batch_size, s.seed)
        implementation = impls.get(name)

        def call():
            return _call(implementation, quantity, model, case.loss_fn, batch)

        plain = plain_step(model, case.loss_fn, batch)
        started = time.perf_counter()
        try:
            call_s = _seconds(call, 1)
            traffic = distributed.last_traffic()
            plain_s = _seconds(plain, 1)
            failure = None
        except impls.Unsupported as refusal:
            failure = ("unsupported", str(refusal))
        except Exception as error:  # noqa: BLE001 - every failure becomes a row
            failure = ("error", one_line(error))
        everyone = self.everyone(
            failure if failure else (call_s, plain_s, traffic.bytes_sent, traffic.summary())
        )
        failed = [o for o in everyone if isinstance(o[0], str)]
        if failed:
            model.zero_grad(set_to_none=True)
            return {"status": failed[0][0], "reason": failed[0][1]}
        call_s = max(o[0] for o in everyone)
        plain_s = max(o[1] for o in everyone)
        bytes_sent, traffic_text = max(o[2] for o in everyone), everyone[0][3]
        limit = budget / MIN_CALLS_PER_CELL
        if call_s > limit:
            return {
                "status": "timeout", "bytes_sent": bytes_sent, "traffic": traffic_text,
                "reason": f"one call took {call_s:.3g} s, more than the {limit:.3g} s one call "
                f"may take ({MIN_CALLS_PER_CELL} calls must fit the {budget:g} s budget)",
            }  # fmt: skip
        repeat = max(1, math.ceil(s.min_run_time / max(call_s, 1e-9)))
        repeat_plain = max(1, math.ceil(s.min_run_time / max(plain_s, 1e-9)))
        per_round = repeat * call_s + repeat_plain * plain_s
        spent = time.perf_counter() - started
        rounds = min(s.rounds, math.floor((budget - spent) / max(per_round, 1e-9)))
        rounds = min(self.everyone(rounds))
        if rounds < 1:
            return {"status": "timeout", "bytes_sent": bytes_sent, "traffic": traffic_text,
                    "reason": f"one call takes {call_s:.3g} s and a plain step {plain_s:.3g} s: "
                    f"a round of timing does not fit the {budget:g} s budget"}  # fmt: skip
        samples: dict[str, list[float]] = {"call": [], "plain": []}
        for index in range(rounds):
            order = [("call", call, repeat), ("plain", plain, repeat_plain)]
            for side, fn, count in order if index % 2 == 0 else reversed(order):
                samples[side].append(_seconds(fn, count))
        model.zero_grad(set_to_none=True)
        gathered = self.everyone(samples)
        # per round, the slowest rank's time per call
        call_rounds = [max(g["call"][k] for g in gathered) for k in range(rounds)]
        plain_rounds = [max(g["plain"][k] for g in gathered) for k in range(rounds)]
        call_median, plain_median = statistics.median(call_rounds), statistics.median(plain_rounds)
        return {
            "status": "ok",
            "time_median_s": call_median,
            "time_iqr_s": _iqr(call_rounds),
            "plain_median_s": plain_median,
            "plain_iqr_s": _iqr(plain_rounds),
            "ratio": call_median / plain_median,
            "n_samples": rounds,
            "samples_s": " ".join(f"{t:.6g}" for t in call_rounds),
            "plain_samples_s": " ".join(f"{t:.6g}" for t in plain_rounds),
            "bytes_sent": bytes_sent,
            "traffic": traffic_text,
        }


def _seconds(fn, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) / count


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def _call(implementation, quantity: str, model, loss_fn, batch):
    if quantity == "norms":
        return implementation.norms(model, loss_fn, batch)
    return implementation.inner(model, loss_fn, batch)


def _rows(size: int, rank: int, world: int) -> slice:
    per = -(-size // world)
    return slice(min(size, rank * per), min(size, (rank + 1) * per))


def shard(batch, size: int, rank: int, world: int):
    """This rank's examples of a global batch (ranks hold ceil(B / N) examples, the last
    ones fewer)."""
    rows = _rows(size, rank, world)

    def take(value):
        if isinstance(value, torch.Tensor):
            return value[rows]
        if isinstance(value, Mapping):
            return type(value)({k: take(v) for k, v in value.items()})
        if isinstance(value, (tuple, list)):
            return type(value)(take(v) for v in value)
        return value

    return take(batch)


def wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    """DDP, or FSDP2 with every block of a ``ModuleList`` a unit of its own, then the root."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if wrapper == "ddp":
        return DistributedDataParallel(model)
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    return fully_shard(model)


def plain_step(model, loss_fn, batch):
    """The wrapped model's forward and ``loss.sum().backward()`` (its collectives included)."""
    from correctness.oracle import call

    inputs, targets = batch

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(call(model, inputs), targets).sum().backward()

    return step


# -- what the table says ---------------------------------------------------------------------------


def summary(table: pd.DataFrame) -> str:
    """Time ratios and bytes per call of the measured cells, as aligned text."""
    from correctness.cli import text_table

    rows = table[table["status"] == "ok"]
    lines = [
        (r.case, r.implementation, r.quantity, str(r.batch_size), f"{float(r.ratio):.2f}",
         _bytes(r.bytes_sent), str(r.correct))
        for r in rows.itertuples()
    ]  # fmt: skip
    header = ("case", "implementation", "quantity", "B", "ratio", "bytes/call", "correct")
    return text_table(header, lines) if lines else "no cell measured ok"


def _bytes(value) -> str:
    try:
        n = float(value)
    except (TypeError, ValueError):
        return ""
    if math.isnan(n):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.0f} B"


def write_traffic(table: pd.DataFrame, path: Path) -> None:
    """``traffic.md``: per measured cell, the ratio, the bytes one call sent and what they were."""
    lines = [
        "# Bytes sent per call",
        "",
        "Generated by `python -m bench --nproc N`; do not edit. `bytes/call`: the most any rank "
        "sent in one call (ring all-gather: (ranks - 1) x its share of each). `ratio`: time per "
        "call / a distributed plain step (forward + backward of the wrapped model).",
        "",
        "| case | implementation | quantity | B | ratio | bytes/call | what was sent (rank 0) |",
        "|---|---|---|---|---|---|---|",
    ]
    measured = table[table["status"].isin(["ok", "timeout"])]
    for r in measured.itertuples():
        ratio = f"{float(r.ratio):.2f}" if r.status == "ok" else r.status
        lines.append(
            f"| {r.case} | {r.implementation} | {r.quantity} | {r.batch_size} | {ratio} | "
            f"{_bytes(r.bytes_sent)} | {r.traffic} |"
        )
    store_module.write_atomically(path, "\n".join(lines) + "\n")


# -- what a Gram matrix sends, without a group -------------------------------------------------

#: GPT-2 small (124M parameters), as Hugging Face configures it
GPT2_SMALL = dict(vocab=50257, dim=768, layers=12, heads=12, positions=1024)


def payload_report(model_name: str, tokens: list[int], examples: int, ranks: int) -> str:
    """Per sequence length: the bytes one rank holding ``examples`` examples sends the others in
    a distributed Gram matrix (``impls.distributed.payload``, ghost), by form, against the
    per-example gradients' bytes, and what ``ranks`` ranks would send each."""
    import impls
    from correctness import hf_models, losses
    from correctness.cli import text_table
    from impls.distributed import payload

    if model_name != "gpt2-124m":
        raise ValueError(f"unknown model '{model_name}' (known: gpt2-124m)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hf_models.gpt2_lm(**GPT2_SMALL)
    parameters = sum(p.numel() for p in model.parameters())
    element = next(model.parameters()).element_size()
    lines = []
    for length in tokens:
        batch = hf_models.tokens(examples, torch.Generator().manual_seed(0), length=length,
                                 vocab=GPT2_SMALL["vocab"])  # fmt: skip
        sent = payload(impls.get("ghost"), model, losses.next_token_cross_entropy, batch)
        by_form = {"factors": 0, "gradients": 0}
        counts = {"factors": 0, "gradients": 0}
        for form, size in sent.values():
            by_form[form] += size
            counts[form] += 1
        total = sum(by_form.values())
        gradients = examples * parameters * element
        lines.append((
            str(length), str(examples), _bytes(total), f"{counts['factors']}", _bytes(
                by_form["factors"]), f"{counts['gradients']}", _bytes(by_form["gradients"]),
            f"{total / gradients:.3f}", _bytes((ranks - 1) * total),
        ))  # fmt: skip
    header = ("T", "examples", "share", "#factors", "factor bytes", "#gradients",
              "gradient bytes", "share / gradients", f"sent per rank, {ranks} ranks")  # fmt: skip
    note = (
        f"{model_name}: {parameters:,} parameters, {element} bytes each; per-example "
        f"gradients of {examples} example(s): {_bytes(examples * parameters * element)}"
    )
    return note + "\n" + text_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.distributed payload [--tokens T ...] [--examples B] [--ranks N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.distributed")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("payload", help="bytes a distributed Gram matrix sends (ghost)")
    sub.add_argument("--model", default="gpt2-124m")
    sub.add_argument("--tokens", type=int, nargs="+", default=[128, 1024])
    sub.add_argument("--examples", type=int, default=1)
    sub.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(payload_report(args.model, args.tokens, args.examples, args.ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
