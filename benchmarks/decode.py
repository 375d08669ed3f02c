"""Engine core: loraplex vs transformers ``generate`` on the same weights, and the physical limit.

    python benchmarks/decode.py [--repeats N] [--quick] [--seed S] [--model NAME]

One process, one run, the default model in bfloat16. Each scenario is interleaved
(loraplex, transformers, loraplex, transformers, ...) after one warm-up pair; every quoted
ratio is the median of the pairwise ratios. Prompts are random token ids (fixed seed, fresh
per round, identical for both engines within a round, so loraplex's prefix cache never
hits across rounds).

1. Batch 1, 64 prompt tokens, 128 output. Decode rate = (output tokens - 1) / (first
   token -> last token). loraplex: ``metrics.decode_s``. transformers: a streamer that
   timestamps every generated token (first put is the prompt and is skipped), so prefill
   is excluded the same way on both sides. Greedy, ``min_new_tokens = max_new_tokens``
   and ``ignore_eos``: both produce exactly 128 tokens (checked).
2. 32 concurrent requests, 64 prompt tokens each, 128 output. Throughput = all output
   tokens / wall time of the whole call (loraplex ``LLM.generate`` of 32 prompts vs
   transformers' batched ``generate`` at 32, left padding + attention mask; the prompts
   are all 64 tokens, so no padding actually occurs). Decode-only rates: transformers,
   32 x 127 tokens over the streamer's first -> last step; loraplex, the tokens of the
   steps after every request has its first token (pure decode steps) over those steps'
   time, from timestamps taken around ``engine.step`` (``common.record_steps`` wraps it
   on the instance; ``common.pure_decode_rate``). Cross-check for 1 and 2: the rate from
   the median gap between consecutive steps, which a burst of other work barely moves.
3. Prefill of a 512-token prompt: loraplex TTFT (``max_tokens=1``, ``metrics.ttft_s``)
   vs the wall time of transformers ``generate(max_new_tokens=1)``; ratio is
   loraplex time / transformers time.
4. The physical limit, measured in this run. Bandwidth: a 1 GiB float32 tensor copied
   into another, (bytes read + bytes written) / time, 5 copies at the start and 5 after
   each scenario, best kept (the matmul rate likewise). Batch-1 floor = bytes of
   the weights one decode step reads (every projection of every layer, the norms and the
   vocab x hidden head matrix once -- with tied embeddings that is every parameter
   once -- at 2 bytes each) / bandwidth; the fraction reached is floor time / measured
   time per token. Batch 32: 2 x those parameters FLOPs per token (attention's own
   products ignored) against the best bf16 rate of a 512x576 @ 576x3072 product loop
   (``torch.mm`` and ``F.linear``); fraction = floor / measured decode time per token.

Contention: the machines are shared. Each timed call records the share of the CPUs other
processes took meanwhile (``common.CpuMeter``); a pair with a call above 10% is reported as
disturbed, and the summary line says NOISY if any pair was.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    fmt_list, human_bytes, l3_cache, l3_cache_bytes, left_pad, machine_lines, measure_bandwidth, measure_matmul_rate,
    median_ratio, median_step_rate, pure_decode_rate, random_prompts, ratios, record_steps, timed,
    token_timer, verdict,
)

TARGET_B1 = 1.5  # loraplex / transformers decode tok/s at batch 1, at least
TARGET_C32 = 2.5  # loraplex / transformers output tok/s at 32 concurrent, at least
TARGET_PREFILL = 1.0  # loraplex / transformers prefill time, at most
QUIET = 0.10  # other processes' median share of the CPUs above which the run is flagged noisy


def say(line: str = "") -> None:
    print(line, flush=True)


def weights_read_per_token(arch) -> tuple[int, int]:
    """(parameters one decode step reads, all parameters counted once).

    A decode step reads every layer weight, the final norm and the [vocab, hidden] head
    once; the embedding table contributes one row (ignored). With tied embeddings the head
    is the embedding, so both numbers are equal.
    """
    h, i = arch.hidden_size, arch.intermediate_size
    qkv = h * (arch.q_size + 2 * arch.kv_size) + (arch.q_size + 2 * arch.kv_size if arch.qkv_bias else 0)
    per_layer = qkv + arch.q_size * h + h * 2 * i + i * h + 2 * h
    read = arch.num_layers * per_layer + h + arch.vocab_size * h
    total = read + (0 if arch.tie_word_embeddings else arch.vocab_size * h)
    return read, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved pairs per scenario after the warm-up pair (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 output tokens instead of 128, smaller bandwidth buffer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both engines (default: the engine's, all usable cores)")
    args = ap.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    out_len = 16 if args.quick else 128
    prompt_len, conc, prefill_len = 64, 32, 512
    t_start = time.perf_counter()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from loraplex import LLM, SamplingParams

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = torch.bfloat16
    llm = LLM(args.model, dtype="bfloat16",
              **({} if args.threads is None else {"num_threads": args.threads}))
    # The engine sets torch's thread count for the process; transformers runs under the same.
    engine, arch = llm.engine, llm.engine.arch
    tf = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=dtype).eval()
    pad_id = tf.generation_config.pad_token_id
    if pad_id is None:
        pad_id = tf.config.eos_token_id if isinstance(tf.config.eos_token_id, int) else 0
    V = arch.vocab_size
    load_s = time.perf_counter() - t_start

    for line in machine_lines(dtype):
        say(line)
    read_params, all_params = weights_read_per_token(arch)
    tf_params = sum(p.numel() for p in tf.parameters())  # tied weights counted once
    weight_bytes = read_params * dtype.itemsize
    say(f"model: {args.model} ({arch.model_type}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"vocab {V}, tied embeddings {arch.tie_word_embeddings}) | {all_params / 1e6:.2f}M params "
        f"(transformers counts {tf_params / 1e6:.2f}M) | weights read per decode token "
        f"{read_params / 1e6:.2f}M params = {human_bytes(weight_bytes)} in bf16 | both engines "
        f"load {engine.model_path}")
    say(f"setup: seed {args.seed} | {repeats} interleaved pair(s) per scenario after 1 warm-up pair "
        f"(warm-up decodes {min(out_len, 32)} tokens, prefill warm-up full size) "
        f"| random prompt ids in [256, {V}), fresh per round | greedy, ignore_eos / "
        f"min_new_tokens | load time {load_s:.1f}s (excluded){' | QUICK smoke run' if args.quick else ''}")

    # ---- 4a. physical limits: measured now and after every scenario, best kept ---------
    bw_runs, mm_runs = [], []

    def sample_limits() -> None:
        bw_runs.append(measure_bandwidth(nbytes=(256 << 20) if args.quick else (1 << 30)))
        mm_runs.append(measure_matmul_rate())

    sample_limits()

    greedy = dict(temperature=0, ignore_eos=True)
    disturbed: dict[str, tuple[int, int]] = {}  # scenario -> (disturbed pairs, pairs)

    def contention(tag: str, pairs: dict, pair_ratios: list[float], better: str) -> None:
        """Print how much of the machine other processes took during each timed call, and
        which pairs that disturbed (either call above QUIET)."""
        a, b = pairs["loraplex"], pairs["transformers"]
        shares = [max(x.get("others_cpu", 0.0), y.get("others_cpu", 0.0)) for x, y in zip(a, b)]
        bad = [sh > QUIET for sh in shares]
        disturbed[tag] = (sum(bad), len(bad))
        calls = [c.get("others_cpu", float("nan")) for x, y in zip(a, b) for c in (x, y)]
        say(f"[{tag}] contention: other processes took {fmt_list([100 * x for x in calls], '.0f')}% "
            f"of the CPUs during the timed calls (loraplex, transformers alternately); disturbed pairs "
            f"(a call above {100 * QUIET:.0f}%): {sum(bad)} of {len(bad)}")
        clean = [r for r, is_bad in zip(pair_ratios, bad) if not is_bad]
        if clean and len(clean) < len(pair_ratios):
            say(f"[{tag}] for reference, median over the {len(clean)} undisturbed pair(s) only: "
                f"{statistics.median(clean):.2f}x {better}")

    def robust_line(tag: str, pairs: dict) -> None:
        """Decode rate from the median gap between consecutive steps: a burst of other work
        inflates a few gaps, not the median. A cross-check, not the headline figure."""
        a = [x["median_gap_tok_s"] for x in pairs["loraplex"]]
        b = [x["median_gap_tok_s"] for x in pairs["transformers"]]
        say(f"[{tag}] cross-check, decode tok/s from the median step gap: loraplex {fmt_list(a, '.1f')}, "
            f"transformers {fmt_list(b, '.1f')}; ratio {median_ratio(a, b):.2f}x (pairs: {fmt_list(ratios(a, b), '.2f')})")

    warm_len = min(out_len, 32)  # the warm-up pair of b1 and c32 decodes fewer tokens

    def n_out(r: int) -> int:
        return out_len if r >= 0 else warm_len

    # ---- 1. batch 1 decode ---------------------------------------------------------------
    say(f"[b1] batch 1, {prompt_len} prompt tokens, {out_len} output tokens")
    b1_prompts = lambda r: random_prompts(1, prompt_len, V, f"{args.seed}-b1-{r}")  # noqa: E731
    b1_tokens: dict[str, list[int]] = {}
    lp_b1, tf_b1 = [], []

    def run_lp_b1(r: int) -> dict:
        with record_steps(engine) as steps:
            wall, outs = timed(lambda: llm.generate(b1_prompts(r), SamplingParams(max_tokens=n_out(r), **greedy)))
        out = outs[0]
        n = len(out.token_ids)
        assert n == n_out(r), f"loraplex produced {n} tokens, expected {n_out(r)}"
        if r >= 0:
            b1_tokens[f"loraplex-{r}"] = out.token_ids
        return {"decode_tok_s": (n - 1) / out.metrics.decode_s, "ttft_s": out.metrics.ttft_s,
                "wall_s": wall, "median_gap_tok_s": pure_decode_rate(steps, 1)["median_tok_s"]}

    def run_tf_b1(r: int) -> dict:
        ids, mask = left_pad(b1_prompts(r), pad_id)
        timer = token_timer()
        with torch.inference_mode():
            t0 = time.perf_counter()
            wall, y = timed(lambda: tf.generate(ids, attention_mask=mask, max_new_tokens=n_out(r),
                                                min_new_tokens=n_out(r), do_sample=False,
                                                pad_token_id=pad_id, streamer=timer))
        n = y.shape[1] - ids.shape[1]
        assert n == n_out(r) == len(timer.times), f"transformers produced {n} tokens, expected {n_out(r)}"
        if r >= 0:
            b1_tokens[f"transformers-{r}"] = y[0, ids.shape[1]:].tolist()
        return {"decode_tok_s": (n - 1) / timer.decode_s(), "ttft_s": timer.times[0] - t0, "wall_s": wall,
                "median_gap_tok_s": median_step_rate(timer.times, 1)}

    pairs_b1 = run_pairs("b1", run_lp_b1, run_tf_b1, repeats)
    lp_b1 = [x["decode_tok_s"] for x in pairs_b1["loraplex"]]
    tf_b1 = [x["decode_tok_s"] for x in pairs_b1["transformers"]]
    r_b1 = median_ratio(lp_b1, tf_b1)
    say(f"[b1] loraplex decode: median {statistics.median(lp_b1):.1f} tok/s (rounds: {fmt_list(lp_b1, '.1f')})")
    say(f"[b1] transformers decode: median {statistics.median(tf_b1):.1f} tok/s (rounds: {fmt_list(tf_b1, '.1f')})")
    say(f"[b1] loraplex/transformers decode tok/s: {r_b1:.2f}x (pairs: {fmt_list(ratios(lp_b1, tf_b1), '.2f')}) "
        f"| target >= {TARGET_B1}x {verdict(r_b1 >= TARGET_B1)}")
    same = []
    for r in range(repeats):
        a, b = b1_tokens[f"loraplex-{r}"], b1_tokens[f"transformers-{r}"]
        same.append(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    say(f"[b1] greedy agreement, same prompt: identical leading tokens per round {' '.join(map(str, same))} "
        f"of {out_len} (bf16 rounding differs between the engines; a split at a near-tie is expected)")
    robust_line("b1", pairs_b1)
    contention("b1", pairs_b1, ratios(lp_b1, tf_b1), "decode tok/s")
    sample_limits()

    # ---- 2. 32 concurrent ----------------------------------------------------------------
    say(f"[c32] {conc} concurrent requests, {prompt_len} prompt tokens each, {out_len} output tokens each")
    c32_prompts = lambda r: random_prompts(conc, prompt_len, V, f"{args.seed}-c32-{r}")  # noqa: E731

    def run_lp_c32(r: int) -> dict:
        with record_steps(engine) as steps:
            wall, outs = timed(lambda: llm.generate(c32_prompts(r), SamplingParams(max_tokens=n_out(r), **greedy)))
        assert all(len(o.token_ids) == n_out(r) for o in outs), "loraplex: wrong output length"
        decode = pure_decode_rate(steps, conc)
        return {"tok_s": conc * n_out(r) / wall, "decode_tok_s": decode["tok_s"], "wall_s": wall,
                "steps": len(steps), "median_gap_tok_s": decode["median_tok_s"]}

    def run_tf_c32(r: int) -> dict:
        ids, mask = left_pad(c32_prompts(r), pad_id)
        timer = token_timer()
        with torch.inference_mode():
            wall, y = timed(lambda: tf.generate(ids, attention_mask=mask, max_new_tokens=n_out(r),
                                                min_new_tokens=n_out(r), do_sample=False,
                                                pad_token_id=pad_id, streamer=timer))
        assert y.shape == (conc, prompt_len + n_out(r)), f"transformers: output shape {tuple(y.shape)}"
        return {"tok_s": conc * n_out(r) / wall, "decode_tok_s": conc * (n_out(r) - 1) / timer.decode_s(),
                "wall_s": wall, "median_gap_tok_s": median_step_rate(timer.times, conc)}

    pairs_c32 = run_pairs("c32", run_lp_c32, run_tf_c32, repeats)
    lp_c = [x["tok_s"] for x in pairs_c32["loraplex"]]
    tf_c = [x["tok_s"] for x in pairs_c32["transformers"]]
    lp_cd = [x["decode_tok_s"] for x in pairs_c32["loraplex"]]
    tf_cd = [x["decode_tok_s"] for x in pairs_c32["transformers"]]
    r_c32 = median_ratio(lp_c, tf_c)
    say(f"[c32] loraplex output throughput (whole run): median {statistics.median(lp_c):.1f} tok/s "
        f"(rounds: {fmt_list(lp_c, '.1f')})")
    say(f"[c32] transformers batched generate throughput (whole run): median {statistics.median(tf_c):.1f} tok/s "
        f"(rounds: {fmt_list(tf_c, '.1f')})")
    say(f"[c32] loraplex/transformers throughput: {r_c32:.2f}x (pairs: {fmt_list(ratios(lp_c, tf_c), '.2f')}) "
        f"| target >= {TARGET_C32}x {verdict(r_c32 >= TARGET_C32)}")
    say(f"[c32] loraplex decode-only (pure decode steps): median {statistics.median(lp_cd):.1f} tok/s "
        f"(rounds: {fmt_list(lp_cd, '.1f')})")
    say(f"[c32] transformers decode-only (streamer, first->last step): median {statistics.median(tf_cd):.1f} tok/s "
        f"(rounds: {fmt_list(tf_cd, '.1f')})")
    r_c32d = median_ratio(lp_cd, tf_cd)
    say(f"[c32] loraplex/transformers decode-only tok/s: {r_c32d:.2f}x (pairs: {fmt_list(ratios(lp_cd, tf_cd), '.2f')})")
    robust_line("c32", pairs_c32)
    contention("c32", pairs_c32, ratios(lp_c, tf_c), "throughput")
    sample_limits()

    # ---- 3. prefill 512 ------------------------------------------------------------------
    say(f"[prefill] one {prefill_len}-token prompt, time to the first token")
    pf_prompts = lambda r: random_prompts(1, prefill_len, V, f"{args.seed}-prefill-{r}")  # noqa: E731

    def run_lp_pf(r: int) -> dict:
        wall, outs = timed(lambda: llm.generate(pf_prompts(r), SamplingParams(max_tokens=1, **greedy)))
        return {"ttft_s": outs[0].metrics.ttft_s, "wall_s": wall}

    def run_tf_pf(r: int) -> dict:
        ids, mask = left_pad(pf_prompts(r), pad_id)
        with torch.inference_mode():
            wall, _ = timed(lambda: tf.generate(ids, attention_mask=mask, max_new_tokens=1,
                                                do_sample=False, pad_token_id=pad_id))
        return {"ttft_s": wall, "wall_s": wall}

    pairs_pf = run_pairs("prefill", run_lp_pf, run_tf_pf, repeats)
    lp_pf = [x["ttft_s"] for x in pairs_pf["loraplex"]]
    tf_pf = [x["ttft_s"] for x in pairs_pf["transformers"]]
    r_pf = median_ratio(lp_pf, tf_pf)
    say(f"[prefill] loraplex TTFT ({prefill_len} tokens): median {1e3 * statistics.median(lp_pf):.1f} ms "
        f"(rounds: {fmt_list([1e3 * x for x in lp_pf], '.1f')})")
    say(f"[prefill] transformers generate(max_new_tokens=1) ({prefill_len} tokens): median "
        f"{1e3 * statistics.median(tf_pf):.1f} ms (rounds: {fmt_list([1e3 * x for x in tf_pf], '.1f')})")
    say(f"[prefill] loraplex/transformers time: {r_pf:.2f}x (pairs: {fmt_list(ratios(lp_pf, tf_pf), '.2f')}) "
        f"| target <= {TARGET_PREFILL} {verdict(r_pf <= TARGET_PREFILL)}")
    contention("prefill", pairs_pf, ratios(lp_pf, tf_pf), "time")

    # ---- 4b. physical limits and the fractions reached ----------------------------------
    sample_limits()
    bw = max(x["best"] for x in bw_runs)
    mm = max(x["best"] for x in mm_runs)
    say(f"[limit] memory bandwidth (tensor copy, {human_bytes(bw_runs[0]['bytes_per_copy'])} read + written "
        f"per copy, 5 copies at the start and after each scenario): best {bw / 1e9:.1f} GB/s "
        f"(best per sample: {fmt_list([x['best'] / 1e9 for x in bw_runs], '.1f')})")
    say(f"[limit] bf16 matmul 512x576 @ 576x3072: best {mm / 1e9:.0f} GFLOP/s (torch.mm "
        f"{max(x['mm'] for x in mm_runs) / 1e9:.0f}, F.linear {max(x['linear'] for x in mm_runs) / 1e9:.0f}; "
        f"per sample: {fmt_list([x['best'] / 1e9 for x in mm_runs], '.0f')})")
    floor_b1 = weight_bytes / bw
    lp_tpt = [1 / x for x in lp_b1]
    tf_tpt = [1 / x for x in tf_b1]
    frac_b1 = statistics.median(floor_b1 / t for t in lp_tpt)
    frac_b1_tf = statistics.median(floor_b1 / t for t in tf_tpt)
    say(f"[limit] batch-1 floor: {human_bytes(weight_bytes)} / {bw / 1e9:.1f} GB/s = {1e3 * floor_b1:.2f} ms/token "
        f"({1 / floor_b1:.0f} tok/s)")
    say(f"[limit] loraplex batch 1: {1e3 * statistics.median(lp_tpt):.2f} ms/token = {100 * frac_b1:.0f}% of the "
        f"bandwidth floor (transformers: {1e3 * statistics.median(tf_tpt):.2f} ms/token = {100 * frac_b1_tf:.0f}%)")
    flops_tok = 2 * read_params
    floor_c = flops_tok / mm
    frac_c = statistics.median(floor_c * x for x in lp_cd)
    frac_c_run = statistics.median(floor_c * x for x in lp_c)
    frac_c_tf = statistics.median(floor_c * x for x in tf_cd)
    say(f"[limit] batch-32 arithmetic floor: 2 x {read_params / 1e6:.1f}M = {flops_tok / 1e6:.0f} MFLOP/token / "
        f"{mm / 1e9:.0f} GFLOP/s = {1e3 * floor_c:.3f} ms/token ({1 / floor_c:.0f} tok/s)")
    say(f"[limit] loraplex 32 concurrent: {100 * frac_c:.0f}% of the arithmetic floor decode-only, "
        f"{100 * frac_c_run:.0f}% over the whole run (transformers decode-only: {100 * frac_c_tf:.0f}%)")
    l3 = l3_cache_bytes()
    if l3 is not None and weight_bytes < 2 * l3:
        say(f"[limit] caution: the weights ({human_bytes(weight_bytes)}) are within 2x of the L3 cache "
            f"({l3_cache()}, shared with other tenants on a VM): part of a step may be served from cache, "
            f"so the bandwidth fraction can exceed 100%")

    total_s = time.perf_counter() - t_start
    say(f"total wall time {total_s:.0f}s (load {load_s:.0f}s)")
    noisy = {tag: d for tag, d in disturbed.items() if d[0]}
    if noisy:
        say(f"WARNING: other processes took more than {100 * QUIET:.0f}% of the CPUs during some timed calls "
            f"({', '.join(f'{t}: {d[0]} of {d[1]} pairs' for t, d in noisy.items())}); a disturbed pair's "
            f"ratio is not trustworthy. Rerun on a quiet machine before quoting these figures.")
    noise = ("quiet: no pair disturbed" if not noisy else
             "NOISY: disturbed pairs " + ", ".join(f"{t} {d[0]}/{d[1]}" for t, d in noisy.items()))
    quick = " [QUICK smoke run]" if args.quick else ""
    say(f"decode.py: b1 {r_b1:.2f}x tf (target {TARGET_B1}x {verdict(r_b1 >= TARGET_B1)}) | "
        f"c32 {r_c32:.2f}x tf (target {TARGET_C32}x {verdict(r_c32 >= TARGET_C32)}) | "
        f"prefill{prefill_len} {r_pf:.2f}x tf time (target <={TARGET_PREFILL} {verdict(r_pf <= TARGET_PREFILL)}) | "
        f"b1 {100 * frac_b1:.0f}% of bandwidth floor | c32 {100 * frac_c:.0f}% of matmul floor | "
        f"{noise}{quick}")
    return 0


def run_pairs(tag: str, lp_fn, tf_fn, repeats: int) -> dict[str, list[dict]]:
    from common import interleave
    return interleave({"loraplex": lp_fn, "transformers": tf_fn}, repeats, warmup=1,
                      log=lambda s: say(f"[{tag}]{s}"))


if __name__ == "__main__":
    sys.exit(main())
