"""Exact verification of draft tokens: the output distribution stays the target's.

The target scored the last sampled token and k draft tokens d_1..d_k in one forward pass:
row i of its logits predicts the token after d_i (row 0: after the last sampled token).

- Greedy: accept d_{i+1} while it equals the argmax of row i; then take the argmax of the
  first row that disagrees (or of row k, the bonus token, when all agree): exactly the
  tokens greedy decoding would give.
- Sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_{i+1} with probability
  min(1, p_i(d) / q_i(d)), where p is the target's distribution (after temperature, top-k,
  top-p) and q the proposer's; resample the first rejected position from
  norm(max(0, p_i - q_i)); add a bonus token from p_k when all are accepted. A
  deterministic proposer (n-gram lookup) has q_i = one-hot(d_{i+1}).
"""
from __future__ import annotations

import torch

from loraplex.engine.sampler import _filtered_probs, _logprobs
from loraplex.engine.sequence import Sequence
from loraplex.sampling import TokenLogprob


def verify_drafts(logits: torch.Tensor, seq: Sequence) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [k + 1, vocab] float32 for ``seq``'s last token and its k draft tokens.

    Returns the tokens to append (accepted drafts + one) and their logprobs.
    """
    draft_ids = seq.draft_token_ids
    assert logits.shape[0] == len(draft_ids) + 1
    if seq.params.is_greedy:
        token_ids = accept_greedy(logits.argmax(dim=-1).tolist(), draft_ids)
    else:
        probs = _filtered_probs(logits, [seq] * logits.shape[0])
        token_ids = accept_sampled(probs, draft_ids, seq.draft_probs, seq.generator)
    m = len(token_ids)
    return token_ids, _logprobs(logits[:m], [seq] * m, token_ids)


def accept_greedy(target_ids: list[int], draft_ids: list[int]) -> list[int]:
    """target_ids: the argmax of each of the k + 1 rows."""
    n = 0
    while n < len(draft_ids) and draft_ids[n] == target_ids[n]:
        n += 1
    return draft_ids[:n] + [target_ids[n]]


def accept_sampled(target_probs: torch.Tensor, draft_ids: list[int],
                   draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> list[int]:
    """target_probs: [k + 1, vocab] p; draft_probs: [k, vocab] q, or None for one-hot q.

    Every draw comes from ``generator`` (a seeded request's own) when given.
    """
    k = len(draft_ids)
    device = target_probs.device
    ids = torch.tensor(draft_ids, dtype=torch.long, device=device)
    rows = torch.arange(k, device=device)
    p_draft = target_probs[rows, ids]  # [k]
    q_draft = draft_probs[rows, ids] if draft_probs is not None else torch.ones_like(p_draft)
    uniform = torch.rand(k, generator=generator, device=device)
    # u < p/q, written without the division: q > 0 for every token the proposer drew.
    accepted = (uniform * q_draft < p_draft).to(torch.long)
    n = int(accepted.cumprod(dim=0).sum())
    if n == k:
        dist = target_probs[k]  # all accepted: the bonus token
    else:
        q = draft_probs[n] if draft_probs is not None else \
            torch.nn.functional.one_hot(ids[n], target_probs.shape[-1]).to(target_probs.dtype)
        dist = (target_probs[n] - q).clamp_(min=0)
        if float(dist.sum()) <= 0:  # p == q up to rounding: then p itself is the residual
            dist = target_probs[n]
    next_id = int(torch.multinomial(dist, 1, generator=generator)[0])
    return draft_ids[:n] + [next_id]
