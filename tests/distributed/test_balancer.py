"""The Serve request router of distributed/balancer.py, without a cluster: fake replicas and
requests, Serve's own queue length cache."""
from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.request_router.common import ReplicaQueueLengthCache  # noqa: E402

from loraplex.distributed.balancer import AdapterAffinityRouter  # noqa: E402


def request(adapter: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=adapter),
                           routing_context=SimpleNamespace(should_backoff=False))


def test_a_burst_chosen_before_any_send_still_overflows_the_holder() -> None:
    """Serve asks for several requests before it sends any, so its queue length cache
    still says 0 for every answer: the router counts its own unsent choices, and a burst
    for one adapter fills the holder only up to the slack (2) before the other replica
    takes the rest. Once Serve reports them sent, they are no longer counted."""
    router = object.__new__(AdapterAffinityRouter)  # Serve's constructor needs a cluster
    router.initialize_state(slack=2)
    router._use_replica_queue_len_cache = True
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    holder = SimpleNamespace(replica_id="holder", max_ongoing_requests=64,
                             multiplexed_model_ids={"gamma"})
    other = SimpleNamespace(replica_id="other", max_ongoing_requests=64, multiplexed_model_ids=set())
    for replica in (holder, other):
        router.replica_queue_len_cache.update(replica.replica_id, 0)
    burst = [request("gamma") for _ in range(8)]

    async def choose_all() -> list[str]:
        ranks = await asyncio.gather(*(router.choose_replicas([holder, other], r) for r in burst))
        return [first[0].replica_id for first, *_ in ranks]

    chosen = Counter(asyncio.run(choose_all()))
    assert chosen["holder"] + chosen["other"] == 8
    assert 0 < chosen["holder"] - chosen["other"] <= 2 + 1, chosen
    for r, replica_id in zip(burst, chosen.elements()):
        router.on_request_routed(r, replica_id, None)
    assert router._unsent == {}
