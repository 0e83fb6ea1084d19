"""pegbench's benchmark: time and memory of every implementation across batch sizes.

- ``bench.compare(model, loss_fn, make_batch)``: every implementation on your own model, from a
  notebook; a DataFrame with the verdict attached (``bench.comparison``, docs/compare.md)
- ``bench.cases``: the bench cases (the zoo's families at realistic sizes)
- ``bench.timing``: interleaved ``torch.utils.benchmark.Timer`` rounds, time limits
- ``bench.memory``: peak memory of one call (memray on CPU, the CUDA allocator on GPU)
- ``bench.sweep``: ``plan`` the cells, ``Sweep(store, settings).run(cells)`` measures them
- ``bench.store``: the tidy table on disk (atomic CSV writes, checked reads, merges, resume)
- ``bench.report``: REPORT.md and the plots from the tables
- ``bench.gate`` / ``bench.baseline`` / ``bench.regress``: the regression gate's decisions,
  its baseline file, its command; ``bench.baseline_commit``: its last check of a time
  regression, the baseline's own commit measured on this machine
- ``python -m bench``: the command line (``bench/__main__.py``; the pieces every command line
  shares are ``correctness.cli``)

Importing ``bench`` imports nothing heavy: ``bench.compare`` loads ``bench.comparison`` (torch,
pandas, the implementations) when first used.
"""

__all__ = ["compare"]


def __getattr__(name: str):
    if name == "compare":
        from bench.comparison import compare

        return compare
    raise AttributeError(f"module 'bench' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), "compare"])
