"""The sampler on hand-made logits: greedy, temperature, top-k, top-p, seeds, logprobs.

Distributions are checked by drawing thousands of rows at once from a fixed global seed,
so the counts are deterministic; the tolerances are several standard deviations wide.
"""
from __future__ import annotations

import math

import pytest
import torch

from loraplex.engine.sampler import sample
from loraplex.engine.sequence import Sequence
from loraplex.sampling import SamplingParams

N = 4000
TOL = 0.04  # ~5 standard deviations of a frequency estimated from 4000 draws


def make_seq(seed: int | None = None, **params) -> Sequence:
    seq = Sequence(request_id="r", prompt=None, prompt_token_ids=[1],
                   params=SamplingParams(seed=seed, **params), eos_token_ids=frozenset(),
                   max_model_len=100)
    if seed is not None:
        seq.generator = torch.Generator().manual_seed(seed)
    return seq


def frequencies(probs: list[float], **params) -> list[float]:
    """Draw N tokens from logits log(probs) with the given sampling params."""
    torch.manual_seed(0)
    logits = torch.tensor(probs).log()[None].repeat(N, 1)
    ids, _ = sample(logits, [make_seq(**params) for _ in range(N)])
    return [ids.count(i) / N for i in range(len(probs))]


def assert_freqs(got: list[float], expected: list[float]) -> None:
    for g, e in zip(got, expected):
        if e == 0:
            assert g == 0, (got, expected)
        else:
            assert g == pytest.approx(e, abs=TOL), (got, expected)


P = [0.5, 0.3, 0.2]


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 4.0, 0.0, 0.0]])
    ids, logprobs = sample(logits, [make_seq(temperature=0), make_seq(temperature=0)])
    assert ids == [1, 0] and logprobs == [None, None]


def test_greedy_rows_are_untouched_by_random_rows() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.5]] * 6)
    seqs = [make_seq(temperature=0) if i % 2 else make_seq(temperature=5.0) for i in range(6)]
    ids, _ = sample(logits, seqs)
    assert ids[1::2] == [1, 1, 1]


def test_temperature_one_samples_the_distribution() -> None:
    assert_freqs(frequencies(P), P)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_the_distribution(temperature: float) -> None:
    weights = [p ** (1 / temperature) for p in P]
    expected = [w / sum(weights) for w in weights]
    assert_freqs(frequencies(P, temperature=temperature), expected)


def test_top_k() -> None:
    assert_freqs(frequencies(P, top_k=2), [0.625, 0.375, 0])
    assert_freqs(frequencies(P, top_k=1), [1, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    assert_freqs(frequencies(P, top_p=0.6), [0.625, 0.375, 0])  # 0.5 < 0.6: add the next
    assert_freqs(frequencies(P, top_p=0.5), [1, 0, 0])  # 0.5 reaches 0.5
    assert_freqs(frequencies(P, top_p=0.85), [0.5, 0.3, 0.2])


def test_top_p_applies_after_top_k() -> None:
    """As in vLLM and transformers: top-k first, renormalise, then top-p on what is left.
    After top_k=2 the distribution is [0.625, 0.375]; top_p=0.6 then keeps only the first."""
    assert_freqs(frequencies(P, top_k=2, top_p=0.6), [1, 0, 0])


def test_tiny_temperature_is_greedy_and_does_not_crash_the_batch() -> None:
    """A positive temperature too small to divide by (vLLM treats < 1e-5 as greedy) must
    not turn the logits into inf/nan and fail the whole step for every request."""
    logits = torch.tensor([[30.0, 29.0, 1.0, 0.0], [0.0, 0.0, 9.0, 0.0]])
    ids, _ = sample(logits, [make_seq(temperature=1e-39), make_seq(temperature=1.0, top_k=1)])
    assert ids == [0, 2]


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    seq = make_seq(seed=42)
    alone = [sample(logits, [seq])[0][0] for _ in range(20)]

    seq = make_seq(seed=42)
    in_batch = []
    for step in range(20):
        # Different batch mates every step, the seeded row in a different place.
        mates = [make_seq() for _ in range(step % 4)]
        rows = mates + [seq] + [make_seq(temperature=0)]
        batch_logits = torch.cat([torch.randn(len(mates), 50), logits, torch.randn(1, 50)])
        in_batch.append(sample(batch_logits, rows)[0][len(mates)])
    assert in_batch == alone
    assert len(set(alone)) > 3  # it is really sampling


def test_logprobs_come_from_the_raw_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    raw = logits.log_softmax(-1)[0]
    seqs = [make_seq(temperature=0.3, top_k=2, logprobs=3, seed=1)]
    ids, logprobs = sample(logits, seqs)
    (lp,) = logprobs
    assert lp.token_id == ids[0]
    assert lp.logprob == pytest.approx(raw[ids[0]].item(), abs=1e-6)
    assert [t for t, _ in lp.top] == [0, 1, 4]
    assert [v for _, v in lp.top] == pytest.approx([raw[0].item(), raw[1].item(), raw[4].item()])


def test_logprobs_of_different_widths_in_one_batch() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    seqs = [make_seq(temperature=0, logprobs=0), make_seq(temperature=0),
            make_seq(temperature=0, logprobs=2)]
    ids, logprobs = sample(logits, seqs)
    assert logprobs[0].top == [] and logprobs[1] is None and len(logprobs[2].top) == 2
    assert logprobs[0].logprob == pytest.approx(2.0 - math.log(sum(math.exp(x) for x in (2, 1, 0, -1))))
