"""report.md for ``loraplex explain``: the answers first (with the measured numbers), the
recommendation and the merged-or-not table, then every scenario's table and plot."""
from __future__ import annotations

import math
import re
from typing import Any

from loraplex.bench.explain import Plan, ScenarioResult
from loraplex.bench.scenarios import adapters_label

NOISY = 0.10  # other processes' share of the CPU time above which the report warns
SAME = 0.05  # ratios within 5% of each other (or of 1) read as "no change"
_RATIO = re.compile(r"\bvs\b|\w/\w+ (?!ms)|\w/\w+$")  # "x vs y", "a/b c8", "a/b" (not "tok/s")


def fmt(value: Any, column: str = "") -> str:
    """Ratios as 0.87x, times and rates with one decimal, the rest as is."""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if is_ratio(column):
            return f"{value:.2f}x"
        return f"{value:.1f}"
    return str(value)


def is_ratio(name: str) -> bool:
    """Columns and headline names that hold a ratio ("tok/s vs base", "warm/base")."""
    return bool(_RATIO.search(name)) and "tok/s" != name.split()[-1] and not name.endswith(" ms")


def table(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c], c) for c in columns) + " |" for row in rows]
    return lines


def x(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}x"


def fmt_share(value: float | None) -> str:
    return "an unknown share" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def pct_slower(ratio: float) -> str:
    """A throughput ratio as words: '23% lower', '4% higher'."""
    if math.isnan(ratio):
        return "n/a"
    return f"{abs(1 - ratio) * 100:.0f}% {'lower' if ratio < 1 else 'higher'}"


class Facts:
    """The headline numbers the answers and the recommendation quote (None when the
    scenario was not measured)."""

    def __init__(self, results: list[ScenarioResult], plan: Plan) -> None:
        self.by_key = {r.key: r for r in results}
        self.plan = plan

    def get(self, key: str, name: str) -> float | None:
        r = self.by_key.get(key)
        return r.headline.get(name) if r is not None and r.measured else None

    def measured(self, key: str) -> bool:
        return key in self.by_key and self.by_key[key].measured

    def reason(self, key: str) -> str:
        r = self.by_key.get(key)
        return "not run" if r is None else r.reason

    def per_concurrency(self, key: str, name: str) -> dict[int, float]:
        return {c: v for c in self.plan.concurrencies if (v := self.get(key, f"{name} c{c}")) is not None}


def answers(f: Facts) -> list[str]:
    plan = f.plan
    lines = ["## The answers", ""]
    unmerged = f.per_concurrency("concurrency", "unmerged/base")
    c_lo, c_hi = plan.concurrencies[0], plan.concurrencies[-1]
    why = ["**Why is my LoRA slower?**", ""]
    if unmerged:
        why.append(f"- *Unmerged compute.* With your adapter applied at run time, output throughput is "
                   f"{x(unmerged.get(c_lo))} the base model's at {c_lo} concurrent request(s) "
                   f"({pct_slower(unmerged.get(c_lo, math.nan))}) and {x(unmerged.get(c_hi))} at {c_hi}: every "
                   "targeted projection does two extra small matrix products (shrink to rank r, expand back).")
    if f.measured("ttft"):
        why.append(f"- *Adapter load on the first request.* A cold adapter (read from disk when the request "
                   f"arrives) adds {f.get('ttft', 'cold extra ms'):.0f} ms to the time to first token "
                   f"({x(f.get('ttft', 'cold/base'))} the base's TTFT); once it is loaded (warm), "
                   f"TTFT is {x(f.get('ttft', 'warm/base'))} the base's.")
    if f.measured("shared"):
        why.append(f"- *Shared hardware.* Beside {plan.shared_others} requests of other tenants, your "
                   f"requests take {x(f.get('shared', 'shared/dedicated E2EL'))} as long end to end as "
                   f"alone (time per output token {x(f.get('shared', 'shared/dedicated TPOT'))}, first "
                   f"token {x(f.get('shared', 'shared/dedicated TTFT'))}).")
    why.append("- *No speculative decoding.* " + (
        f"With it, your adapter runs at {x(next(iter(f.per_concurrency('speculative', 'unmerged + speculative/base').values()), None))} "
        "the base's throughput (see below)." if f.measured("speculative") else
        f"Not measured here ({f.reason('speculative')})."))
    factors = {"the unmerged adapter's compute": 1 / min(unmerged.values()) if unmerged else None,
               "the adapter's load on a cold first request (TTFT)": f.get("ttft", "cold/base"),
               "sharing the hardware with other tenants": f.get("shared", "shared/dedicated E2EL")}
    factors = {k: v for k, v in factors.items() if v is not None and not math.isnan(v)}
    if factors:
        top = max(factors, key=factors.get)
        why.append(f"\nOf these, the largest factor measured in this run is {top} ({x(factors[top])}).")
    lines += why + [""]

    lines += ["**Does concurrency change it?**", ""]
    if unmerged:
        values = ", ".join(f"{x(v)} at {c}" for c, v in unmerged.items())
        lo, hi = unmerged.get(c_lo, math.nan), unmerged.get(c_hi, math.nan)
        trend = ("stays about the same" if abs(hi - lo) <= SAME else
                 "grows with concurrency" if hi < lo else "shrinks with concurrency")
        lines += [f"Adapter / base throughput: {values}. The overhead {trend}.", ""]
    lines += ["**Does the number of adapters change it?**", ""]
    if f.measured("adapters"):
        counts = ", ".join(f"{x(f.get('adapters', f'{adapters_label(k)}/base'))} with {k}" for k in plan.adapter_counts)
        lines.append(f"Distinct adapters in one batch of {plan.adapters_concurrency} requests, throughput vs "
                     f"base: {counts}.")
    if f.measured("registered"):
        reg = f.get("registered", "many/few registered")
        lines.append(f"Registering {plan.num_registered} more adapters (loaded, not used by the traffic): "
                     f"{x(reg)} the throughput with few registered"
                     + (" -- no measurable effect." if abs(reg - 1) <= SAME else "."))
    lines += [""]

    lines += ["**What would merging buy?**", ""]
    merged = f.per_concurrency("merged", "merged/base")
    if merged:
        gain = f.per_concurrency("merged", "merged/unmerged")
        lines.append("Merged into the base, your model runs at " + ", ".join(
            f"{x(v)} the base at {c}" for c, v in merged.items()) + "; against the unmerged adapter, "
            "measured in the same rounds, that is " + ", ".join(f"{x(v)} at {c}" for c, v in gain.items())
            + ". The price: this deployment then serves only this one adapter.")
    else:
        lines.append(f"Not measured here ({f.reason('merged')}). A merged model computes exactly what the base "
                     "computes, so the most it can win back is the unmerged overhead above"
                     + (f" (up to {x(1 / min(unmerged.values()))} throughput)." if unmerged else "."))
    lines += ["", "**What would speculative decoding buy?**", ""]
    spec = f.per_concurrency("speculative", "unmerged + speculative/base")
    if spec:
        gain = f.per_concurrency("speculative", "unmerged + speculative/unmerged")
        lines.append("With speculative decoding your adapter runs at " + ", ".join(
            f"{x(v)} the base at {c}" for c, v in spec.items()) + " (" + ", ".join(
            f"{x(v)} the adapter without it at {c}" for c, v in gain.items()) + ").")
    else:
        lines.append(f"Not measured here ({f.reason('speculative')}).")
    return lines + [""]


def recommendation(f: Facts) -> list[str]:
    plan = f.plan
    unmerged = f.per_concurrency("concurrency", "unmerged/base")
    merged = f.per_concurrency("merged", "merged/base")
    spec = f.per_concurrency("speculative", "unmerged + speculative/base")
    c_lo, c_hi = plan.concurrencies[0], plan.concurrencies[-1]
    worst = min(unmerged.values()) if unmerged else math.nan
    lines = ["## Recommendation", ""]
    if not math.isnan(worst) and worst < 1 - SAME:
        lines.append(f"- **One adapter takes all of a deployment's traffic and latency matters: merge it** "
                     f"and serve it on dedicated hardware. Unmerged it costs up to {pct_slower(worst)} "
                     "throughput here" + (f"; merged it measured {x(min(merged.values()))}-"
                                          f"{x(max(merged.values()))} the base." if merged else
                                          "; merging was not measured in this run."))
    else:
        lines.append(f"- **Unmerged is already close to the base here** (worst {x(worst)}): merging buys little.")
    adapters_k = f.get("adapters", f"{adapters_label(plan.adapter_counts[-1])}/base")
    lines.append(f"- **Several adapters or experiments: keep them unmerged on one deployment (multi-LoRA).** "
                 f"{plan.adapter_counts[-1]} distinct adapters in one batch ran at {x(adapters_k)} the base; "
                 f"with {plan.num_registered} more adapters registered, the same traffic ran at "
                 f"{x(f.get('registered', 'many/few registered'))} the throughput with few.")
    if spec:
        best = max(spec.values())
        lines.append(f"- **Speculative decoding**: {'worth adding' if best > 1 + SAME else 'did not pay off here'} "
                     f"(adapter + speculation {x(best)} the base at best).")
    else:
        lines.append(f"- **Speculative decoding**: not measured ({f.reason('speculative')}); train a draft for "
                     "your adapter and run `loraplex explain --draft DRAFT` to see what it buys.")
    shared_e2el = f.get("shared", "shared/dedicated E2EL")
    lines += ["", "Merged or not, with this run's numbers:", "",
              "| | multi-LoRA, unmerged | merged |", "|---|---|---|",
              "| use case | many fine-tuned variants on one deployment | one model, lowest latency |",
              f"| hardware | shared or dedicated (shared here: your latency {x(shared_e2el)} of dedicated) "
              "| dedicated |",
              f"| performance | {x(unmerged.get(c_lo))} base throughput at {c_lo} request(s), {x(unmerged.get(c_hi))} "
              f"at {c_hi}; cold first request +{f.get('ttft', 'cold extra ms') or math.nan:.0f} ms TTFT | "
              + (", ".join(f"{x(v)} base at {c}" for c, v in merged.items()) if merged else
                 f"not measured ({f.reason('merged')})") + " |",
              f"| concurrency | {plan.adapter_counts[-1]} adapters in one batch: {x(adapters_k)} base | "
              "one fine-tuned model only |", ""]
    return lines


def render(results: list[ScenarioResult], machine: dict[str, Any], plan: Plan,
           images: dict[str, str]) -> str:
    f = Facts(results, plan)
    m = machine
    lines = ["# Why is my LoRA slower? (loraplex explain)", "",
             f"Model `{m['model']}`, adapter `{m['adapter']}` (rank {m['adapter_rank']}, on "
             f"{', '.join(m['adapter_targets'])}, {m['adapter_mb'] * 1000:.0f} kB as the engine holds it). "
             f"{m['dtype']} on {m['device']} ({m['cpu']}, {m['cores']} cores, {m['threads']} threads, "
             f"torch {m['torch']}); {m['mode']} run of {m['seconds']:.0f} s on {m['date']}.", "",
             "Every ratio is the median of pairwise ratios from interleaved runs (A B A B ...) in this "
             "one process, after a warm-up; absolute times move with the machine's load "
             f"(load average at the start: {', '.join(f'{v:.2f}' for v in m['load_average'] or [])}; "
             f"other processes used {fmt_share(m.get('others_cpu'))} of the machine's CPU time during the run), "
             "ratios much less.", ""]
    others = m.get("others_cpu")
    if others is not None and not math.isnan(others) and others > NOISY:
        lines += [f"**Noisy run:** other processes took {fmt_share(others)} of the CPU time while this ran; "
                  "ratios from few rounds can be far off. Rerun on a quiet machine (or without --quick) "
                  "before acting on them.", ""]
    lines += answers(f) + recommendation(f)
    lines += ["## The measurements", ""]
    plot_of = {"ttft": "ttft", "shared": "ttft", "concurrency": "concurrency", "merged": "concurrency",
               "speculative": "concurrency", "peer": "concurrency", "adapters": "adapters"}
    shown: set[str] = set()
    for r in results:
        lines += [f"### {r.title}", "", f"*{r.question}*", ""]
        if not r.measured:
            lines += [f"Not measured: {r.reason}", ""]
            continue
        lines += table(r.columns, r.rows) + [""]
        lines += [f"Note: {note}." for note in r.notes]
        image = images.get(plot_of.get(r.key, ""))
        if image and image not in shown:
            shown.add(image)
            lines += ["", f"![{r.key}]({image})"]
        lines += [""]
    if "error" in images:
        lines += [f"Plots not drawn: {images['error']}.", ""]
    lines += ["## Method", "",
              f"Prompts: random real words from the tokenizer's vocabulary, exactly {plan.prompt_len} tokens "
              f"({plan.ttft_prompt_len} for the TTFT scenario), fresh for every arm and round; greedy, "
              f"{plan.output_len} output tokens per request (end-of-sequence ignored); prefix caching off. "
              f"{plan.rounds} measured round(s) per comparison, after one untimed batch of every shape "
              f"and {plan.warmup} discarded warm-up round(s) per comparison. A batch of N requests is "
              "submitted at once (concurrency N) through the engine's request path; output tok/s is its "
              "tokens over its wall time, TTFT and TPOT are per-request means.", ""]
    return "\n".join(lines)


def summary_line(results: list[ScenarioResult]) -> str:
    parts = []
    for r in results:
        if not r.measured:
            parts.append(f"{r.key} not measured")
            continue
        parts.append(f"{r.key} " + " ".join(f"{k} {fmt(v, k)}"
                                             for k, v in list(r.headline.items())[:3]))
    return "explain: " + " | ".join(parts)
