"""``loraplex bench`` results: the JSON document and the table printed at the end (the
layout users know from ``vllm bench serve``)."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from typing import Any

from loraplex.bench.client import RequestResult
from loraplex.bench.stats import summarize

METRICS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
           ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"))


def latency_summary(results: list[RequestResult]) -> dict[str, dict[str, float]]:
    """TTFT, TPOT, ITL (pooled) and E2EL in milliseconds: mean, median, p99, std."""
    ok = [r for r in results if r.success]
    return {"ttft": summarize([r.ttft_s for r in ok], 1000),
            "tpot": summarize([r.tpot_s for r in ok if r.tpot_s is not None], 1000),
            "itl": summarize([x for r in ok for x in r.itl_s], 1000),
            "e2el": summarize([r.e2el_s for r in ok], 1000)}


def build_results(results: list[RequestResult], wall_s: float, config: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    per_model: dict[str, Any] = {}
    for model in dict.fromkeys(r.model for r in results):  # first-seen order
        mine = [r for r in results if r.model == model]
        per_model[model] = {"num_requests": len(mine),
                            "completed": sum(r.success for r in mine),
                            "failed": sum(not r.success for r in mine),
                            "output_tokens": sum(r.output_tokens or 0 for r in mine if r.success),
                            **latency_summary(mine)}
    mismatched = [r.index for r in ok if r.expected_prompt_tokens is not None
                  and r.prompt_tokens != r.expected_prompt_tokens]
    return {
        "config": config,
        "duration_s": wall_s,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.success).most_common()),
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / wall_s if wall_s > 0 else math.nan,
        "output_throughput": output_tokens / wall_s if wall_s > 0 else math.nan,
        "total_token_throughput": (prompt_tokens + output_tokens) / wall_s if wall_s > 0 else math.nan,
        # The client's count of prompt tokens (same tokenizer) against the server's usage.
        "prompt_token_mismatches": mismatched,
        **latency_summary(results),
        "per_model": per_model,
        "requests": [asdict(r) | {"tpot_s": r.tpot_s} for r in results],
    }


def to_json(doc: dict[str, Any]) -> str:
    """JSON with NaN written as null (NaN is not JSON)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(doc), indent=1) + "\n"


def _or_dash(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else format("-", spec[0] + spec[1:].split(".")[0])


def format_table(doc: dict[str, Any]) -> str:
    width = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=width, c="=")]

    def row(label: str, value: Any, spec: str = "") -> None:
        text = format(value, spec) if isinstance(value, (int, float)) else str(value)
        lines.append(f"{label:<40}{text:<10}")

    row("Successful requests:", doc["completed"])
    row("Failed requests:", doc["failed"])
    c = doc["config"]
    row("Maximum request concurrency:", c.get("max_concurrency") or "none")
    row("Request rate (req/s):", c.get("request_rate"))
    row("Benchmark duration (s):", doc["duration_s"], ".2f")
    row("Total input tokens:", doc["total_input_tokens"])
    row("Total generated tokens:", doc["total_output_tokens"])
    row("Request throughput (req/s):", doc["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", doc["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", doc["total_token_throughput"], ".2f")
    for key, short, title in METRICS:
        lines.append("{s:{c}^{n}}".format(s=title, n=width, c="-"))
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {short} (ms):", doc[key][stat], ".2f")
    if len(doc["per_model"]) > 1:
        lines.append("{s:{c}^{n}}".format(s="Per model (median ms)", n=width, c="-"))
        lines.append(f"{'model':<20}{'ok/n':>8}{'TTFT':>8}{'TPOT':>7}{'E2EL':>7}")
        for model, m in doc["per_model"].items():
            name = model if len(model) <= 19 else "..." + model[-16:]
            cells = [_or_dash(m[key]["median"], spec) for key, spec in
                     (("ttft", ">8.1f"), ("tpot", ">7.1f"), ("e2el", ">7.0f"))]
            lines.append(f"{name:<20}{m['completed']:>4}/{m['num_requests']:<3}" + "".join(cells))
    if doc["errors"]:
        lines.append("{s:{c}^{n}}".format(s="Errors", n=width, c="-"))
        for error, count in doc["errors"].items():
            lines.append(f"{count:>5} x {error[:120]}")
    lines.append("=" * width)
    return "\n".join(lines)
