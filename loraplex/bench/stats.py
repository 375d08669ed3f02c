"""Small numeric helpers shared by ``bench`` and ``explain``: summaries, pairwise ratios,
interleaved runs, atomic writes (BENCHMARKS.md: ratios from interleaved runs, medians of
pairwise ratios, never a ratio of medians)."""
from __future__ import annotations

import gc
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NAN = float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]; nan if empty."""
    if not values:
        return NAN
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, median, p99 and std of ``values`` times ``scale`` (nan when empty)."""
    v = [x * scale for x in values]
    if not v:
        return {"mean": NAN, "median": NAN, "p99": NAN, "std": NAN}
    return {"mean": statistics.fmean(v), "median": statistics.median(v),
            "p99": percentile(v, 99), "std": statistics.pstdev(v)}


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the pairwise ratios a[i] / b[i]; nan when a pair is missing or zero."""
    if len(a) != len(b) or not a:
        raise ValueError(f"median_ratio: need two equal, non-empty lists, got {len(a)} and {len(b)}")
    pairs = [x / y for x, y in zip(a, b) if y and not (math.isnan(x) or math.isnan(y))]
    return statistics.median(pairs) if pairs else NAN


def interleave(arms: dict[str, Callable[[int], Any]], rounds: int,
               warmup: int = 1) -> dict[str, list[Any]]:
    """Run the arms in turn (A B A B ...): ``warmup`` rounds discarded, then ``rounds``
    kept. Each arm gets the round index (negative while warming up) so it can draw fresh
    prompts per round, the same for every arm of a round."""
    results: dict[str, list[Any]] = {name: [] for name in arms}
    for r in range(-warmup, rounds):
        for name, run in arms.items():
            gc.collect()  # a collection inside a timed run would land on one arm only
            out = run(r)
            if r >= 0:
                results[name].append(out)
    return results


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file in the same folder and a rename, so a reader
    never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
