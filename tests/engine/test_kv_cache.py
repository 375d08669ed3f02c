"""BlockManager book-keeping, plain Python: no model, no tensors."""
from __future__ import annotations

import itertools

import pytest

from loraplex.engine.kv_cache import BlockManager
from loraplex.engine.sequence import Sequence
from loraplex.sampling import SamplingParams

B = 4  # block size
_ids = itertools.count()


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence(request_id=f"r{next(_ids)}", prompt=None, prompt_token_ids=list(token_ids),
                    params=SamplingParams(), eos_token_ids=frozenset({2}), max_model_len=1000)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """What the scheduler does for a waiting sequence: take its cached prefix, allocate the
    rest of its tokens, and (as the engine does after the step) mark them computed and
    register the full blocks. Returns the cached block ids it got."""
    cached = bm.find_cached_prefix(seq)
    num_new = seq.num_tokens - len(cached) * B
    assert bm.can_admit(seq, cached, num_new)
    bm.take_cached_prefix(seq, cached)
    bm.allocate(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.register_full_blocks(seq)
    return cached


def check_invariant(bm: BlockManager) -> None:
    for block_id in range(bm.num_blocks):
        assert (bm.ref_counts[block_id] == 0) == (block_id in bm.free_queue), block_id
    for block_hash, block_id in bm.cached.items():
        assert bm.block_hashes[block_id] == block_hash


def test_allocate_counts_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=B, enable_prefix_caching=False)
    seq = make_seq(list(range(10, 20)))  # 10 tokens -> 3 blocks
    assert bm.blocks_needed(seq, 10) == 3
    bm.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and len(set(seq.block_ids)) == 3
    assert bm.num_free_blocks == 7
    seq.num_computed_tokens = 10
    # Growing inside the last block needs nothing; crossing its end needs one more.
    assert bm.blocks_needed(seq, 1) == 0
    assert bm.blocks_needed(seq, 2) == 0
    assert bm.blocks_needed(seq, 3) == 1
    assert bm.blocks_needed(seq, 7) == 2
    bm.allocate(seq, 3)
    assert len(seq.block_ids) == 4 and bm.num_free_blocks == 6
    check_invariant(bm)


def test_two_sequences_get_disjoint_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=B, enable_prefix_caching=True)
    a, b = make_seq([5] * 9), make_seq([5] * 9)
    bm.allocate(a, 9)
    bm.allocate(b, 9)
    assert not set(a.block_ids) & set(b.block_ids)
    assert bm.num_free_blocks == 2


def test_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=6, block_size=B, enable_prefix_caching=True)
    seq = make_seq(list(range(100, 114)))  # 14 tokens -> 4 blocks
    admit(bm, seq)
    assert bm.num_free_blocks == 2
    bm.free(seq)
    assert bm.num_free_blocks == 6
    assert bm.ref_counts == [0] * 6
    assert seq.block_ids == [] and seq.num_computed_tokens == 0 and seq.num_hashed_blocks == 0
    check_invariant(bm)


def test_can_admit_refuses_what_does_not_fit() -> None:
    bm = BlockManager(num_blocks=3, block_size=B, enable_prefix_caching=True)
    assert bm.can_admit(make_seq([1] * 12), [], 12)
    assert not bm.can_admit(make_seq([1] * 13), [], 13)


def test_prefix_hit_after_free() -> None:
    bm = BlockManager(num_blocks=10, block_size=B, enable_prefix_caching=True)
    prompt = list(range(1000, 1010))  # 10 tokens: 2 full blocks + 2 tokens
    a = make_seq(prompt)
    admit(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)

    b = make_seq(prompt + [7, 8, 9])
    cached = admit(bm, b)
    assert cached == a_blocks[:2]  # the full blocks, in order; not the partial third
    assert b.block_ids[:2] == a_blocks[:2]
    assert bm.num_cache_hits == 8
    assert b.num_computed_tokens == b.num_tokens
    check_invariant(bm)


def test_prefix_hit_leaves_a_token_to_compute() -> None:
    bm = BlockManager(num_blocks=10, block_size=B, enable_prefix_caching=True)
    prompt = list(range(200, 208))  # exactly 2 full blocks
    a = make_seq(prompt)
    admit(bm, a)
    bm.free(a)
    # The same 8 tokens again: the last block must be recomputed to get logits.
    assert len(bm.find_cached_prefix(make_seq(prompt))) == 1
    assert len(bm.find_cached_prefix(make_seq(prompt + [1]))) == 2


def test_prefix_hit_needs_the_whole_chain() -> None:
    bm = BlockManager(num_blocks=10, block_size=B, enable_prefix_caching=True)
    prompt = list(range(300, 313))  # 3 full blocks + 1
    a = make_seq(prompt)
    admit(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)
    assert bm.find_cached_prefix(make_seq(prompt)) == a_blocks[:3]
    # Same first block, different second: only the first is a hit.
    second_differs = prompt[:5] + [9] + prompt[6:]
    assert bm.find_cached_prefix(make_seq(second_differs)) == a_blocks[:1]
    # Different first block, same later blocks: no hit at all (the hash is chained).
    assert bm.find_cached_prefix(make_seq([9] + prompt[1:])) == []
    # A different cache salt (an adapter's identity) never hits the base model's blocks.
    salted = make_seq(prompt)
    salted.cache_salt = bytes.fromhex("ab" * 16)
    assert bm.find_cached_prefix(salted) == []


def test_no_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=10, block_size=B, enable_prefix_caching=False)
    prompt = list(range(400, 410))
    a = make_seq(prompt)
    admit(bm, a)
    bm.free(a)
    assert bm.find_cached_prefix(make_seq(prompt + [1])) == []
    assert bm.cached == {} and bm.num_cache_hits == 0


def test_eviction_is_least_recently_used() -> None:
    bm = BlockManager(num_blocks=4, block_size=B, enable_prefix_caching=True)
    prompt_a, prompt_b = list(range(500, 508)), list(range(600, 608))
    a, b = make_seq(prompt_a), make_seq(prompt_b)
    admit(bm, a)
    admit(bm, b)
    a_blocks, b_blocks = list(a.block_ids), list(b.block_ids)
    a_hashes = list(a.block_hash_chain)
    bm.free(a)
    bm.free(b)  # a finished first: its blocks are the older ones
    assert bm.num_free_blocks == 4
    assert bm.find_cached_prefix(make_seq(prompt_a + [1])) == a_blocks
    assert bm.find_cached_prefix(make_seq(prompt_b + [1])) == b_blocks

    # One new block evicts a's tail, not its head: a prefix outlives its continuation.
    c = make_seq([7] * 7)
    bm.allocate(c, 3)
    assert c.block_ids == [a_blocks[1]]
    assert a_hashes[1] not in bm.cached
    assert bm.find_cached_prefix(make_seq(prompt_a + [1])) == a_blocks[:1]
    assert bm.find_cached_prefix(make_seq(prompt_b + [1])) == b_blocks

    # The next one evicts a's head; b, used more recently, is untouched.
    bm.allocate(c, 7)
    assert c.block_ids == [a_blocks[1], a_blocks[0]]
    assert a_hashes[0] not in bm.cached
    assert bm.find_cached_prefix(make_seq(prompt_a + [1])) == []
    assert bm.find_cached_prefix(make_seq(prompt_b + [1])) == b_blocks
    check_invariant(bm)


def test_reuse_refreshes_a_cached_prefix() -> None:
    bm = BlockManager(num_blocks=4, block_size=B, enable_prefix_caching=True)
    prompt_a, prompt_b = list(range(700, 708)), list(range(800, 808))
    a, b = make_seq(prompt_a), make_seq(prompt_b)
    admit(bm, a)
    admit(bm, b)
    a_blocks, b_blocks = list(a.block_ids), list(b.block_ids)
    bm.free(a)
    bm.free(b)
    # a's first block is used again (and freed again): now b's blocks are older than it.
    again = make_seq(prompt_a[:4] + [1])
    assert admit(bm, again) == a_blocks[:1]
    bm.free(again)
    new = make_seq([3] * 8)
    bm.allocate(new, 8)  # two blocks: `again`'s unhashed tail, then b's tail (the oldest)
    assert b_blocks[1] in new.block_ids and a_blocks[0] not in new.block_ids
    assert bm.find_cached_prefix(make_seq(prompt_a[:4] + [1])) == a_blocks[:1]
    assert bm.find_cached_prefix(make_seq(prompt_b + [1])) == b_blocks[:1]
    check_invariant(bm)


def test_unhashed_blocks_are_reused_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=3, block_size=B, enable_prefix_caching=True)
    a = make_seq(list(range(900, 906)))  # 1 full block (hashed) + 1 partial (not)
    admit(bm, a)
    full, partial = a.block_ids
    (spare,) = set(range(3)) - {full, partial}
    bm.free(a)
    # The partial block and the never-used one are both worthless; a's full block is kept
    # until nothing else is left.
    b, c, d = make_seq([4]), make_seq([5]), make_seq([6])
    bm.allocate(b, 1)
    bm.allocate(c, 1)
    assert {b.block_ids[0], c.block_ids[0]} == {partial, spare}
    assert bm.find_cached_prefix(make_seq(list(range(900, 906)))) == [full]
    bm.allocate(d, 1)
    assert d.block_ids == [full]
    assert bm.find_cached_prefix(make_seq(list(range(900, 906)))) == []
    check_invariant(bm)


def test_shared_prefix_is_ref_counted() -> None:
    bm = BlockManager(num_blocks=8, block_size=B, enable_prefix_caching=True)
    prompt = list(range(1100, 1109))  # 2 full blocks + 1
    a = make_seq(prompt)
    admit(bm, a)
    assert bm.num_free_blocks == 5
    shared = a.block_ids[:2]

    # b shares a's blocks while a still runs: held blocks are not taken from the free queue.
    b = make_seq(prompt[:8] + [1, 2, 3])
    cached = bm.find_cached_prefix(b)
    assert cached == shared
    assert bm.can_admit(b, cached, 3)
    admit(bm, b)
    assert [bm.ref_counts[i] for i in shared] == [2, 2]
    assert bm.num_free_blocks == 4  # only b's own third block was new
    assert b.block_ids[:2] == shared and b.block_ids[2] != a.block_ids[2]

    bm.free(a)
    assert [bm.ref_counts[i] for i in shared] == [1, 1]
    assert not any(i in bm.free_queue for i in shared)  # b still uses them
    assert bm.num_free_blocks == 5
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert all(i in bm.free_queue for i in shared)
    check_invariant(bm)


def test_can_admit_counts_cached_blocks_taken_from_the_free_queue() -> None:
    bm = BlockManager(num_blocks=3, block_size=B, enable_prefix_caching=True)
    prompt = list(range(1200, 1208))
    a = make_seq(prompt)
    admit(bm, a)
    bm.free(a)  # both blocks cached but free; 3 free in all
    b = make_seq(prompt + [1, 2, 3, 4, 5])  # 13 tokens: 2 cached + 2 new blocks = 4 > 3
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2
    assert not bm.can_admit(b, cached, 5)
    assert bm.can_admit(b, cached, 4)  # 12 tokens: 2 cached + 1 new


def test_identical_blocks_computed_twice_keep_one_cache_entry() -> None:
    # b was admitted before a's blocks were registered, so both computed the same block.
    bm = BlockManager(num_blocks=6, block_size=B, enable_prefix_caching=True)
    prompt = list(range(1300, 1305))
    a, b = make_seq(prompt), make_seq(prompt)
    for seq in (a, b):
        bm.allocate(seq, 5)
        seq.num_computed_tokens = 5
    bm.register_full_blocks(a)
    bm.register_full_blocks(b)
    a_first, b_first = a.block_ids[0], b.block_ids[0]
    assert bm.cached[a.block_hash_chain[0]] == a_first
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6
    # The registered copy survives; b's duplicate is reused first.
    c = make_seq([9])
    bm.allocate(c, 1)
    assert c.block_ids == [b_first]
    assert bm.find_cached_prefix(make_seq(prompt)) == [a_first]
    check_invariant(bm)


@pytest.mark.parametrize("num_tokens, expected", [(1, 1), (4, 1), (5, 2), (16, 4), (17, 5)])
def test_blocks_needed_from_empty(num_tokens: int, expected: int) -> None:
    bm = BlockManager(num_blocks=8, block_size=B, enable_prefix_caching=True)
    assert bm.blocks_needed(make_seq([1] * num_tokens), num_tokens) == expected
