"""Benchmarks: one script per op or job (python -m bench.<name>), sharing bench/common.py."""
