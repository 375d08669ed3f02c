"""Speculative decoding in the engine: who speculates, with how many tokens, and the books.

Once per step, before scheduling, ``propose`` asks each running sequence's proposer for
draft tokens; the scheduler gives the sequence one more token per draft, the model runner
scores them all in one forward pass and verifies them (spec/verify.py), and the engine
reports back through ``record``. Requests without a proposer (an adapter with no draft
model) decode in the same batch as usual.

Speculation is off in steps where more than ``max_spec_seqs`` sequences run: there the
target's forward pass is bound by arithmetic, and verifying k drafts costs about k times
more. With ``num_tokens`` unset, k is chosen per adapter (and proposer) to maximise the
expected speedup (1 - a^(k+1)) / ((1 - a)(k c + 1)), where a is the measured acceptance
rate and c the measured cost of one more draft position relative to a plain target step:
the proposer's own time (nothing for the n-gram lookup) plus the target's extra time to
verify one more token per running sequence, both measured from the engine's steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.config import SpecConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.models.llama import ModelArch
from loraplex.models.registry import resolve_model
from loraplex.spec.proposer import DraftModelProposer, NgramProposer, Proposer

_DECAY = 0.98  # weight of the past in the running measurements (~50 steps of memory)
_PROBE_EVERY = 32  # when k = 0 pays best, still try k = 1 this often, to keep measuring


@dataclass(slots=True)
class SpecStats:
    """Verification steps of one adapter (``None``: the base model)."""

    num_steps: int = 0  # steps that verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Decayed counts for the acceptance estimate: accepted drafts, and rejections.
    recent_accepted: float = 1.0  # a prior of one of each: a = 0.5 before any evidence
    recent_rejected: float = 1.0
    num_skipped_decisions: int = 0  # choices of k = 0 since the last probe

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted share of the proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Accepted draft tokens per verification step (tokens per step is one more)."""
        return self.num_accepted_tokens / self.num_steps if self.num_steps else None

    @property
    def estimated_acceptance(self) -> float:
        """Per-token acceptance probability a, from the decayed counts (acceptance stops at
        the first rejection, so a = accepted / (accepted + rejections))."""
        return self.recent_accepted / (self.recent_accepted + self.recent_rejected)


def expected_speedup(acceptance: float, num_tokens: int, cost_ratio: float) -> float:
    """Tokens per unit of time with k draft tokens, relative to plain decoding."""
    expected_tokens = sum(acceptance ** i for i in range(num_tokens + 1))
    return expected_tokens / (num_tokens * cost_ratio + 1)


def best_num_tokens(acceptance: float, cost_ratio: float, max_spec_tokens: int) -> int:
    """The k in 0..max_spec_tokens of the highest expected speedup (0: do not speculate)."""
    return max(range(max_spec_tokens + 1),
               key=lambda k: (expected_speedup(acceptance, k, cost_ratio), -k))


def _ema(old: float | None, new: float) -> float:
    return new if old is None else _DECAY * old + (1 - _DECAY) * new


class SpecDecoder:
    def __init__(self, config: SpecConfig, target_path: Path, target_arch: ModelArch,
                 device: torch.device, dtype: torch.dtype, num_blocks: int,
                 block_size: int) -> None:
        self.config = config
        self.stats: dict[str | None, SpecStats] = {}
        loaded: dict[Path, DraftModelProposer] = {}

        def draft(name: str) -> DraftModelProposer:
            path = resolve_model(name).resolve()
            if path not in loaded:
                loaded[path] = DraftModelProposer(path, target_arch, target_path, device,
                                                  dtype, num_blocks, block_size)
            return loaded[path]

        self.shared: Proposer | None = None
        if config.method == "ngram":
            self.shared = NgramProposer(config.ngram_min, config.ngram_max)
        elif config.draft_model:
            self.shared = draft(config.draft_model)
        self.by_adapter: dict[str, Proposer] = {name: draft(path)
                                                for name, path in config.draft_for}
        # Running costs, seconds: a target step without drafts, the target's extra time
        # per draft token it verifies, and per proposer one draft position (all its
        # sequences at once).
        self.plain_step_s: float | None = None
        self.verify_token_s: float | None = None
        self.draft_token_s: dict[int, float] = {}
        self._last_step_start: float | None = None
        self._last_num_drafts = 0
        self._num_running = 1

    def proposer_for(self, seq: Sequence) -> Proposer | None:
        if seq.lora is not None and seq.lora.name in self.by_adapter:
            return self.by_adapter[seq.lora.name]
        return self.shared

    def propose(self, running: list[Sequence]) -> None:
        """Set this step's draft tokens of the running sequences that speculate."""
        now = time.perf_counter()
        if self._last_step_start is not None:  # the last step, minus its own proposing
            self._observe_step(now - self._last_step_start, self._last_num_drafts)
        self._last_step_start = now
        self._num_running = max(1, len(running))
        for proposer in self._all_proposers():
            proposer.release_finished()
        groups: dict[int, tuple[Proposer, list[Sequence], list[int]]] = {}
        for seq in running:
            seq.draft_token_ids, seq.draft_probs = [], None
        is_small_batch = len(running) <= self.config.max_spec_seqs
        for seq in running:
            proposer = self.proposer_for(seq)
            if proposer is None or seq.num_uncomputed_tokens != 1:
                continue  # no proposer, or still prefilling
            k = self._num_tokens(seq, proposer) if is_small_batch else 0
            if k > 0:
                group = groups.setdefault(id(proposer), (proposer, [], []))
                group[1].append(seq)
                group[2].append(k)
        for proposer, seqs, ks in groups.values():
            start = time.perf_counter()
            proposer.propose(seqs, ks)
            elapsed = time.perf_counter() - start
            self._last_step_start += elapsed
            if proposer.is_model:  # the n-gram lookup costs nothing worth modelling
                self.draft_token_s[id(proposer)] = _ema(self.draft_token_s.get(id(proposer)),
                                                        elapsed / max(ks))
        self._last_num_drafts = sum(len(seq.draft_token_ids) for seq in running)

    def record(self, seq: Sequence, num_accepted: int) -> None:
        """Book one verification of ``seq``'s drafts; clears them."""
        stats = self.stats_for(seq)
        num_drafts = len(seq.draft_token_ids)
        stats.num_steps += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        stats.recent_accepted = _DECAY * stats.recent_accepted + num_accepted
        stats.recent_rejected = _DECAY * stats.recent_rejected + (num_accepted < num_drafts)
        seq.draft_token_ids, seq.draft_probs = [], None

    def stats_for(self, seq: Sequence) -> SpecStats:
        key = seq.lora.name if seq.lora is not None else None
        if key not in self.stats:
            self.stats[key] = SpecStats()
        return self.stats[key]

    # ---- choosing k ---------------------------------------------------------------------

    def _num_tokens(self, seq: Sequence, proposer: Proposer) -> int:
        # Room left: every draft takes a position, and at most max_tokens are appended.
        room = min(seq.max_model_len - seq.num_tokens,
                   seq.params.max_tokens - len(seq.output_token_ids) - 1)
        if seq.status is not SequenceStatus.RUNNING or room <= 0:
            return 0
        if self.config.num_tokens is not None:
            return min(self.config.num_tokens, room)
        stats = self.stats_for(seq)
        k = best_num_tokens(stats.estimated_acceptance, self.cost_ratio(proposer),
                            self.config.max_spec_tokens)
        if k == 0:
            stats.num_skipped_decisions += 1
            if stats.num_skipped_decisions >= _PROBE_EVERY:
                stats.num_skipped_decisions, k = 0, 1
        return min(k, room)

    def cost_ratio(self, proposer: Proposer, num_seqs: int | None = None) -> float:
        """c: what one more draft position costs relative to a plain target step: the
        proposer's time for it, plus the target's time to verify one more token for each
        of the ``num_seqs`` running sequences (default: as many as in this step)."""
        num_seqs = self._num_running if num_seqs is None else num_seqs
        plain = self.plain_step_s
        if plain is None:  # before any measurement: a draft a tenth of the target
            return 0.1 if proposer.is_model else 0.02
        draft_s = self.draft_token_s.get(id(proposer), 0.1 * plain) if proposer.is_model else 0.0
        verify_s = self.verify_token_s if self.verify_token_s is not None else 0.02 * plain
        return (draft_s + num_seqs * verify_s) / plain

    def _observe_step(self, seconds: float, num_drafts: int) -> None:
        """One target step took ``seconds`` while verifying ``num_drafts`` draft tokens."""
        plain = self.plain_step_s
        if plain is not None and seconds > 5 * plain * (1 + num_drafts):
            return  # the engine sat idle between two calls: not a step's cost
        if num_drafts == 0:
            self.plain_step_s = _ema(plain, seconds)
        elif plain is not None:
            self.verify_token_s = _ema(self.verify_token_s, max(0.0, seconds - plain) / num_drafts)

    def _all_proposers(self) -> list[Proposer]:
        unique = {id(p): p for p in (self.shared, *self.by_adapter.values()) if p is not None}
        return list(unique.values())
