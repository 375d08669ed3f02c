"""The scenarios of BENCHMARKS.md, one function each, run by ``explain.run_explain`` in the
order of ``SCENARIOS``. Every comparison is interleaved (A B A B ... after a warm-up round)
on fresh prompts per arm and round, and quoted as the median of the pairwise ratios.

Merging (``LLM(model, merge=PATH)``) and speculative decoding (``LLM(..., speculative=
SpecConfig(...))``) are measured through those APIs when this loraplex has them; until then
their scenarios say "not measured" with the error the constructor gave.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from loraplex.bench.explain import ExplainContext, ScenarioResult
from loraplex.bench.measure import run_batch, small_adapter
from loraplex.bench.stats import interleave, median_ratio
from loraplex.lora.request import LoRARequest

Arm = Callable[[list[str]], dict[str, float]]


def measure_arms(ctx: ExplainContext, tag: str, arms: dict[str, Arm], count: int,
                 prompt_len: int | None = None, rounds: int | None = None) -> dict[str, list[dict]]:
    """Interleave ``arms``, each given ``count`` fresh prompts per round."""
    def with_prompts(name: str, arm: Arm) -> Callable[[int], dict[str, float]]:
        return lambda r: arm(ctx.prompts(f"{tag}/{name}", r, count, prompt_len))
    return interleave({name: with_prompts(name, arm) for name, arm in arms.items()},
                      rounds or ctx.plan.rounds, ctx.plan.warmup)


def med(runs: list[dict], key: str, scale: float = 1.0) -> float:
    return statistics.median(run[key] for run in runs) * scale


def ratio(res: dict[str, list[dict]], a: str, b: str, key: str = "tok_s") -> float:
    return median_ratio([x[key] for x in res[a]], [x[key] for x in res[b]])


def adapters_label(k: int) -> str:
    return f"{k} adapter" + ("s" if k != 1 else "")


def lora_arm(llm: Any, lora: LoRARequest | None, max_tokens: int) -> Arm:
    return lambda prompts: run_batch(llm, prompts, max_tokens, [lora] * len(prompts))


def throughput_rows(ctx: ExplainContext, tag: str, arms: Callable[[int], dict[str, Arm]],
                    result: ScenarioResult, concurrencies: tuple[int, ...],
                    also: tuple[str, str] | None = None) -> None:
    """At each concurrency: tok/s, TPOT and TTFT of every arm, and each arm's ratio to the
    first arm (the reference), into ``result``; ``also`` = (a, b) adds the headline a/b."""
    ref = next(iter(arms(concurrencies[0])))
    vs_tok, vs_tpot = f"tok/s vs {ref}", f"TPOT vs {ref}"
    result.columns = ["concurrency", "arm", "output tok/s", "TPOT ms", "TTFT ms", vs_tok, vs_tpot]
    result.series = {"concurrency": list(concurrencies), "tok_s": {}}
    for c in concurrencies:
        arm_map = arms(c)
        res = measure_arms(ctx, f"{tag}/c{c}", arm_map, c)
        for name in arm_map:
            row = {"concurrency": c, "arm": name, "output tok/s": med(res[name], "tok_s"),
                   "TPOT ms": med(res[name], "tpot_s", 1000), "TTFT ms": med(res[name], "ttft_s", 1000),
                   vs_tok: ratio(res, name, ref), vs_tpot: ratio(res, name, ref, "tpot_s")}
            result.rows.append(row)
            result.series["tok_s"].setdefault(name, []).append(row["output tok/s"])
            if name != ref:
                result.headline[f"{name}/{ref} c{c}"] = row[vs_tok]
        if also is not None:
            result.headline[f"{also[0]}/{also[1]} c{c}"] = ratio(res, *also)


# ---- the scenarios -------------------------------------------------------------------------


def ttft(ctx: ExplainContext) -> ScenarioResult:
    """Base vs the adapter warm (in a slot) vs cold (a never-seen copy, read from disk at
    arrival): one prompt of ``ttft_prompt_len`` tokens, one output token."""
    result = ScenarioResult("ttft", "Time to first token: base, adapter warm, adapter cold",
                            "What does the adapter cost before the first token?")
    llm, plan = ctx.llm, ctx.plan
    arms: dict[str, Arm] = {
        "base": lora_arm(llm, None, 1),
        "adapter, warm": lora_arm(llm, ctx.user, 1),
        "adapter, cold": lambda prompts: run_batch(llm, prompts, 1, [ctx.cold_copy()]),
    }
    res = measure_arms(ctx, "ttft", arms, 1, plan.ttft_prompt_len, rounds=2 * plan.rounds + 1)
    result.columns = ["arm", "TTFT ms (median)", "vs base"]
    for name in arms:
        result.rows.append({"arm": name, "TTFT ms (median)": med(res[name], "ttft_s", 1000),
                            "vs base": ratio(res, name, "base", "ttft_s")})
    result.headline = {"warm/base": ratio(res, "adapter, warm", "base", "ttft_s"),
                       "cold/base": ratio(res, "adapter, cold", "base", "ttft_s"),
                       "cold extra ms": 1000 * statistics.median(
                           c["ttft_s"] - w["ttft_s"] for c, w in zip(res["adapter, cold"], res["adapter, warm"]))}
    result.series = {"arms": list(arms), "ttft_ms": [r["TTFT ms (median)"] for r in result.rows]}
    result.notes.append(f"prompt {plan.ttft_prompt_len} tokens; cold = a copy of the adapter with "
                        "perturbed weights (new content), its files dropped from the page cache, "
                        "loaded when the request arrives (as the server does)")
    return result


def concurrency(ctx: ExplainContext) -> ScenarioResult:
    result = ScenarioResult("concurrency", "Throughput against concurrency: base vs unmerged adapter",
                            "Does the unmerged adapter's overhead change with concurrency?")
    out = ctx.plan.output_len
    throughput_rows(ctx, "conc", lambda c: {"base": lora_arm(ctx.llm, None, out),
                                            "unmerged": lora_arm(ctx.llm, ctx.user, out)},
                    result, ctx.plan.concurrencies)
    return result


def merged(ctx: ExplainContext) -> ScenarioResult:
    from loraplex.llm import LLM

    title, question = "Merged adapter (dedicated deployment)", "What does merging buy?"
    try:
        merged_llm = LLM(str(ctx.model_path), merge=str(ctx.adapter_path), **ctx.engine_options)
    except Exception as e:  # the merge API is not in this loraplex yet, or refused the adapter
        return ScenarioResult.not_measured("merged", title, question, f"{type(e).__name__}: {e}")
    result = ScenarioResult("merged", title, question)
    out = ctx.plan.output_len
    # merged_llm is freed when this returns (run_explain collects between scenarios).
    throughput_rows(ctx, "merged", lambda c: {"base": lora_arm(ctx.llm, None, out),
                                              "unmerged": lora_arm(ctx.llm, ctx.user, out),
                                              "merged": lora_arm(merged_llm, None, out)},
                    result, ctx.plan.concurrencies, also=("merged", "unmerged"))
    return result


def speculative_config(ctx: ExplainContext) -> Any:
    """The spec branch's SpecConfig: a draft model (--draft) or n-gram prompt lookup; the
    number of draft tokens left to its automatic choice."""
    from loraplex.config import SpecConfig  # type: ignore[attr-defined]

    if ctx.config.draft:
        return SpecConfig(method="draft", draft_model=str(ctx.config.draft))
    return SpecConfig(method="ngram")


def speculative(ctx: ExplainContext) -> ScenarioResult:
    from loraplex.llm import LLM

    title = "Speculative decoding (" + ("draft model " + ctx.config.draft if ctx.config.draft else "n-gram") + ")"
    question = "What does speculative decoding buy the adapter?"
    try:
        spec_llm = LLM(str(ctx.model_path), speculative=speculative_config(ctx),
                       **ctx.engine_options, **ctx.lora_options)
    except Exception as e:  # no SpecConfig / speculative= yet, or a refused draft
        return ScenarioResult.not_measured("speculative", title, question, f"{type(e).__name__}: {e}")
    result = ScenarioResult("speculative", title, question)
    out = ctx.plan.output_len
    throughput_rows(ctx, "spec", lambda c: {
        "base": lora_arm(ctx.llm, None, out), "unmerged": lora_arm(ctx.llm, ctx.user, out),
        "unmerged + speculative": lora_arm(spec_llm, ctx.user, out)},
        result, ctx.plan.concurrencies, also=("unmerged + speculative", "unmerged"))
    result.notes.append("prompts are random words; acceptance, and so the gain, depends on how "
                        "predictable your real traffic is")
    limit = getattr(speculative_config(ctx), "max_batch_size", None)
    if limit is not None:
        result.notes.append(f"speculation is off in steps that run more than {limit} sequences "
                            "(SpecConfig.max_batch_size)")
    return result


def num_adapters(ctx: ExplainContext) -> ScenarioResult:
    plan = ctx.plan
    c = plan.adapters_concurrency
    result = ScenarioResult("adapters", f"Throughput against the number of distinct adapters in one "
                            f"batch ({c} concurrent requests)",
                            "Does the number of adapters in use change it?")
    adapters = ctx.copies(max(plan.adapter_counts))
    out = plan.output_len
    arms: dict[str, Arm] = {"base": lora_arm(ctx.llm, None, out)}
    for k in plan.adapter_counts:
        arms[adapters_label(k)] = (lambda k: lambda prompts: run_batch(
            ctx.llm, prompts, out, [adapters[i % k] for i in range(len(prompts))]))(k)
    res = measure_arms(ctx, "adapters", arms, c)
    result.columns = ["arm", "output tok/s", "TPOT ms", "tok/s vs base"]
    for name in arms:
        result.rows.append({"arm": name, "output tok/s": med(res[name], "tok_s"),
                            "TPOT ms": med(res[name], "tpot_s", 1000),
                            "tok/s vs base": ratio(res, name, "base")})
    result.headline = {f"{adapters_label(k)}/base": ratio(res, adapters_label(k), "base")
                       for k in plan.adapter_counts}
    result.series = {"counts": list(plan.adapter_counts), "base": result.rows[0]["output tok/s"],
                     "tok_s": [r["output tok/s"] for r in result.rows[1:]]}
    result.notes.append("adapters beyond the first are copies of yours with lora_B scaled by "
                        "1 + k/1000: distinct adapters of the same size and cost")
    return result


def registered(ctx: ExplainContext) -> ScenarioResult:
    """The same traffic on two identical engines; one also has many other adapters registered
    (loaded in host memory, unused by this traffic)."""
    from loraplex.llm import LLM

    plan = ctx.plan
    n = plan.num_registered
    result = ScenarioResult("registered", f"Few vs {n} registered adapters, same traffic",
                            "Does the number of adapters deployed change it?")
    traffic = ctx.copies(min(4, max(plan.adapter_counts)))
    options = dict(ctx.lora_options, max_cpu_loras=n + ctx.lora_options["max_cpu_loras"])
    ctx.log(f"  second engine with {n} extra adapters ...")
    few = LLM(str(ctx.model_path), **ctx.engine_options, **options)
    many = LLM(str(ctx.model_path), **ctx.engine_options, **options)
    try:
        for llm in (few, many):
            for request in traffic:
                llm.engine.adapters.load_now(request)
        for i in range(n):
            path = small_adapter(ctx.adapter_path, ctx.scratch / f"registered-{i}", i)
            many.engine.adapters.load_now(LoRARequest(f"registered-{i}", str(path)))
        c = plan.adapters_concurrency

        def arm(llm: Any) -> Arm:
            return lambda prompts: run_batch(llm, prompts, plan.output_len,
                                             [traffic[i % len(traffic)] for i in range(len(prompts))])
        res = measure_arms(ctx, "registered", {f"{len(traffic)} registered": arm(few),
                                               f"{len(traffic) + n} registered": arm(many)}, c)
    finally:
        del few, many  # two engines' memory, before the next scenario
    names = list(res)
    result.columns = ["arm", "output tok/s", f"vs {names[0]}"]
    for name in names:
        result.rows.append({"arm": name, "output tok/s": med(res[name], "tok_s"),
                            f"vs {names[0]}": ratio(res, name, names[0])})
    result.headline = {"many/few registered": ratio(res, names[1], names[0])}
    result.notes.append(f"{c} concurrent requests over {len(traffic)} adapters; the {n} extra "
                        "adapters are rank-1 single-projection cuts of yours, loaded in host memory")
    return result


def shared(ctx: ExplainContext) -> ScenarioResult:
    """The user's requests alone (dedicated) vs the same requests while other tenants'
    requests (base and other adapters) share the batches."""
    plan = ctx.plan
    mine, others = plan.shared_mine, plan.shared_others
    result = ScenarioResult("shared", f"Shared vs dedicated: {mine} of your requests alone, and "
                            f"beside {others} requests of other tenants",
                            "What does sharing the hardware with other tenants cost?")
    tenants = ctx.copies(max(2, min(4, max(plan.adapter_counts))))[1:]
    other_loras = [None if i % 2 == 0 else tenants[i // 2 % len(tenants)] for i in range(others)]
    out = plan.output_len

    def dedicated(prompts: list[str]) -> dict[str, float]:
        return run_batch(ctx.llm, prompts[:mine], out, [ctx.user] * mine)

    def with_others(prompts: list[str]) -> dict[str, float]:
        return run_batch(ctx.llm, prompts, out, [ctx.user] * mine + other_loras,
                         measured=[True] * mine + [False] * others)
    res = measure_arms(ctx, "shared", {"dedicated": dedicated, "shared": with_others}, mine + others)
    result.columns = ["arm", "TTFT ms", "TPOT ms", "E2EL ms", "your tok/s", "E2EL vs dedicated"]
    for name in res:
        result.rows.append({"arm": name, "TTFT ms": med(res[name], "ttft_s", 1000),
                            "TPOT ms": med(res[name], "tpot_s", 1000),
                            "E2EL ms": med(res[name], "e2el_s", 1000),
                            "your tok/s": med(res[name], "tok_s"),
                            "E2EL vs dedicated": ratio(res, name, "dedicated", "e2el_s")})
    result.headline = {"shared/dedicated E2EL": ratio(res, "shared", "dedicated", "e2el_s"),
                       "shared/dedicated TPOT": ratio(res, "shared", "dedicated", "tpot_s"),
                       "shared/dedicated TTFT": ratio(res, "shared", "dedicated", "ttft_s")}
    result.series = {"arms": list(res), "ttft_ms": [r["TTFT ms"] for r in result.rows],
                     "tpot_ms": [r["TPOT ms"] for r in result.rows]}
    result.notes.append("other tenants: half base-model requests, half other adapters, in the same "
                        "engine and batches (continuous batching), all submitted at once")
    return result


def peer(ctx: ExplainContext) -> ScenarioResult:
    title = "transformers + PEFT (unmerged), the reference"
    question = "How does this compare with what you would otherwise run?"
    if not ctx.config.peer:
        return ScenarioResult.not_measured("peer", title, question, "turned off (--no-peer)")
    try:
        from loraplex.bench.peers import PeftPeer
        hf = PeftPeer(ctx.model_path, ctx.adapter_path, ctx.llm.engine.dtype)
    except ImportError as e:
        return ScenarioResult.not_measured("peer", title, question, f"not installed ({e})")
    result = ScenarioResult("peer", title, question)
    out = ctx.plan.output_len
    throughput_rows(ctx, "peer", lambda c: {
        "transformers + PEFT": lambda prompts: hf.generate(prompts, out),
        "loraplex unmerged": lora_arm(ctx.llm, ctx.user, out)}, result, ctx.plan.peer_concurrencies)
    return result


SCENARIOS: list[Callable[[ExplainContext], ScenarioResult]] = [
    ttft, concurrency, num_adapters, registered, shared, merged, speculative, peer]
