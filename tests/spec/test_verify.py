"""Exact verification on its own: greedy acceptance, and the sampled distribution with
speculation against the target's, exactly computed, on a small Markov-chain "model".

The target is a Markov chain P over a 5-token vocabulary (some transitions impossible, so
support errors show), the draft another chain Q. Each run generates 3 tokens from state 0
by speculation (k = 2 drafts drawn from Q, verified against P's rows) until 3 tokens
exist; the empirical distribution of the 125 possible triples must match
P(a|0) P(b|a) P(c|b). Bound: Pearson's chi-square over the cells with expected count > 0
stays below df + 6 sqrt(2 df) (a false alarm well under 1e-5 for a true match), and no
impossible triple ever appears. The draws are seeded, so the test is deterministic; the
same bound rejects a verifier that accepts every draft, and one that resamples
a rejected position from p instead of the residual (the negative controls).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from loraplex.spec.verify import accept_greedy, accept_sampled

VOCAB = 5
NUM_SAMPLES = 12000
LENGTH = 3


def chains() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(VOCAB, VOCAB, generator=g) + 0.05
    target[:, 4] = 0  # token 4 is impossible for the target, but the draft proposes it
    target[1, 2] = 0
    draft = torch.rand(VOCAB, VOCAB, generator=g) + 0.05
    draft[:, 3] = 0  # the draft never proposes 3: only the residual can produce it
    return target / target.sum(1, keepdim=True), draft / draft.sum(1, keepdim=True)


def speculative_triples(target: torch.Tensor, draft: torch.Tensor | None, accept,
                        num_drafts: int = 2, seed: int = 1,
                        num_samples: int = NUM_SAMPLES) -> torch.Tensor:
    """Counts [V, V, V] of the first 3 tokens of NUM_SAMPLES speculative generations.
    ``draft`` None: a deterministic proposer (always proposes (last + 1) mod V)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    for _ in range(num_samples):
        tokens: list[int] = []
        last = 0
        while len(tokens) < LENGTH:
            draft_ids, draft_rows, prev = [], [], last
            for _ in range(num_drafts):
                if draft is None:
                    token = (prev + 1) % VOCAB
                else:
                    token = int(torch.multinomial(draft[prev], 1, generator=g)[0])
                    draft_rows.append(draft[prev])
                draft_ids.append(token)
                prev = token
            context = [last] + draft_ids  # row i: the target's distribution after context[i]
            probs = target[context]
            q = torch.stack(draft_rows) if draft is not None else None
            tokens += accept(probs, draft_ids, q, g)
            last = tokens[-1]
        counts[tuple(tokens[:LENGTH])] += 1
    return counts


def exact_triples(target: torch.Tensor) -> torch.Tensor:
    p = torch.zeros(VOCAB, VOCAB, VOCAB)
    for a, b, c in itertools.product(range(VOCAB), repeat=3):
        p[a, b, c] = target[0, a] * target[a, b] * target[b, c]
    return p


def chi_square_ok(counts: torch.Tensor, exact: torch.Tensor) -> tuple[bool, str]:
    expected = exact * counts.sum()
    possible = expected > 0
    if counts[~possible].sum() > 0:
        return False, f"{int(counts[~possible].sum())} impossible triples drawn"
    chi2 = float(((counts[possible] - expected[possible]) ** 2 / expected[possible]).sum())
    df = int(possible.sum()) - 1
    bound = df + 6 * math.sqrt(2 * df)
    return chi2 < bound, f"chi2 {chi2:.1f} vs bound {bound:.1f} (df {df})"


def test_speculative_sampling_with_a_draft_model_matches_the_target() -> None:
    target, draft = chains()
    ok, why = chi_square_ok(speculative_triples(target, draft, accept_sampled), exact_triples(target))
    assert ok, why


def test_speculative_sampling_with_a_deterministic_proposer_matches_the_target() -> None:
    target, _ = chains()
    ok, why = chi_square_ok(speculative_triples(target, None, accept_sampled, num_drafts=3),
                            exact_triples(target))
    assert ok, why


def accept_all(probs, draft_ids, q, g):
    return draft_ids + [int(torch.multinomial(probs[-1], 1, generator=g)[0])]


def resample_from_target(probs, draft_ids, q, g):
    """Right acceptance test, wrong resampling: from p instead of norm(max(0, p - q))."""
    for i, token in enumerate(draft_ids):
        if float(torch.rand(1, generator=g)) * q[i, token] >= probs[i, token]:
            return draft_ids[:i] + [int(torch.multinomial(probs[i], 1, generator=g)[0])]
    return draft_ids + [int(torch.multinomial(probs[-1], 1, generator=g)[0])]


@pytest.mark.parametrize("wrong", [accept_all, resample_from_target])
def test_the_bound_rejects_wrong_verifiers(wrong) -> None:
    target, draft = chains()
    # A quarter of the samples: these verifiers are off by far more than the bound.
    ok, why = chi_square_ok(speculative_triples(target, draft, wrong, num_samples=NUM_SAMPLES // 4),
                            exact_triples(target))
    assert not ok, why


def test_rejected_position_is_resampled_from_the_residual() -> None:
    # p puts all mass on 1 and 2; the draft proposed 1 with q(1) = 1: acceptance p(1)/1.
    # After a rejection only 2 is left in max(0, p - q).
    p = torch.tensor([[0.0, 0.3, 0.7], [0.2, 0.3, 0.5]])
    g = torch.Generator().manual_seed(0)
    outcomes = [tuple(accept_sampled(p, [1], torch.tensor([[0.0, 1.0, 0.0]]), g))
                for _ in range(4000)]
    firsts = [o[0] for o in outcomes]
    assert set(firsts) == {1, 2}
    assert abs(firsts.count(1) / len(firsts) - 0.3) < 0.03  # 4000 draws: sd 0.007
    assert all(len(o) == 2 for o in outcomes if o[0] == 1)  # accepted: a bonus token follows
    assert all(len(o) == 1 for o in outcomes if o[0] == 2)


def test_greedy_accepts_the_agreeing_prefix_then_takes_the_targets_token() -> None:
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_greedy([5, 6, 7, 8], [5, 9, 7]) == [5, 6]  # second rejected
    assert accept_greedy([5, 6, 7, 8], [4, 6, 7]) == [5]
