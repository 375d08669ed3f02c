"""Bounded-load adapter affinity: which replica a request goes to. Plain Python, no Ray.

Sending every request for adapter X to the replica that holds X saves loads, but under
skewed traffic the hot adapters pile up on their holders while other replicas idle, and
time to first token grows with the holder's queue. The bound: a holder is chosen only
while its queue is at most ``slack`` requests longer than the shortest queue of all
replicas; past that the request overflows to the least-loaded replica, which loads X, so
a hot adapter ends up on several replicas and its traffic then spreads among them.

``choose_replica`` is the whole decision; ``balancer.py`` feeds it Ray Serve's view of
the replicas (queue lengths, the adapters each one reported holding).
"""
from __future__ import annotations

import random
from collections.abc import Hashable, Sequence, Set
from dataclasses import dataclass
from enum import Enum

class Reason(str, Enum):
    """Why a replica was chosen (tests check it; it explains a decision in a log)."""

    HOLDER = "holder"      # holds the adapter, queue within slack of the shortest
    OVERFLOW = "overflow"  # a holder exists but is too busy: least-loaded replica instead
    UNHELD = "unheld"      # no available replica holds the adapter: least-loaded replica
    SPREAD = "spread"      # base model or no adapter: less loaded of two random replicas


@dataclass(frozen=True)
class ReplicaLoad:
    """What the balancer knows of one replica when a request arrives."""

    replica_id: Hashable
    queue_len: int       # requests sent to it and not finished (running + waiting there)
    max_ongoing: int     # past it the replica refuses requests (Serve's max_ongoing_requests)
    num_adapters: int = 0  # adapters it holds; fewer wins a tie (keeps the sets even)

    def __post_init__(self) -> None:
        if self.queue_len < 0:
            raise ValueError(f"queue_len: must be >= 0, got {self.queue_len}")
        if self.max_ongoing < 1:
            raise ValueError(f"max_ongoing: must be >= 1, got {self.max_ongoing}")

    @property
    def is_full(self) -> bool:
        return self.queue_len >= self.max_ongoing


@dataclass(frozen=True)
class Choice:
    replica_id: Hashable
    reason: Reason


def choose_replica(loads: Sequence[ReplicaLoad], adapter_id: str | None,
                   holder_ids: Set[Hashable], slack: int,
                   rng: random.Random | None = None) -> Choice | None:
    """The replica for a request naming ``adapter_id`` (None: the base model or no
    affinity), given which replicas hold it. None when every replica is full: the caller
    waits and asks again. Ties are broken at random so equal replicas share the work."""
    if slack < 0:
        raise ValueError(f"slack: must be >= 0, got {slack}")
    rng = rng or random.Random()
    available = [load for load in loads if not load.is_full]
    if not available:
        return None
    if adapter_id is None:
        pair = rng.sample(available, min(2, len(available)))
        return Choice(_least_loaded(pair, rng).replica_id, Reason.SPREAD)
    holders = [load for load in available if load.replica_id in holder_ids]
    least = _least_loaded(available, rng)
    if not holders:
        return Choice(least.replica_id, Reason.UNHELD)
    best_holder = _shortest(holders, rng)
    if best_holder.queue_len - least.queue_len <= slack:
        return Choice(best_holder.replica_id, Reason.HOLDER)
    return Choice(least.replica_id, Reason.OVERFLOW)


def _shortest(loads: Sequence[ReplicaLoad], rng: random.Random) -> ReplicaLoad:
    shortest = min(load.queue_len for load in loads)
    return rng.choice([load for load in loads if load.queue_len == shortest])


def _least_loaded(loads: Sequence[ReplicaLoad], rng: random.Random) -> ReplicaLoad:
    """Shortest queue; among equals, the one holding fewest adapters (it has the most
    room, so a load there evicts least), then at random."""
    best = min((load.queue_len, load.num_adapters) for load in loads)
    return rng.choice([load for load in loads if (load.queue_len, load.num_adapters) == best])
