"""The bounded-load affinity decision, without Ray: crafted queue lengths and holders."""
from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from loraplex.distributed.affinity import Reason, ReplicaLoad, choose_replica
from loraplex.distributed.config import RayServeConfig


def loads(*queue_lens: int, max_ongoing: int = 8,
          num_adapters: tuple[int, ...] | None = None) -> list[ReplicaLoad]:
    """Replicas "r0", "r1", ... with these queue lengths."""
    held = num_adapters or (0,) * len(queue_lens)
    return [ReplicaLoad(f"r{i}", q, max_ongoing, n) for i, (q, n) in
            enumerate(zip(queue_lens, held))]


def test_holder_is_chosen_while_within_slack() -> None:
    # r1 holds X and is 2 requests busier than the idlest (r0): slack 2 still allows it.
    choice = choose_replica(loads(3, 5, 4), "X", {"r1"}, slack=2)
    assert (choice.replica_id, choice.reason) == ("r1", Reason.HOLDER)
    # Light load, equal queues: always the holder, never a new load.
    for seed in range(20):
        choice = choose_replica(loads(0, 0, 0), "X", {"r2"}, slack=0, rng=random.Random(seed))
        assert (choice.replica_id, choice.reason) == ("r2", Reason.HOLDER)


def test_busy_holder_overflows_to_the_least_loaded() -> None:
    # 3 requests busier than r0 with slack 2: r0 takes it (and will load X).
    choice = choose_replica(loads(3, 6, 4), "X", {"r1"}, slack=2)
    assert (choice.replica_id, choice.reason) == ("r0", Reason.OVERFLOW)
    # The same queues with a larger slack keep the holder.
    assert choose_replica(loads(3, 6, 4), "X", {"r1"}, slack=3).replica_id == "r1"


def test_among_holders_the_shortest_queue_wins() -> None:
    # Once a hot adapter lives on two replicas, its traffic goes to the less busy one.
    choice = choose_replica(loads(5, 7, 2), "X", {"r1", "r2"}, slack=0)
    assert (choice.replica_id, choice.reason) == ("r2", Reason.HOLDER)
    # The slack is measured from the best holder, not the busiest one.
    choice = choose_replica(loads(1, 7, 2), "X", {"r1", "r2"}, slack=1)
    assert (choice.replica_id, choice.reason) == ("r2", Reason.HOLDER)


def test_full_replicas_are_skipped() -> None:
    # The holder r1 is full (8 of 8): X goes elsewhere even though slack would allow r1.
    choice = choose_replica(loads(7, 8, max_ongoing=8), "X", {"r1"}, slack=100)
    assert (choice.replica_id, choice.reason) == ("r0", Reason.UNHELD)
    assert choose_replica(loads(8, 9, max_ongoing=8), "X", {"r1"}, slack=2) is None
    assert choose_replica(loads(8, 8, max_ongoing=8), None, set(), slack=2) is None


def test_unheld_adapter_goes_to_the_least_loaded_with_most_room() -> None:
    choice = choose_replica(loads(4, 2, 3), "Y", set(), slack=2)
    assert (choice.replica_id, choice.reason) == ("r1", Reason.UNHELD)
    # Equal queues: the replica holding fewer adapters (its load evicts least).
    choice = choose_replica(loads(2, 2, 2, num_adapters=(5, 1, 3)), "Y", {"gone"}, slack=2)
    assert (choice.replica_id, choice.reason) == ("r1", Reason.UNHELD)


def test_base_requests_spread_and_prefer_the_less_loaded() -> None:
    rng = random.Random(0)
    picked = Counter(choose_replica(loads(0, 0), None, set(), slack=2, rng=rng).replica_id
                     for _ in range(200))
    assert set(picked) == {"r0", "r1"} and min(picked.values()) > 60, picked
    for _ in range(20):  # of two, the shorter queue always wins
        choice = choose_replica(loads(3, 1), None, set(), slack=2, rng=rng)
        assert (choice.replica_id, choice.reason) == ("r1", Reason.SPREAD)
    # Power of two choices over four: the busiest is never chosen, all others are.
    picked = Counter(choose_replica(loads(0, 0, 0, 5), None, set(), slack=2,
                                    rng=rng).replica_id for _ in range(300))
    assert "r3" not in picked and set(picked) == {"r0", "r1", "r2"}, picked


def test_a_hot_adapter_ends_up_on_both_replicas() -> None:
    """Simulated: 2 replicas, requests for one adapter arrive and never finish, as under a
    burst. Affinity fills the holder to the slack, then the other replica takes over and
    becomes a holder too; from then on both share the adapter's queue evenly."""
    queue = {"r0": 0, "r1": 0}
    holders = {"r0"}
    rng = random.Random(1)
    for _ in range(12):
        current = [ReplicaLoad(r, q, 64) for r, q in queue.items()]
        choice = choose_replica(current, "hot", holders, slack=2, rng=rng)
        queue[choice.replica_id] += 1
        holders.add(choice.replica_id)
    assert holders == {"r0", "r1"}
    assert abs(queue["r0"] - queue["r1"]) <= 2, queue


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="^slack: must be >= 0, got -1"):
        choose_replica(loads(0), "X", set(), slack=-1)
    with pytest.raises(ValueError, match="^queue_len: must be >= 0, got -2"):
        ReplicaLoad("r0", -2, 8)
    with pytest.raises(ValueError, match="^affinity_slack: must be >= 0, got -1"):
        RayServeConfig(affinity_slack=-1)
    assert RayServeConfig().affinity_slack == 4


def test_the_decision_and_config_do_not_import_ray() -> None:
    code = ("import sys, loraplex.distributed.affinity, loraplex.distributed.config, "
            "loraplex.cli; sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
