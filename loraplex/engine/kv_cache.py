"""Book-keeping of the paged KV cache: which block holds which tokens.

Plain Python; the tensors live in the model runner. A sequence owns a list of block ids
(its block table); token at position p lives in slot ``block_ids[p // B] * B + p % B``.

Prefix caching: a full block is known by a chained hash of (the previous block's hash,
its token ids, the sequence's cache salt: its adapter's content hash, if any). A block whose last user
finished stays in the free queue with its hash until it is reused, so a later request
with the same prefix finds it and skips computing it.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from loraplex.engine.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int], extra_key: bytes) -> bytes:
    data = parent + array("q", token_ids).tobytes() + extra_key
    return hashlib.blake2b(data, digest_size=16).digest()


class BlockManager:
    """Allocates KV blocks to sequences.

    Invariant: every block is either held (``ref_counts[b] > 0``) or in ``free_queue``.
    A free block may still be listed in ``cached`` (its content is valid) until it is
    handed out again. The free queue is in eviction order: least useful first.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.num_cache_hits = 0  # tokens served from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of ``seq`` (not yet taken).

        At least one token is always left to compute, since the step that computes it
        produces the logits for the next token.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hash_chain(seq, max_blocks)
        hits = []
        for block_hash in seq.block_hash_chain[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_admit(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        # Cached blocks sitting in the free queue stop being free once taken.
        num_taken_from_free = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        num_needed = -(-(len(cached_blocks) * self.block_size + num_new_tokens)
                       // self.block_size) - len(cached_blocks)
        return num_needed + num_taken_from_free <= self.num_free_blocks

    def take_cached_prefix(self, seq: Sequence, cached_blocks: list[int]) -> None:
        assert not seq.block_ids and seq.num_computed_tokens == 0
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
        seq.block_ids = list(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        seq.num_hashed_blocks = len(cached_blocks)
        self.num_cache_hits += seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` the blocks it needs to hold ``num_new_tokens`` more tokens."""
        num_needed = self.blocks_needed(seq, num_new_tokens)
        assert num_needed <= self.num_free_blocks, "caller must check the free count"
        for _ in range(num_needed):
            block_id, _ = self.free_queue.popitem(last=False)
            old_hash = self.block_hashes[block_id]
            if old_hash is not None:  # evict its cached content
                if self.cached.get(old_hash) == block_id:
                    del self.cached[old_hash]
                self.block_hashes[block_id] = None
            self.ref_counts[block_id] = 1
            seq.block_ids.append(block_id)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the full, computed blocks of ``seq`` findable by later requests."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_hashed_blocks:
            return
        self._extend_hash_chain(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            block_hash, block_id = seq.block_hash_chain[i], seq.block_ids[i]
            if block_hash not in self.cached and self.block_hashes[block_id] is None:
                self.cached[block_hash] = block_id
                self.block_hashes[block_id] = block_hash
        seq.num_hashed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so a prefix outlives its own continuation in the cache.
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None
                if self.block_hashes[block_id] is None:  # nothing worth keeping: reuse first
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def _extend_hash_chain(self, seq: Sequence, num_blocks: int) -> None:
        chain, size = seq.block_hash_chain, self.block_size
        while len(chain) < num_blocks:
            i = len(chain)
            tokens = seq.token_slice(i * size, (i + 1) * size)
            chain.append(hash_block(chain[-1] if chain else b"", tokens, seq.cache_salt))
