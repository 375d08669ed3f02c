"""The numeric helpers behind both commands, against numpy and by hand."""
from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest

from loraplex.bench.stats import interleave, median_ratio, percentile, summarize, write_atomic


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(percentile([], 50))
    s = summarize([1.0, 2.0, 3.0, 10.0], scale=1000)
    assert s["mean"] == 4000 and s["median"] == 2500 and s["p99"] == pytest.approx(np.percentile([1, 2, 3, 10], 99) * 1000)
    assert all(math.isnan(v) for v in summarize([]).values())


def test_median_ratio_is_pairwise_not_a_ratio_of_medians():
    a, b = [1.0, 10.0, 3.0], [2.0, 5.0, 1.0]  # pairwise 0.5, 2, 3 -> 2; medians 3 / 2 = 1.5
    assert median_ratio(a, b) == 2.0
    with pytest.raises(ValueError, match="equal"):
        median_ratio([1.0], [1.0, 2.0])


def test_interleave_alternates_and_discards_warmup():
    calls = []
    out = interleave({"a": lambda r: calls.append(("a", r)) or r, "b": lambda r: calls.append(("b", r)) or -r},
                     rounds=2, warmup=1)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert out == {"a": [0, 1], "b": [0, -1]}


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_atomic(path, "first")
    write_atomic(path, b"second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["results.json"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
