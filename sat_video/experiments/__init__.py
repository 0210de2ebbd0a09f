"""Experiments that serve the tools: ablation grids (tools/ablate.py) and benchmarks (tools/bench.py)."""
