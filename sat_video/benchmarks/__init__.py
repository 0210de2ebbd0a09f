"""Benchmarks of sat_video against diffusers on the machine at hand: one module per section of benchmarks/RESULTS.md
(``run`` measures, ``render`` writes), assembled by ``report.py`` and run by ``tools/bench.py``."""
