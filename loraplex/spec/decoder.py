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
rate and c the measured cost of one draft token relative to one target step.
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
        # Running costs, seconds: one target step, and one draft token per proposer.
        self.target_step_s: float | None = None
        self.draft_token_s: dict[int, float] = {}
        self._last_step_start: float | None = None

    def proposer_for(self, seq: Sequence) -> Proposer | None:
        if seq.lora is not None and seq.lora.name in self.by_adapter:
            return self.by_adapter[seq.lora.name]
        return self.shared

    def propose(self, running: list[Sequence]) -> None:
        """Set this step's draft tokens of the running sequences that speculate."""
        now = time.perf_counter()
        if self._last_step_start is not None:  # the last step, minus its own proposing
            self._observe_target(now - self._last_step_start)
        self._last_step_start = now
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
                per_token = elapsed / max(ks)
                old = self.draft_token_s.get(id(proposer))
                self.draft_token_s[id(proposer)] = (per_token if old is None
                                                    else _DECAY * old + (1 - _DECAY) * per_token)

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

    def cost_ratio(self, proposer: Proposer) -> float:
        """c: one draft token's cost over one target step (0 for the n-gram lookup)."""
        if not proposer.is_model:
            return 0.0
        draft_s = self.draft_token_s.get(id(proposer))
        if draft_s is None or not self.target_step_s:
            return 0.1  # before any measurement: a draft about a tenth of the target
        return draft_s / self.target_step_s

    def _observe_target(self, seconds: float) -> None:
        old = self.target_step_s
        if old is not None and seconds > 5 * old:
            return  # the engine sat idle between two calls: not a step's cost
        self.target_step_s = seconds if old is None else _DECAY * old + (1 - _DECAY) * seconds

    def _all_proposers(self) -> list[Proposer]:
        unique = {id(p): p for p in (self.shared, *self.by_adapter.values()) if p is not None}
        return list(unique.values())
