"""Benchmarks of dropbp-fx: step time, the speed model's limit, activation memory, overhead.

Run them all, from the repository root::

    python -m benchmarks.run                 # the full run (about 25 minutes on 2 CPU cores)
    python -m benchmarks.run --quick         # tiny model, 1-2 rounds: a smoke test
    python -m benchmarks.run --device cuda   # the same benchmarks on a GPU

Results go to ``benchmarks/results/`` (JSON and a markdown report); the full run also
rewrites the summary between the ``bench`` markers of README.md.

Modules: :mod:`benchmarks.common` (models, candidates, timers, statistics),
:mod:`benchmarks.step_time` (benchmarks 1, 2 and 4), :mod:`benchmarks.memory`
(benchmark 3; its measurements run in worker subprocesses), :mod:`benchmarks.report`
(tables, README), :mod:`benchmarks.run` (the command line).
"""
