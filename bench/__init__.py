"""Benchmarks: workloads, baselines, runners. Results go to docs/benchmarks.md."""
