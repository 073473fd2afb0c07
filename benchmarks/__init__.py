"""Benchmarks and regression gates of zeroline: python -m benchmarks (see __main__.py)."""
