"""PNG plots for ``loraplex explain`` (matplotlib, the optional extra ``loraplex[explain]``;
imported here only). Each plot is written atomically; without matplotlib none is drawn and
the report says so."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from loraplex.bench.explain import ScenarioResult
from loraplex.bench.stats import write_atomic

# (scenario, arm, label): curves of throughput relative to the base model of the same rounds
RELATIVE_CURVES = (("concurrency", "unmerged", "unmerged adapter"), ("merged", "merged", "merged"),
                   ("speculative", "unmerged + speculative", "adapter + speculative"))
COLORS = {"base": "C0", "unmerged": "C1", "merged": "C2", "unmerged + speculative": "C3"}


def write_plots(results: list[ScenarioResult], out: Path) -> dict[str, str]:
    """Draw what the measured scenarios allow; returns {plot key: file name} or
    {"error": why none was drawn}."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return {"error": "matplotlib is not installed (pip install 'loraplex[explain]')"}
    by_key = {r.key: r for r in results if r.measured}
    images: dict[str, str] = {}

    def save(fig: Any, key: str) -> None:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        write_atomic(out / f"{key}.png", buffer.getvalue())
        images[key] = f"{key}.png"

    if "ttft" in by_key or "shared" in by_key:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in ((axes[0], "ttft", "one prompt, alone"),
                               (axes[1], "shared", "your requests, alone vs shared")):
            r = by_key.get(key)
            if r is None:
                ax.set_axis_off()
                continue
            ax.bar(r.series["arms"], r.series["ttft_ms"], color=["#4c72b0", "#dd8452", "#c44e52"][:len(r.series["arms"])])
            ax.set_ylabel("TTFT (ms, median)")
            ax.set_title(f"Time to first token: {title}")
            ax.tick_params(axis="x", labelrotation=15)
        save(fig, "ttft")

    if "concurrency" in by_key:
        # Absolute rates only side by side from the same rounds; across scenarios (measured
        # minutes apart, under another load) only ratios to their own base compare.
        r = by_key["concurrency"]
        concurrencies = r.series["concurrency"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for arm, values in r.series["tok_s"].items():
            left.plot(concurrencies, values, marker="o", label=arm, color=COLORS.get(arm))
        left.set_ylabel("output tokens / s")
        left.set_title("Throughput, base vs adapter (same rounds)")
        right.axhline(1.0, color="gray", linestyle="--", label="base model")
        for key, arm, label in RELATIVE_CURVES:
            if key in by_key:
                rows = [row for row in by_key[key].rows if row["arm"] == arm]
                right.plot([row["concurrency"] for row in rows], [row["tok/s vs base"] for row in rows],
                           marker="o", label=label, color=COLORS.get(arm))
        right.set_ylabel("throughput / base (median of pairwise ratios)")
        right.set_title("Relative to the base model")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.minorticks_off()
            ax.set_xlabel("concurrent requests")
            ax.legend()
            ax.grid(alpha=0.3)
        save(fig, "concurrency")

    if "adapters" in by_key:
        r = by_key["adapters"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(r.series["counts"], r.series["tok_s"], marker="o", label="unmerged adapters")
        ax.axhline(r.series["base"], color="gray", linestyle="--", label="base model")
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("output tokens / s")
        ax.set_ylim(bottom=0)
        ax.set_title(r.title)
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "adapters")
    return images
