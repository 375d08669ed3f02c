"""PNG plots for ``loraplex explain`` (matplotlib, the optional extra ``loraplex[explain]``;
imported here only). Each plot is written atomically; without matplotlib none is drawn and
the report says so."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from loraplex.bench.explain import ScenarioResult
from loraplex.bench.stats import write_atomic

# arm name in a scenario's series -> (label, scenario it is taken from)
THROUGHPUT_CURVES = (("base", "concurrency", "base"), ("unmerged", "concurrency", "unmerged adapter"),
                     ("merged", "merged", "merged"),
                     ("unmerged + speculative", "speculative", "adapter + speculative"),
                     ("transformers + PEFT", "peer", "transformers + PEFT"))


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

    curves = [(label, by_key[key].series["tok_s"][arm], by_key[key].series["concurrency"])
              for arm, key, label in THROUGHPUT_CURVES
              if key in by_key and arm in by_key[key].series.get("tok_s", {})]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, values, concurrencies in curves:
            ax.plot(concurrencies, values, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({c for _, _, cs in curves for c in cs})
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s")
        ax.set_title("Throughput against concurrency")
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
