"""Benchmarks: `python bench/run.py NAME` (or `python -m bench.run NAME`) from the repository root."""
