"""Benchmark scripts (run with ``python -m benchmarks.<name>``; see docs/benchmarks.md)."""
