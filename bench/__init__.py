"""Benchmarks. Each is `python -m bench.<name>` and rewrites its own section of docs/BENCHMARKS.md."""
