"""pegbench's benchmark: time and memory of every implementation across batch sizes.

- ``bench.cases``: the bench cases (the zoo's families at realistic sizes)
- ``bench.timing``: interleaved ``torch.utils.benchmark.Timer`` rounds, time limits
- ``bench.memory``: peak memory of one call (memray on CPU, the CUDA allocator on GPU)
- ``bench.sweep``: ``plan`` the cells, ``Sweep(store, settings).run(cells)`` measures them
- ``bench.store``: the tidy table on disk (atomic CSV writes, resume)
- ``bench.report``: REPORT.md and the plots from the tables
- ``python -m bench``: the command line (``bench/__main__.py``)
"""
