"""Pick the next token of each sequence from its logits.

Greedy rows take the argmax. Random rows apply temperature, top-k and top-p, then draw;
a seeded request draws from its own generator, so its tokens do not depend on what else
is in the batch. Log-probabilities come from the raw distribution.
"""
from __future__ import annotations

import torch

from loraplex.engine.sequence import Sequence
from loraplex.sampling import TokenLogprob


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [M, vocab] float32, row i for seqs[i]. Returns token ids and logprobs."""
    token_ids = logits.argmax(dim=-1)  # [M]; kept for greedy rows
    random_rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[rows], [seqs[i] for i in random_rows])
        unseeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is None]
        drawn = torch.empty(len(random_rows), dtype=torch.long, device=logits.device)
        if unseeded:
            drawn[unseeded] = torch.multinomial(probs[unseeded], 1).squeeze(1)
        for j, i in enumerate(random_rows):
            if seqs[i].generator is not None:
                drawn[j] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
        token_ids[rows] = drawn
    ids = token_ids.tolist()
    return ids, _logprobs(logits, seqs, ids)


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """[R, vocab] logits -> probabilities after temperature, top-k and top-p."""
    temperature = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
    logits = logits / temperature[:, None]
    if any(s.params.needs_filtering for s in seqs):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs],
                             device=logits.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        # top-k first, then top-p over what top-k kept (renormalised), as vLLM and HF do.
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass strictly before it is below top_p (the top one always).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def _logprobs(logits: torch.Tensor, seqs: list[Sequence], ids: list[int]) -> list[TokenLogprob | None]:
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(seqs)
    if not wanted:
        return result
    logp = logits[wanted].log_softmax(dim=-1)
    num_top = max(seqs[i].params.logprobs for i in wanted)
    top_values, top_ids = logp.topk(max(num_top, 1), dim=-1)
    for j, i in enumerate(wanted):
        n = seqs[i].params.logprobs
        top = list(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist()))
        result[i] = TokenLogprob(ids[i], logp[j, ids[i]].item(), top)
    return result
