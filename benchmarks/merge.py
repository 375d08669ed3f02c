"""Merging: what a merged adapter costs against the base, and whether auto-merge picks the
better of merged and unmerged as the traffic changes.

    python benchmarks/merge.py [--repeats N] [--quick] [--seed S]

One process, one engine: the default model in bfloat16, ``LLM(model, dtype="bfloat16",
max_loras=8, max_lora_rank=16, max_num_seqs=64, auto_merge=True)``; the auto-merge policy is
switched on only in the auto arms (``engine.auto_merge`` set or None), and the static arms
merge or unmerge with ``engine.merge_lora`` / ``unmerge_lora`` before their call. Adapter X
is a real PEFT adapter, r=16, alpha 32, all linear layers, lora_B ~ N(0, 0.02); seven more
are copies of it with lora_B redrawn (new content). Prompts are random token ids, fresh for
every round and arm; greedy, ``ignore_eos``. Throughput is the pure decode rate
(``common.pure_decode_rate``: median over the decode steps after every request's first
token of tokens / step time); figures are medians of pairwise ratios over interleaved
rounds, after one warm-up round.

1. Decode at concurrency 1 and 32 (64-token prompts, 64 output tokens): base (no adapter),
   X unmerged, X merged into the weights (requests naming X). Target: merged >= 0.97x base.
2. Traffic mixes at concurrency 32 (32 requests, 64-token prompts, 64 output tokens):
   skewed (29 requests for X, 3 for others) and uniform (4 for each of 8 adapters). Arms:
   always unmerged; always merged (X merged, the others get X's delta taken out); auto
   (a fresh policy, window 64 steps, share 0.7, first settles on untimed calls of the same
   mix that together run more than a window of steps, then the timed call: the steady state). Target: auto >= 0.95x the better
   static arm in each mix.
Also printed: the time one run-time merge of X takes (checkpoint read + delta + pack).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    clone_adapter, fmt_list, interleave, lp_generate, machine_lines, make_peft_adapter,
    median_ratio, others_cpu, random_prompts, ratios, say, verdict,
)

TARGET_MERGED = 0.97  # merged / base decode throughput, at least
TARGET_AUTO = 0.95  # auto / best static arm, at least
QUIET = 0.10  # other processes' median share of the CPUs above which the run is flagged noisy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds after the "
                    "warm-up round (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    prompt_len, out_len, conc = (16, 8, 8) if quick else (64, 64, 32)

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.lora.auto_merge import AutoMergePolicy
    from loraplex.models.registry import resolve_model

    for line in machine_lines(torch.bfloat16):
        say(line)
    model_path = resolve_model("smollm2-135m")
    root = Path(tempfile.mkdtemp(prefix="loraplex-merge-bench-"))
    x_path = root / "x"
    make_peft_adapter(model_path, x_path, args.seed, r=16, lora_alpha=32, target_modules="all-linear")
    paths = [x_path] + [clone_adapter(x_path, root / f"ad{i}", args.seed + i) for i in range(1, 8)]
    ads = [LoRARequest("x" if i == 0 else f"ad{i}", str(p)) for i, p in enumerate(paths)]
    llm = LLM("smollm2-135m", dtype="bfloat16", max_loras=8, max_lora_rank=16, max_num_seqs=64,
              auto_merge=True)
    engine = llm.engine
    share, window = engine.config.lora.auto_merge_share, engine.config.lora.auto_merge_window
    engine.auto_merge = None
    vocab = engine.arch.vocab_size
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    say(f"setup: smollm2-135m bf16 | adapters r16 alpha 32 all-linear (X + 7 redrawn copies) | "
        f"prompts {prompt_len} tokens, {out_len} output tokens | {repeats} round(s) after 1 warm-up "
        f"| auto-merge share {share}, window {window} steps{' | QUICK smoke run' if quick else ''}")

    def run(arm: str, merged: bool, loras: list, tag: str):
        def call(r: int) -> dict:
            engine.auto_merge = None
            if merged:
                engine.merge_lora(ads[0])
            else:
                engine.unmerge_lora()
            prompts = random_prompts(len(loras), prompt_len, vocab, f"{args.seed}-{tag}-{arm}-{r}")
            return lp_generate(llm, prompts, params, loras)
        return call

    def auto(loras: list, tag: str):
        def call(r: int) -> dict:
            engine.unmerge_lora()
            engine.auto_merge = AutoMergePolicy(share, window)
            for k in range(-(-window // out_len) + 1):  # enough steps for a decision
                settle = random_prompts(len(loras), prompt_len, vocab, f"{args.seed}-{tag}-settle-{r}-{k}")
                llm.generate(settle, params, lora=loras)
            before = (engine.adapters.stats.merges, engine.adapters.stats.unmerges)
            prompts = random_prompts(len(loras), prompt_len, vocab, f"{args.seed}-{tag}-auto-{r}")
            out = lp_generate(llm, prompts, params, loras)
            out["switches"] = (engine.adapters.stats.merges + engine.adapters.stats.unmerges
                               - sum(before))
            out["merged"] = engine.live_merged.name if engine.live_merged else "-"
            engine.auto_merge = None
            return out
        return call

    all_others: list[float] = []

    def rates(res: dict, name: str) -> list[float]:
        all_others.extend(others_cpu({name: res[name]}))
        return [x["decode_tok_s"] for x in res[name]]

    # ---- merge cost -------------------------------------------------------------------------
    engine.adapters.load_now(ads[0])
    merge_ms = []
    for _ in range(3):
        engine.unmerge_lora()
        t0 = time.perf_counter()
        engine.merge_lora(ads[0])
        merge_ms.append(1e3 * (time.perf_counter() - t0))
    engine.unmerge_lora()
    say(f"[0] run-time merge of X (checkpoint read, delta, pack): {fmt_list(merge_ms, '.0f')} ms")

    # ---- 1. merged vs base vs unmerged ------------------------------------------------------
    summary: dict[str, float] = {}
    verdicts: list[bool] = []
    for c in (1, conc):
        res = interleave({"base": run("base", False, [None] * c, f"c{c}"),
                          "unmerged": run("unmerged", False, [ads[0]] * c, f"c{c}"),
                          "merged": run("merged", True, [ads[0]] * c, f"c{c}")}, repeats)
        base, unm, mer = rates(res, "base"), rates(res, "unmerged"), rates(res, "merged")
        summary[f"merged c{c}"] = median_ratio(mer, base)
        summary[f"unmerged c{c}"] = median_ratio(unm, base)
        ok = summary[f"merged c{c}"] >= TARGET_MERGED
        verdicts.append(ok)
        say(f"[1] c{c}: merged/base {summary[f'merged c{c}']:.3f}x (pairs {fmt_list(ratios(mer, base), '.3f')}) "
            f"target >= {TARGET_MERGED} {verdict(ok)} | unmerged/base {summary[f'unmerged c{c}']:.3f}x | "
            f"base {statistics.median(base):.1f} tok/s")

    # ---- 2. auto-merge under traffic mixes --------------------------------------------------
    n_other = max(1, round(conc * 0.1))
    mixes = {"skewed": [ads[0]] * (conc - n_other) + [ads[1 + i % 7] for i in range(n_other)],
             "uniform": [ads[i % 8] for i in range(conc)]}
    for tag, loras in mixes.items():
        res = interleave({"unmerged": run("unmerged", False, loras, tag),
                          "merged": run("merged", True, loras, tag),
                          "auto": auto(loras, tag)}, repeats)
        unm, mer, aut = rates(res, "unmerged"), rates(res, "merged"), rates(res, "auto")
        best_name = "merged" if statistics.median(mer) > statistics.median(unm) else "unmerged"
        best = mer if best_name == "merged" else unm
        summary[tag] = median_ratio(aut, best)
        ok = summary[tag] >= TARGET_AUTO
        verdicts.append(ok)
        states = ", ".join(f"{x['merged']} ({x['switches']} switches)" for x in res["auto"])
        say(f"[2] {tag} ({len(loras)} requests, {sum(1 for a in loras if a is ads[0])} for X): "
            f"auto/{best_name} {summary[tag]:.3f}x (pairs {fmt_list(ratios(aut, best), '.3f')}) "
            f"target >= {TARGET_AUTO} {verdict(ok)} | merged/unmerged {median_ratio(mer, unm):.3f}x | "
            f"auto merged in timed calls: {states}")
        summary[f"{tag} best"] = best_name  # type: ignore[assignment]

    noisy = statistics.median(all_others) > QUIET if all_others else False
    say(f"merge.py: merged/base c1 {summary['merged c1']:.2f}x c{conc} {summary[f'merged c{conc}']:.2f}x "
        f"(target >={TARGET_MERGED}) | unmerged/base c1 {summary['unmerged c1']:.2f}x "
        f"c{conc} {summary[f'unmerged c{conc}']:.2f}x | auto/best static: skewed "
        f"{summary['skewed']:.2f}x (best {summary['skewed best']}), uniform {summary['uniform']:.2f}x "
        f"(best {summary['uniform best']}) (target >={TARGET_AUTO}) | merge {statistics.median(merge_ms):.0f} ms "
        f"| {sum(verdicts)}/{len(verdicts)} PASS{' | NOISY' if noisy else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
