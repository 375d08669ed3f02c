"""Benchmarks users run: ``loraplex bench`` (a serving load test) and ``loraplex explain``
(why an adapter is slower than its base, measured in-process)."""
