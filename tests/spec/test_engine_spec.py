"""Speculative decoding inside the engine: greedy output with speculation is the output
without it, token for token (float32), for both proposers, with and without adapters, in
mixed batches where some sequences speculate and others do not, also when KV blocks run
short (preemption); and the sampled distribution end to end."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams, SpecConfig
from loraplex.spec.proposer import DRAFT_VOCAB_FILE

from .conftest import spy_steps

# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

VOCAB_SIZE = 49152
KV_BLOCK_GIB = 2 * 2 * 16 * 2 * 16 * 4 / 2**30  # tiny model: layers * k|v * block * kv * dim * fp32
LORAS = [None, "a", "b", "a", None, "b"]


def prompts() -> list[list[int]]:
    """Half repeat a pattern (the n-gram lookup finds it), half are random."""
    rng = random.Random(0)
    out = []
    for i in range(len(LORAS)):
        if i % 2 == 0:
            pattern = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(3, 6))]
            out.append((pattern * 4)[:rng.randint(12, 20)])
        else:
            out.append([rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(5, 30))])
    return out


def params() -> list[SamplingParams]:
    # Every other request also returns logprobs, which speculation must not change.
    return [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                           logprobs=3 if i % 2 else None) for i in range(len(LORAS))]


def lora_requests(adapters: dict[str, Path]) -> list[LoRARequest | None]:
    return [LoRARequest(n, str(adapters[n])) if n else None for n in LORAS]


@pytest.fixture(scope="module")
def reference(tiny_target: Path, tiny_adapters: dict[str, Path]) -> list[Any]:
    llm = LLM(str(tiny_target), dtype="float32", kv_cache_gib=0.01)
    return llm.generate(prompts(), params(), lora=lora_requests(tiny_adapters))


def assert_same_outputs(outs: list[Any], reference: list[Any]) -> None:
    for out, ref in zip(outs, reference):
        assert out.token_ids == ref.token_ids
        assert out.finish_reason == ref.finish_reason
        if ref.logprobs is not None:
            for got, want in zip(out.logprobs, ref.logprobs):
                assert got.token_id == want.token_id
                assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
                assert [t for t, _ in got.top] == [t for t, _ in want.top]


@pytest.mark.parametrize("kv", ["roomy", "tight"])
def test_ngram_greedy_equals_plain_decoding_in_mixed_batches(
        kv: str, tiny_target: Path, tiny_adapters: dict[str, Path], reference: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # tight: 10 blocks of 16 tokens for 6 requests of up to 54 tokens: drafts must give way
    # and sequences are preempted and recomputed.
    kv_gib = 0.01 if kv == "roomy" else 10.5 * KV_BLOCK_GIB
    llm = LLM(str(tiny_target), dtype="float32", kv_cache_gib=kv_gib,
              speculative=SpecConfig("ngram", num_tokens=3, max_spec_seqs=8))
    steps = spy_steps(llm.engine, monkeypatch)
    preempted = []
    schedule = llm.engine.scheduler.schedule
    monkeypatch.setattr(llm.engine.scheduler, "schedule",
                        lambda: (b := schedule(), preempted.append(len(b.preempted)))[0])
    outs = llm.generate(prompts(), params(), lora=lora_requests(tiny_adapters))
    assert_same_outputs(outs, reference)

    stats = llm.engine.spec.stats
    assert sum(s.num_accepted_tokens for s in stats.values()) > 0
    assert sum(s.num_draft_tokens - s.num_accepted_tokens for s in stats.values()) > 0
    # Some step verified drafts beside plain decodes, for more than one adapter at once.
    mixed = [step for step in steps
             if any(d for _, _, d in step) and any(n == 1 for _, n, d in step)]
    assert mixed
    assert any(len({name for name, _, d in step if d}) > 1 for step in steps)
    if kv == "tight":
        assert sum(preempted) > 0
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_draft_models_shared_and_per_adapter_equal_plain_decoding(
        tiny_target: Path, tinier_draft: Path, tiny_adapters: dict[str, Path],
        reference: list[Any]) -> None:
    # The target itself drafts for the base requests (nearly everything accepted: the
    # bonus token path) and for adapter a (without its adapter: partly accepted); the
    # tinier model drafts for adapter b (mostly rejected).
    llm = LLM(str(tiny_target), dtype="float32", kv_cache_gib=0.01,
              speculative=SpecConfig("draft", draft_model=str(tiny_target),
                                     draft_for={"b": str(tinier_draft)}, num_tokens=3,
                                     max_spec_seqs=8))
    outs = llm.generate(prompts(), params(), lora=lora_requests(tiny_adapters))
    assert_same_outputs(outs, reference)

    stats = llm.engine.spec.stats
    assert set(stats) == {None, "a", "b"}
    assert stats[None].acceptance_rate > 0.95
    assert stats[None].mean_accepted_length > 2.8
    assert stats["b"].acceptance_rate < stats[None].acceptance_rate
    spec = llm.engine.spec
    assert spec.proposer_for(llm.engine.make_sequence([5, 6], params()[0], lora=lora_requests(
        tiny_adapters)[2])) is spec.by_adapter["b"]
    # Shadows of finished requests are released at the next step.
    llm.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=2))
    draft = spec.shared
    llm.engine.step()
    assert draft.shadows == {} and draft.blocks.num_free_blocks == draft.blocks.num_blocks


def with_draft_vocab(src: Path, dst: Path, token_ids: list[int]) -> Path:
    """A copy of the model folder ``src`` whose head may propose only ``token_ids``."""
    shutil.copytree(src, dst)
    (dst / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": token_ids}))
    return dst


def test_draft_vocabulary_restricts_the_proposals_not_the_output(
        tiny_target: Path, tiny_adapters: dict[str, Path], reference: list[Any],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The target drafts for itself with its head cut to every other token id the
    # reference outputs use, plus unrelated ids: the other half can never be proposed.
    used = sorted({t for out in reference for t in out.token_ids})
    kept = used[::2] + list(range(40000, 40100))
    draft = with_draft_vocab(tiny_target, tmp_path / "draft", kept)
    llm = LLM(str(tiny_target), dtype="float32", kv_cache_gib=0.01,
              speculative=SpecConfig("draft", draft_model=str(draft), num_tokens=3,
                                     max_spec_seqs=8))
    proposer = llm.engine.spec.shared
    proposed: list[int] = []
    propose = proposer.propose

    def spy(seqs: list[Any], num_tokens: list[int]) -> None:
        propose(seqs, num_tokens)
        proposed.extend(t for seq in seqs for t in seq.draft_token_ids)

    monkeypatch.setattr(proposer, "propose", spy)
    outs = llm.generate(prompts(), params(), lora=lora_requests(tiny_adapters))
    assert_same_outputs(outs, reference)
    assert proposed and set(proposed) <= set(kept)
    assert llm.engine.spec.stats[None].num_accepted_tokens > 0


def test_automatic_num_tokens_and_large_batches(
        tiny_target: Path, tiny_adapters: dict[str, Path], reference: list[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(str(tiny_target), dtype="float32", kv_cache_gib=0.01,
              speculative=SpecConfig("draft", draft_model=str(tiny_target), max_spec_seqs=3,
                                     max_spec_tokens=5))
    steps = spy_steps(llm.engine, monkeypatch)
    outs = llm.generate(prompts(), params(), lora=lora_requests(tiny_adapters))
    assert_same_outputs(outs, reference)
    # More than 3 running: nobody speculates; once requests finish... they all have the
    # same length, so no step with 3 or fewer exists: speculation stayed off throughout.
    assert all(d == 0 for step in steps for _, _, d in step)

    outs = llm.generate(prompts()[:2], params()[:2], lora=lora_requests(tiny_adapters)[:2])
    assert_same_outputs(outs, reference[:2])
    # Two requests: speculation on, k chosen automatically (how large depends on the
    # measured costs; test_config.py checks the choice on given measurements).
    drafts = [d for step in steps for name, _, d in step if d]
    assert drafts and max(drafts) <= 5


def test_real_model_ngram_equals_plain_decoding(llm_f32: LLM) -> None:
    texts = ["Repeat this list exactly: apples, pears, plums, cherries, apples, pears, "
             "plums, cherries. Again:",
             "The capital of France is",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"]
    greedy = SamplingParams(temperature=0, max_tokens=32)
    reference = llm_f32.generate(texts, greedy)
    spec = LLM("smollm2-135m", dtype="float32", kv_cache_gib=0.05,
               speculative=SpecConfig("ngram", num_tokens=4))
    outs = spec.generate(texts, greedy)
    for out, ref in zip(outs, reference):
        assert out.token_ids == ref.token_ids
        assert out.text == ref.text
    stats = spec.engine.spec.stats[None]
    assert stats.num_accepted_tokens > 10


@torch.no_grad()
@pytest.mark.parametrize("draft_vocab", ["whole", "even ids"])
def test_sampled_tokens_follow_the_targets_distribution(
        small_vocab_pair: tuple[Path, Path], draft_vocab: str, tmp_path: Path) -> None:
    """3 tokens sampled (temperature 0.8, top-k 3) from one prompt, 2000 times, with a
    noisy copy of the target drafting 2 tokens: tokens 2 and 3 come from verification.
    The 27 possible triples must follow the target's exact distribution, computed with
    transformers: chi-square below df + 6 sqrt(2 df) (see test_verify.py), and nothing
    outside the top 3 ever drawn. Also with a draft that may propose only even ids: the
    odd ones then come from the residual alone."""
    from transformers import AutoModelForCausalLM

    target, draft = small_vocab_pair
    if draft_vocab == "even ids":
        draft = with_draft_vocab(draft, tmp_path / "draft", list(range(0, 256, 2)))
    prompt = [11, 245, 77, 190, 5]
    params = SamplingParams(temperature=0.8, top_k=3, max_tokens=3, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()

    def top3(context: list[int]) -> dict[int, float]:
        logits = hf(torch.tensor([context])).logits[0, -1] / 0.8
        values, ids = logits.topk(3)
        return dict(zip(ids.tolist(), values.softmax(-1).tolist()))

    exact: dict[tuple[int, ...], float] = {}
    for a, pa in top3(prompt).items():
        for b, pb in top3(prompt + [a]).items():
            for c, pc in top3(prompt + [a, b]).items():
                exact[(a, b, c)] = pa * pb * pc

    torch.manual_seed(0)
    num_samples = 2000
    llm = LLM(str(target), dtype="float32", kv_cache_gib=0.05, max_num_seqs=256,
              speculative=SpecConfig("draft", draft_model=str(draft), num_tokens=2,
                                     max_spec_seqs=256))
    outs = llm.generate([prompt] * num_samples, params)
    counts: dict[tuple[int, ...], int] = {}
    for out in outs:
        counts[tuple(out.token_ids)] = counts.get(tuple(out.token_ids), 0) + 1
    assert set(counts) <= set(exact)
    stats = llm.engine.spec.stats[None]
    assert stats.num_steps >= num_samples * 0.9  # nearly every request verified a draft
    assert 0.2 < stats.acceptance_rate < 0.95  # both paths: accepted, and resampled
    chi2 = sum((counts.get(t, 0) - num_samples * p) ** 2 / (num_samples * p)
               for t, p in exact.items())
    df = len(exact) - 1
    assert chi2 < df + 6 * (2 * df) ** 0.5, f"chi2 {chi2:.1f}, df {df}"
