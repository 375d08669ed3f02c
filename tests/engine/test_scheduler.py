"""The scheduler with a real BlockManager and a simulated model, plain Python.

The simulation keeps a fake KV cache: the entry at each slot records which token prefix it
was computed from. Every step checks that each sequence reads exactly its own prefix from
the cache, never writes into a block someone else holds, and stays inside the budgets.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from loraplex.config import SchedulerConfig
from loraplex.engine.kv_cache import BlockManager
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.sampling import SamplingParams

B = 4
_ids = itertools.count()


def make_seq(prompt: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(request_id=f"s{next(_ids)}", prompt=None, prompt_token_ids=list(prompt),
                    params=SamplingParams(max_tokens=max_tokens, temperature=0),
                    eos_token_ids=frozenset(), max_model_len=10_000)


@dataclass
class Sim:
    """A scheduler, its blocks, and a model stand-in that checks the KV cache."""

    num_blocks: int
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 16
    enable_prefix_caching: bool = True
    kv: dict[int, tuple[int, ...]] = field(default_factory=dict)
    num_steps: int = 0

    def __post_init__(self) -> None:
        self.bm = BlockManager(self.num_blocks, B, self.enable_prefix_caching)
        self.sched = Scheduler(SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens),
                               self.bm)

    def step(self) -> list[tuple[Sequence, int]]:
        batch = self.last_batch = self.sched.schedule()
        self.num_steps += 1
        work = list(zip(batch.seqs, batch.num_new_tokens))
        assert sum(batch.num_new_tokens) <= self.max_num_batched_tokens
        assert all(n >= 1 for n in batch.num_new_tokens)
        assert len(self.sched.running) <= self.max_num_seqs
        assert len({s.request_id for s in batch.seqs}) == len(batch.seqs)
        for victim in batch.preempted:
            assert victim.status is SequenceStatus.WAITING and victim.block_ids == []
            assert victim not in batch.seqs
        holders: dict[int, int] = {}
        for seq in self.sched.running:
            for b in seq.block_ids:
                holders[b] = holders.get(b, 0) + 1
        for b, n in holders.items():
            assert self.bm.ref_counts[b] == n, "ref count differs from the number of holders"
        for seq, n in work:
            assert seq.status is SequenceStatus.RUNNING
            start, tokens = seq.num_computed_tokens, seq.all_token_ids
            assert len(seq.block_ids) * B >= start + n, "not enough blocks for the step"
            for q in range(start):  # the context read from the cache is this sequence's own
                assert self.kv.get(self.slot(seq, q)) == tuple(tokens[:q + 1]), (seq.request_id, q)
            for p in range(start, start + n):  # writes go only to blocks nobody shares
                assert self.bm.ref_counts[seq.block_ids[p // B]] == 1
                self.kv[self.slot(seq, p)] = tuple(tokens[:p + 1])
        for seq, n in work:
            seq.num_computed_tokens += n
            self.bm.register_full_blocks(seq)
        for seq, _ in work:
            if seq.num_computed_tokens == seq.num_tokens:  # it samples
                # Deterministic "greedy" token: a function of the whole prefix.
                seq.output_token_ids.append(hash(tuple(seq.all_token_ids)) % 50 + 3)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    self.sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
        for b in range(self.num_blocks):
            assert (self.bm.ref_counts[b] == 0) == (b in self.bm.free_queue)
        return work

    @staticmethod
    def slot(seq: Sequence, position: int) -> int:
        return seq.block_ids[position // B] * B + position % B

    def run(self, max_steps: int = 10_000) -> None:
        while self.sched.num_unfinished:
            self.step()
            assert self.num_steps < max_steps, "no progress"


def test_budget_splits_prompts_into_chunks() -> None:
    sim = Sim(num_blocks=32, max_num_batched_tokens=16)
    a, b, c = make_seq([10] * 10), make_seq([11] * 10), make_seq([12] * 20)
    for s in (a, b, c):
        sim.sched.add(s)
    first = sim.step()
    assert [(s, n) for s, n in first] == [(a, 10), (b, 6)]
    second = sim.step()
    # Running ones first, oldest first: a decodes, b finishes its prompt, c starts.
    assert [(s, n) for s, n in second] == [(a, 1), (b, 4), (c, 11)]
    assert len(a.output_token_ids) == 2 and len(b.output_token_ids) == 1 and not c.output_token_ids


def test_max_num_seqs_caps_the_batch() -> None:
    sim = Sim(num_blocks=32, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq([20 + i] * 3, max_tokens=3) for i in range(5)]
    for s in seqs:
        sim.sched.add(s)
    first = sim.step()
    assert [s for s, _ in first] == seqs[:2]
    sim.run()
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in seqs)
    assert all(s.metrics.first_scheduled_time is not None for s in seqs)


def test_newest_running_sequence_is_preempted_and_resumes_first() -> None:
    # 3 blocks: a and b hold one each; when both need a second, only one can have it.
    sim = Sim(num_blocks=3, max_num_batched_tokens=64)
    a, b = make_seq([1, 2, 3], max_tokens=6), make_seq([4, 5, 6], max_tokens=6)
    sim.sched.add(a)
    sim.sched.add(b)
    sim.step()  # both prefilled: 4 tokens each after sampling
    sim.step()  # position 3 fits; now 5 tokens each
    sim.step()  # position 4 needs a 2nd block each, and 1 is free
    assert sim.last_batch.preempted == [b] and sim.last_batch.seqs == [a]
    assert b.num_preemptions == 1 and b.num_computed_tokens == 0
    assert sim.sched.waiting[0] is b and b.output_token_ids  # keeps what it generated
    sim.run()
    assert a.status is b.status is SequenceStatus.FINISHED_LENGTH
    assert sim.bm.num_free_blocks == 3


def test_waiting_requests_are_first_come_first_served() -> None:
    # The head of the queue does not fit yet; a smaller one behind it must not overtake.
    sim = Sim(num_blocks=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    running = make_seq([1] * 8, max_tokens=3)  # 2 blocks, growing to 3
    sim.sched.add(running)
    sim.step()
    big, small = make_seq([2] * 12, max_tokens=2), make_seq([3] * 2, max_tokens=2)
    sim.sched.add(big)
    sim.sched.add(small)
    work = sim.step()
    assert [s for s, _ in work] == [running]
    assert list(sim.sched.waiting) == [big, small]
    sim.run()
    assert big.metrics.first_scheduled_time <= small.metrics.first_scheduled_time


def test_finish_of_a_waiting_sequence() -> None:
    sim = Sim(num_blocks=8)
    a = make_seq([1, 2, 3])
    sim.sched.add(a)
    sim.sched.finish(a, SequenceStatus.FINISHED_ABORTED)
    assert not sim.sched.waiting and a.status is SequenceStatus.FINISHED_ABORTED
    assert sim.step() == []


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_random_workload_keeps_every_invariant(seed: int, enable_prefix_caching: bool) -> None:
    """Random arrivals with shared prefixes, a small block pool and a small budget:
    preemption, chunking and prefix hits all happen, and every check in Sim.step holds."""
    rng = random.Random(seed)
    sim = Sim(num_blocks=14, max_num_seqs=rng.choice([3, 5, 8]),
              max_num_batched_tokens=rng.choice([5, 8, 16, 32]),
              enable_prefix_caching=enable_prefix_caching)
    base = [rng.randrange(3, 60) for _ in range(24)]
    pending = []
    for _ in range(16):
        shared = rng.choice([0, 4, 8, 9, 16])
        prompt = base[:shared] + [rng.randrange(3, 60) for _ in range(rng.randint(1, 12))]
        pending.append((rng.randrange(0, 40), make_seq(prompt, max_tokens=rng.randint(1, 14))))
    # Each request fits the pool alone: prompt <= 28, output <= 14 -> 42 tokens <= 56.
    pending.sort(key=lambda item: item[0])
    seqs = [s for _, s in pending]
    while pending or sim.sched.num_unfinished:
        while pending and pending[0][0] <= sim.num_steps:
            sim.sched.add(pending.pop(0)[1])
        sim.step()
        assert sim.num_steps < 5000, "no progress"
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in seqs)
    assert all(len(s.output_token_ids) == s.params.max_tokens for s in seqs)
    assert sim.bm.num_free_blocks == sim.num_blocks
    assert any(s.num_preemptions for s in seqs)  # the workload really is cramped
    assert (sim.bm.num_cache_hits > 0) == enable_prefix_caching


def test_random_workload_outputs_do_not_depend_on_scheduling() -> None:
    """The same requests through a roomy scheduler and a cramped one (preemptions, chunks,
    prefix hits) produce the same tokens, since each token is a function of its prefix."""
    rng = random.Random(123)
    prompts = [[rng.randrange(3, 60) for _ in range(rng.randint(2, 20))] for _ in range(10)]
    outputs = []
    for kwargs in (dict(num_blocks=200, max_num_batched_tokens=512),
                   dict(num_blocks=12, max_num_batched_tokens=7, max_num_seqs=4)):
        sim = Sim(**kwargs)
        seqs = [make_seq(p, max_tokens=12) for p in prompts]
        for s in seqs:
            sim.sched.add(s)
        sim.run()
        outputs.append([s.output_token_ids for s in seqs])
        if kwargs["num_blocks"] == 12:
            assert any(s.num_preemptions for s in seqs)
    assert outputs[0] == outputs[1]
