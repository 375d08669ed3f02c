"""Greedy generation on the real default model (float32) is transformers' greedy decoding,
whatever the engine does on the way: batching, prefix-cache hits, chunked prefill,
preemption and recompute, aborts of other requests, streaming."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from loraplex import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
GREEDY_32 = SamplingParams(max_tokens=32, temperature=0)
# About 100 tokens; its first six 16-token blocks can come from the prefix cache.
LONG_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a wooden hand press into a "
    "system that could produce books far faster than any scribe. Within fifty years, "
    "printing shops had spread to more than two hundred cities across Europe, and the "
    "number of books in circulation grew from thousands to millions. Scholars argue about "
    "the consequences, but most agree that the press changed how ideas travelled. In one "
    "sentence, the most important effect was"
)
KV_BLOCK_MIB = 30 * 2 * 16 * 3 * 64 * 4 / 2**20  # layers * k|v * block * kv_heads * dim * fp32


@pytest.fixture(scope="module")
def greedy_batch(llm_f32) -> list[Any]:
    """The three prompts side by side, 32 greedy tokens each."""
    return llm_f32.generate(PROMPTS, GREEDY_32)


@pytest.fixture(scope="module")
def llm_tight(default_model_path) -> LLM:
    """A second engine that is short of everything: no prefix caching, a 16-token step
    budget (long prompts prefill in chunks) and 8 KV blocks (128 tokens), so a handful of
    concurrent requests must preempt one another."""
    return LLM("smollm2-135m", dtype="float32", enable_prefix_caching=False,
               max_num_batched_tokens=16, kv_cache_gib=8.5 * KV_BLOCK_MIB / 1024)


def test_greedy_matches_transformers_generate(greedy_batch: list[Any], hf_f32, hf_tokenizer) -> None:
    # transformers decodes the three prompts as one left-padded batch (cheaper than three runs).
    enc = hf_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert (enc.attention_mask[:, 0] == 0).any()  # really left-padded
    with torch.no_grad():
        generated = hf_f32.generate(**enc, do_sample=False, max_new_tokens=32, pad_token_id=2)
    for i, (prompt, out) in enumerate(zip(PROMPTS, greedy_batch)):
        assert out.prompt_token_ids == hf_tokenizer.encode(prompt)
        ref = generated[i, enc.input_ids.shape[1]:].tolist()
        if 2 in ref:  # finished at EOS; the rest is padding
            ref = ref[:ref.index(2) + 1]
        assert out.token_ids == ref, prompt
        assert out.text == hf_tokenizer.decode(ref, skip_special_tokens=True)
        assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")
    assert greedy_batch[0].text.startswith(" Paris")
    assert {len(out.token_ids) for out in greedy_batch} != {32}  # one stopped early


def test_batch_equals_each_prompt_alone(llm_f32, greedy_batch: list[Any]) -> None:
    # Different prompt lengths (5, 13, 19 tokens) in the batch; here one at a time.
    params = SamplingParams(max_tokens=10, temperature=0)
    for prompt, batched in zip(PROMPTS, greedy_batch):
        (alone,) = llm_f32.generate(prompt, params)
        assert alone.token_ids == batched.token_ids[:10], prompt


def test_metrics_are_filled_in(greedy_batch: list[Any]) -> None:
    for out in greedy_batch:
        m = out.metrics
        assert out.finished
        assert m.ttft_s is not None and m.ttft_s >= 0
        assert m.decode_s is not None and m.decode_s >= 0
        assert m.first_scheduled_time <= m.first_token_time <= m.finished_time


@pytest.fixture(scope="module")
def long_runs(llm_f32, llm_tight) -> dict[str, Any]:
    """LONG_PROMPT on the shared engine (a miss, then a hit) and on the tight one (no
    prefix cache, chunked prefill), stepped by hand to count the prefill steps."""
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1)
    bm = llm_f32.engine.block_manager
    runs: dict[str, Any] = {"hits_before": bm.num_cache_hits}
    (runs["miss"],) = llm_f32.generate(LONG_PROMPT, params)
    runs["hits_after_miss"] = bm.num_cache_hits
    (runs["hit"],) = llm_f32.generate(LONG_PROMPT, params)
    runs["hits_after_hit"] = bm.num_cache_hits

    engine = llm_tight.engine
    seq = engine.add_request(LONG_PROMPT, params)
    runs["num_prefill_steps"] = 0
    while not seq.output_token_ids:
        engine.step()
        runs["num_prefill_steps"] += 1
    while engine.has_unfinished_requests():
        engine.step()
    runs["chunked"] = engine.output_of(seq)
    runs["num_prompt_tokens"] = len(seq.prompt_token_ids)
    return runs


def test_prefix_cache_hit_gives_the_same_output(long_runs: dict[str, Any]) -> None:
    assert long_runs["num_prompt_tokens"] > 96
    assert long_runs["hits_after_miss"] == long_runs["hits_before"]  # nothing was cached yet
    full_blocks = (long_runs["num_prompt_tokens"] - 1) // 16
    assert long_runs["hits_after_hit"] - long_runs["hits_after_miss"] == 16 * full_blocks
    assert long_runs["hit"].token_ids == long_runs["miss"].token_ids
    for a, b in zip(long_runs["hit"].logprobs, long_runs["miss"].logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_prefix_cache_off_gives_the_same_output(long_runs: dict[str, Any], llm_tight) -> None:
    assert llm_tight.engine.block_manager.num_cache_hits == 0
    assert llm_tight.engine.block_manager.cached == {}
    assert long_runs["chunked"].token_ids == long_runs["miss"].token_ids


def test_chunked_prefill_gives_the_same_tokens(long_runs: dict[str, Any]) -> None:
    # ~100 prompt tokens through a 16-token step budget: at least 6 prefill steps.
    assert long_runs["num_prefill_steps"] >= long_runs["num_prompt_tokens"] // 16
    assert long_runs["chunked"].token_ids == long_runs["miss"].token_ids
    for a, b in zip(long_runs["chunked"].logprobs, long_runs["miss"].logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_prefix_hit_on_a_longer_prompt(llm_f32, long_runs: dict[str, Any], hf_f32) -> None:
    # A prompt that extends a cached one reuses its full blocks and still decodes right:
    # every token is transformers' argmax given everything before it.
    bm = llm_f32.engine.block_manager
    before = bm.num_cache_hits
    (out,) = llm_f32.generate(LONG_PROMPT + " the", SamplingParams(max_tokens=4, temperature=0))
    assert bm.num_cache_hits - before == 16 * ((long_runs["num_prompt_tokens"] - 1) // 16)
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        logits = hf_f32(torch.tensor([ids])).logits[0, len(out.prompt_token_ids) - 1:-1]
    assert logits.argmax(-1).tolist() == out.token_ids


def test_preempted_requests_give_the_same_output(llm_f32, llm_tight) -> None:
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(4)]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)] * 3
    # One sampled, seeded request too: its generator must not notice the recompute.
    params.append(SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True))
    engine = llm_tight.engine
    bm = engine.block_manager
    # 4 requests of ~15 + 20 tokens need 3 blocks each; the cache holds 8.
    assert bm.num_blocks == 8
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished_requests():
        engine.step()
    assert any(seq.num_preemptions > 0 for seq in seqs)
    assert bm.num_free_blocks == bm.num_blocks
    reference = llm_f32.generate(prompts, params)
    for seq, ref in zip(seqs, reference):
        out = engine.output_of(seq)
        assert out.finish_reason == "length"
        assert out.token_ids == ref.token_ids, seq.prompt


def test_abort_frees_blocks_and_others_finish(llm_f32, greedy_batch: list[Any]) -> None:
    engine = llm_f32.engine
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    start_free = bm.num_free_blocks
    params = SamplingParams(max_tokens=12, temperature=0)
    seqs = [engine.add_request(p, params) for p in PROMPTS]
    waiting = engine.add_request("This one never runs.", params)
    engine.abort_request(waiting.request_id)  # aborted while still waiting
    assert waiting.status.is_finished
    for _ in range(4):
        engine.step()
    victim = seqs[1]
    assert victim.status.name == "RUNNING" and victim.block_ids
    held = list(victim.block_ids)
    free_before = bm.num_free_blocks
    engine.abort_request(victim.request_id)
    assert engine.output_of(victim).finish_reason == "abort"
    assert victim.block_ids == []
    assert bm.num_free_blocks == free_before + len(held)
    assert all(bm.ref_counts[b] == 0 for b in held)
    engine.abort_request(victim.request_id)  # twice, or an unknown id: nothing happens
    engine.abort_request("no-such-request")
    while engine.has_unfinished_requests():
        engine.step()
    assert bm.num_free_blocks == start_free
    assert len(victim.output_token_ids) == 4
    for i in (0, 2):
        assert engine.output_of(seqs[i]).token_ids == greedy_batch[i].token_ids[:12]


def test_stream_yields_the_generated_text(llm_f32, greedy_batch: list[Any]) -> None:
    pieces = list(llm_f32.stream(PROMPTS[2], SamplingParams(max_tokens=12, temperature=0)))
    assert len(pieces) > 5
    assert "".join(pieces) == llm_f32.tokenizer.decode(greedy_batch[2].token_ids[:12])
    assert not llm_f32.engine.has_unfinished_requests()


def test_stream_closed_early_aborts_its_request(llm_f32) -> None:
    engine = llm_f32.engine
    start_free = engine.block_manager.num_free_blocks
    stream = llm_f32.stream(PROMPTS[0], GREEDY_32)
    next(stream)
    stream.close()
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == start_free


def test_token_id_prompt_equals_text_prompt(llm_f32, greedy_batch: list[Any]) -> None:
    ids = llm_f32.tokenizer.encode(PROMPTS[1])
    (out,) = llm_f32.generate(ids, SamplingParams(max_tokens=8, temperature=0))
    assert out.prompt is None and out.prompt_token_ids == ids
    assert out.token_ids == greedy_batch[1].token_ids[:8]


def test_cramped_engine_with_prefix_caching_matches_a_roomy_one(tiny_model) -> None:
    """Preemption, recompute through the prefix cache, chunked prefill and shared prefix
    blocks all at once, on a tiny random model (cheap enough to run many steps): the
    tokens equal those of an engine with room for everything."""
    folder = str(tiny_model())
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers * k|v * block * kv_heads * head_dim * fp32
    cramped = LLM(folder, dtype="float32", block_size=4, max_num_batched_tokens=8,
                  kv_cache_gib=12.5 * block_bytes / 2**30)
    roomy = LLM(folder, dtype="float32", block_size=4, kv_cache_gib=0.01)
    assert cramped.engine.block_manager.num_blocks == 12
    shared = list(range(1000, 1013))  # 13 tokens: 3 full blocks shared by everyone
    prompts = [shared + [2000 + i] * (i % 3 + 1) for i in range(6)]
    params = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)] * 5
    params.append(SamplingParams(max_tokens=14, temperature=1.0, seed=3, ignore_eos=True))
    engine = cramped.engine
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished_requests():
        engine.step()
    assert any(seq.num_preemptions for seq in seqs)
    assert engine.block_manager.num_cache_hits > 0
    assert engine.block_manager.num_free_blocks == 12
    expected = roomy.generate(prompts, params)
    for seq, ref in zip(seqs, expected):
        assert seq.output_token_ids == ref.token_ids
