"""Which sequences run in the next step, and how many of their tokens.

Plain Python, no tensors. One token budget per step covers decodes (1 token each) and
prefill chunks alike, so a long prompt is prefilled over several steps while the running
requests keep decoding. Running sequences go first, oldest first; when KV blocks run out,
the newest running sequence is preempted (its blocks freed, to be recomputed later;
prefix caching usually makes that cheap). Waiting sequences are admitted first come,
first served, with one exception for adapters: a request whose adapter is still loading,
or has no free slot (every slot pinned by running requests of other adapters), is
skipped, not waited for, so the others keep flowing. A request skipped for more than
``max_lora_wait_steps`` steps stops all admissions that would pin a slot, so slots drain
and it gets the next one: no request waits unboundedly.

Speculative decoding: a running sequence with draft tokens (spec/decoder.py) is given one
token more per draft, if the budget and the free blocks hold them all; otherwise its drafts
are dropped and it decodes one token. Speculation never causes a preemption.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from loraplex.config import SchedulerConfig
from loraplex.engine.kv_cache import BlockManager
from loraplex.lora.cache import AdapterCache
from loraplex.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per seq, same order
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 adapters: AdapterCache | None = None, max_lora_wait_steps: int = 64) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapters = adapters
        self.max_lora_wait_steps = max_lora_wait_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        blocks = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.draft_token_ids and not self._fits_drafts(seq, budget):
                seq.draft_token_ids, seq.draft_probs = [], None  # never preempt to speculate
            num_new = min(seq.num_uncomputed_tokens + len(seq.draft_token_ids), budget)
            while blocks.blocks_needed(seq, num_new) > blocks.num_free_blocks:
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                blocks.allocate(seq, num_new)
                batch.add(seq, num_new)
                budget -= num_new
                i += 1
                continue
            break
        if batch.preempted:  # memory is short: admit nobody this step
            return batch
        self._admit(batch, budget)
        return batch

    def _fits_drafts(self, seq: Sequence, budget: int) -> bool:
        """Draft tokens are verified with the last token (one more each), if the budget and
        the free blocks hold them all."""
        num_new = seq.num_uncomputed_tokens + len(seq.draft_token_ids)
        return (num_new <= budget
                and self.block_manager.blocks_needed(seq, num_new) <= self.block_manager.num_free_blocks)

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        blocks = self.block_manager
        starving = next((s for s in self.waiting
                         if s.num_lora_skips > self.max_lora_wait_steps), None)
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if seq.lora is not None:
                if seq.adapter is None:
                    continue  # still loading from disk
                assert self.adapters is not None
                if starving is not None and seq is not starving:
                    continue  # slots drain for the starving request first
                if not self.adapters.can_activate(seq.adapter):
                    seq.num_lora_skips += 1
                    continue
            cached = blocks.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * blocks.block_size, budget)
            if not blocks.can_admit(seq, cached, num_new):
                break  # KV memory is first come, first served
            self.waiting.remove(seq)
            if seq.adapter is not None:
                seq.lora_slot = self.adapters.activate(seq.adapter)
            blocks.take_cached_prefix(seq, cached)
            blocks.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take ``seq`` out of the queues and free its blocks."""
        assert status.is_finished
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = status
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.lora_slot >= 0:
            self.adapters.release(seq.lora_slot)
            seq.lora_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        # Recompute later: prompt and generated tokens so far are prefilled again.
        self._release(seq)
        seq.draft_token_ids, seq.draft_probs = [], None
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
