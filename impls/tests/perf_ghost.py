"""ghost's performance against issue 3's targets: ``python -m impls.tests.perf_ghost``.

Not a test (pytest does not collect it): a measurement, printed as a table of ratios.

Every time is a ratio to the plain training step of the same model and batch,
``model.zero_grad(set_to_none=True); loss_fn(model(x), y).sum().backward()``, measured in the
same process, interleaved with it: each round alternates short ``torch.utils.benchmark.Timer``
timings (``num_threads``, default 2) of the plain step and of each contender, the round's ratio
is the ratio of their medians, and the table reports the median and the spread (min..max) of
the per-round ratios, so that load from other processes on a shared machine hits both sides of
a ratio alike. ``--clock cpu`` measures CPU time instead of elapsed
time: on a machine whose cores other processes keep busy, two OpenMP threads wait for each other
at every parallel region, and elapsed times then count regions more than work.

Targets (issue 3):

- ghost norms <= 1.05x plain: MLP 784-512-512-10 at B=256; transformer (dim 256, 4 heads,
  hidden 1024, 2 blocks, vocabulary 1000) at B=64, T=64;
- ghost Gram matrix <= 1.5x plain at B=128 on the same two models;
- ghost norms <= 0.9x the faster of opacus_ghost and backpack on every zoo case both run
  (the zoo's models at batch size ``--zoo-batch``), when those are registered.

``--floor`` splits ghost's Gram matrix into what bounds it from below, timed in the same rounds:
the forward and backward that produce every layer's output gradient with no capture at all
(``torch.autograd.grad`` to the lowest layer outputs: no weight gradients), and ghost's reductions
alone on factors computed beforehand, with the rate (multiply-adds per second) the materialised
reductions reach; their sum is what ghost would cost if capturing and streaming were free.

``--forms`` also times ghost with the cost model overridden (all factored, all materialised):
how the per-layer choice compares with either fixed form. ``--calibrate`` measures one Linear's
factored and materialised reductions over T (norms and Gram matrix) and reports how much slower
than the better form the cost model's choice and the fixed rule 2T² <= i·o are.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partial

import torch
from torch.utils.benchmark import Timer

import impls
from correctness import losses, models
from correctness.cases import CASES, features_and_classes, tokens_and_classes
from impls import Unsupported
from impls.layers import factored

CE = losses.cross_entropy
TRANSFORMER = dict(vocab=1000, dim=256, heads=4, hidden=1024, blocks=2, max_len=64, classes=10)


def mlp_problem(batch_size):
    model = models.MLP((784, 512, 512, 10))
    batch = features_and_classes(
        batch_size, torch.Generator().manual_seed(0), shape=(784,), classes=10
    )
    return model, CE, batch


def transformer_problem(batch_size, length=64):
    model = models.TinyTransformer(**TRANSFORMER)
    batch = tokens_and_classes(
        batch_size, torch.Generator().manual_seed(0), length=length, vocab=1000, classes=10
    )
    return model, CE, batch


def plain_step(model, loss_fn, batch):
    inputs, targets = batch
    inputs = (inputs,) if torch.is_tensor(inputs) else inputs
    model.zero_grad(set_to_none=True)
    loss_fn(model(*inputs), targets).sum().backward()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _seconds(fn, threads, min_run_time, clock="wall"):
    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads, timer=CLOCKS[clock])
    return timer.blocked_autorange(min_run_time=min_run_time).median


def ratios(model, loss_fn, batch, contenders, *, rounds, threads, min_run_time, clock):
    """name -> per-round ratios time(contender) / time(plain step), finely interleaved.

    Each round alternates short timings (a few ms each) of the plain step and every contender
    until ``min_run_time`` has passed, then takes the median of each: a burst of load from
    another process falls on both sides of the ratio instead of spoiling one of them.
    """
    plain = partial(plain_step, model, loss_fn, batch)
    everyone = {"plain": plain, **contenders}
    timers, numbers = {}, {}
    for name, fn in everyone.items():
        fn()  # warm up (allocations, lazy imports)
        timers[name] = Timer("fn()", globals={"fn": fn}, num_threads=threads, timer=CLOCKS[clock])
        single = timers[name].timeit(1).median
        numbers[name] = max(1, int(0.005 / max(single, 1e-6)))
    out = {name: [] for name in contenders}
    plain_times = []
    for r in range(rounds):
        samples = {name: [] for name in everyone}
        names = list(everyone)
        start = time.perf_counter()
        while time.perf_counter() - start < min_run_time or len(samples["plain"]) < 3:
            for name in names if r % 2 == 0 else reversed(names):
                samples[name].append(timers[name].timeit(numbers[name]).median)
        base = statistics.median(samples["plain"])
        plain_times.append(base)
        for name in contenders:
            out[name].append(statistics.median(samples[name]) / base)
    return out, statistics.median(plain_times)


def activation_gradients(model, loss_fn, batch):
    """A step that computes every parametrised layer's output gradient and nothing else: the
    forward, then autograd to the lowest of those outputs (no capture, no weight gradients)."""
    from impls._capture import _nodes_above

    inputs, targets = batch
    inputs = (inputs,) if torch.is_tensor(inputs) else inputs
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]

    def step():
        outputs = []
        handles = [m.register_forward_hook(lambda m, a, o: outputs.append(o)) for m in layers]
        try:
            loss = loss_fn(model(*inputs), targets).sum()
        finally:
            for h in handles:
                h.remove()
        tensors = [o for o in outputs if torch.is_tensor(o) and o.grad_fn is not None]
        nodes = {o.grad_fn for o in tensors}
        above = _nodes_above(loss.grad_fn, nodes)
        lowest = [o for o in tensors if o.grad_fn not in above]
        torch.autograd.grad(loss, lowest, allow_unused=True)

    return step


def reductions_alone(ghost, model, loss_fn, batch):
    """ghost's Gram reductions on factors computed once beforehand, and the multiply-adds of
    those of its Linear-like factors (Outer) in the form the cost model picks: materialised,
    per-example gradients n·t·i·o plus the Gram matrix n²·i·o; factored, n²·t²·(i+o)."""
    from impls.ghost import parameter_factors

    side = ghost._side(model, batch)
    factors = parameter_factors(side, loss_fn, False)
    macs = 0
    for f in factors.values():
        if isinstance(f, factored.Outer):
            n, groups, t, o = f.rows.shape
            i = f.cols.shape[3]
            if _chooses_factored(partial(factored.inner, f, f, same=True)):
                macs += groups * n * n * t * t * (i + o)
            else:
                macs += groups * (n * t * i * o + n * n * i * o)

    def run():
        for f in factors.values():
            factored.inner(f, f, same=True)

    return run, macs


def _forced(force, fn):
    def run():
        saved = factored.COSTS.force
        factored.COSTS.force = force
        try:
            return fn()
        finally:
            factored.COSTS.force = saved

    return run


def calibrate(threads, min_run_time, clock):
    """Factored against materialised for one Linear's weight, over T: the measured crossover,
    and how much slower than the better form the cost model's choice and the fixed rule
    2T² <= i·o are (1.00 = the better form)."""
    from impls.layers.factored import Outer, inner

    print("\ncalibration: time(factored) / time(materialised) per T; then the slowdown of each")
    print("policy's choice against the better form (cost model, rule 2T² <= i·o)")
    regrets = {"cost model": [], "2T² <= i·o": []}
    for quantity, n in (("norms", 64), ("gram", 128)):
        for i, o in ((64, 64), (256, 256), (256, 1024), (1024, 256)):
            cells = []
            for t in (2, 4, 8, 16, 32, 64, 128, 256, 512):
                if n * t * max(i, o) > 1 << 25:
                    continue
                gen = torch.Generator().manual_seed(t)
                rows = torch.randn(n, 1, t, o, generator=gen)
                factors = Outer(rows, torch.randn(n, 1, t, i, generator=gen), (o, i))
                if quantity == "norms":
                    run = factors.squared_norms
                else:
                    run = partial(inner, factors, factors, same=True)
                times = {
                    form: _seconds(_forced(form, run), threads, min_run_time, clock)
                    for form in ("factored", "materialised")
                }
                best = min(times.values())
                chosen = "factored" if _chooses_factored(run) else "materialised"
                rule = "factored" if 2 * t * t <= i * o else "materialised"
                regrets["cost model"].append(times[chosen] / best)
                regrets["2T² <= i·o"].append(times[rule] / best)
                ratio = times["factored"] / times["materialised"]
                cells.append(f"T={t}:{ratio:.2g}{chosen[0]}{rule[0]}")
            print(f"  {quantity:5s} n={n} i={i} o={o}: " + " ".join(cells), flush=True)
    print("  (suffix: the cost model's choice, then the rule's; f = factored, m = materialised)")
    for policy, values in regrets.items():
        mean = statistics.geometric_mean(values)
        print(
            f"  {policy:12s} slowdown vs the better form: mean {mean:.2f}x, worst "
            f"{max(values):.1f}x"
        )


def _chooses_factored(run) -> bool:
    """Whether the cost model picks the factored form for ``run`` (recorded, not timed)."""
    chosen = []
    original = factored.Costs.factored_is_cheaper

    def spy(self, f, m):
        chosen.append(original(self, f, m))
        return chosen[-1]

    factored.Costs.factored_is_cheaper = spy
    try:
        run()
    finally:
        factored.Costs.factored_is_cheaper = original
    return chosen[0]


def _row(label, quantity, name, values, plain_s, target=None):
    median = statistics.median(values)
    verdict = "" if target is None else ("met" if median <= target else "NOT met")
    target_s = "" if target is None else f"<= {target:g}"
    print(
        f"{label:28s} {quantity:6s} {name:25s} {median:6.3f}  "
        f"[{min(values):.2f}..{max(values):.2f}]  {plain_s * 1e3:8.1f}  {target_s:7s} {verdict}",
        flush=True,
    )
    return median


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impls.tests.perf_ghost", description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--zoo-batch", type=int, default=64)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (the target's measure); cpu: CPU time of the process, all its "
        "threads (less sensitive to other processes taking the cores)",
    )
    parser.add_argument("--forms", action="store_true", help="also time all-factored/material")
    parser.add_argument(
        "--floor", action="store_true", help="split the Gram matrix targets into their floors"
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="measure factored vs materialised over T"
    )
    parser.add_argument(
        "--targets",
        nargs="*",
        default=None,
        help="some of mlp-norms transformer-norms mlp-gram transformer-gram (default: all)",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="targets, zoo (default: both; none: neither)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    ghost = impls.get("ghost")
    opts = dict(
        rounds=args.rounds, threads=args.threads, min_run_time=args.min_run_time, clock=args.clock
    )
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, "
        f"{args.clock} clock"
    )
    print(
        f"{'model, batch':28s} {'':6s} {'implementation':25s} {'ratio':>6s}  "
        f"{'[min..max]':12s}  {'plain ms':>8s}  target"
    )
    failed = 0
    only = set(["targets", "zoo"] if args.only is None else args.only)

    if "targets" in only:
        problems = [
            ("MLP 784-512-512-10, B=256", "norms", partial(mlp_problem, 256), 1.05),
            ("transformer T=64, B=64", "norms", partial(transformer_problem, 64), 1.05),
            ("MLP 784-512-512-10, B=128", "gram", partial(mlp_problem, 128), 1.5),
            ("transformer T=64, B=128", "gram", partial(transformer_problem, 128), 1.5),
        ]
        for label, quantity, make, target in problems:
            if args.targets and f"{label.split()[0].lower()}-{quantity}" not in args.targets:
                continue
            model, loss_fn, batch = make()
            if quantity == "norms":
                call = partial(ghost.norms, model, loss_fn, batch)
            else:
                call = partial(ghost.inner, model, loss_fn, batch)
            contenders = {"ghost": call}
            if args.forms:
                contenders["ghost (all factored)"] = _forced("factored", call)
                contenders["ghost (all materialised)"] = _forced("materialised", call)
            macs = None
            if args.floor and quantity == "gram":
                contenders["floor: activation gradients"] = activation_gradients(
                    model, loss_fn, batch
                )
                contenders["floor: reductions alone"], macs = reductions_alone(
                    ghost, model, loss_fn, batch
                )
            values, plain_s = ratios(model, loss_fn, batch, contenders, **opts)
            for name, v in values.items():
                goal = target if name == "ghost" else None
                median = _row(label, quantity, name, v, plain_s, goal)
                failed += name == "ghost" and median > target
            if macs is not None:
                parts = ("floor: activation gradients", "floor: reductions alone")
                total = [sum(values[p][k] for p in parts) for k in range(args.rounds)]
                _row(label, quantity, "floor: sum of the two", total, plain_s)
                seconds = statistics.median(values[parts[1]]) * plain_s
                print(
                    f"{'':28s} {'':6s} Linear-like reductions: {macs / 1e9:.2f} G multiply-adds, "
                    f"{macs / seconds / 1e9:.0f} G/s over all reductions' time"
                )

    if "zoo" in only:
        peers = [n for n in ("opacus_ghost", "backpack") if n in impls.names()]
        if len(peers) < 2:
            print(f"zoo comparison skipped: registered peers {peers} (need opacus_ghost, backpack)")
        for case in CASES if len(peers) == 2 else []:
            if not case.defined:
                continue
            model, batch = case.make_model(), case.make_batch(args.zoo_batch)
            contenders = {"ghost": partial(ghost.norms, model, case.loss_fn, batch)}
            for peer in peers:
                call = partial(impls.get(peer).norms, model, case.loss_fn, batch)
                try:
                    call()
                except Unsupported:
                    continue
                contenders[peer] = call
            if len(contenders) < 3:
                continue  # the target compares cases both peers run
            values, plain_s = ratios(model, case.loss_fn, batch, contenders, **opts)
            label = f"zoo {case.name}, B={args.zoo_batch}"
            for name, v in values.items():
                _row(label, "norms", name, v, plain_s)
            versus = [g / min(values[p][k] for p in peers) for k, g in enumerate(values["ghost"])]
            median = _row(label, "norms", "ghost / best peer", versus, plain_s, 0.9)
            failed += median > 0.9
    if args.calibrate:
        calibrate(args.threads, args.min_run_time, args.clock)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
