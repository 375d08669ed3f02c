"""Ray Serve request router for the replica deployment: bounded-load adapter affinity.

Serve calls ``choose_replicas`` once per routing attempt. We gather what the decision in
``affinity.py`` needs and return the replica it picks, with the rest as a fallback rank:

- queue lengths from Serve's per-handle cache (kept up to date by the handle itself: +1
  on send, -1 on completion, and the replica's own count when it answers); a missing or
  stale entry, or one that says "full", is probed on the replica (as Serve's default
  router does, so a full replica that drained is seen again);
- plus the requests this router chose a replica for and Serve has not sent yet: Serve
  asks for several requests at once, and each answer would otherwise see the queues
  before the others' sends (a burst of 8 for one adapter once went whole to its holder);
- holders of the adapter from each replica's reported multiplexed model ids, plus the
  replicas a request for it was routed to in the last ``RECENT_HOLDER_S``: a replica
  reports a new adapter only a moment after loading starts, and until then a burst for
  that adapter would otherwise scatter over every replica.

It needs the ``ray`` extra; ``app.py`` names it in the replica deployment's
``request_router_config`` when ``adapter_affinity`` is on. With it off, Serve's default
router (power of two choices, blind to adapters) stays: the benchmark's baseline.
"""
from __future__ import annotations

import logging
import random
import time
from collections import defaultdict

from ray.serve.request_router import (PendingRequest, ReplicaID, ReplicaResult,
                                      RequestRouter, RunningReplica)

from loraplex.distributed.affinity import ReplicaLoad, choose_replica

logger = logging.getLogger(__name__)

RECENT_HOLDER_S = 2.0  # longer than Serve takes to report a load (0.1 s push + long poll)
UNSENT_S = 1.0  # a choice Serve has not confirmed as sent by then is no longer counted


class AdapterAffinityRouter(RequestRouter):
    """Not a subclass of FIFOMixin on purpose: the replica chosen for a request must serve
    that request, not the oldest waiting one (which may name another adapter)."""

    slack: int = 4  # replaced by initialize_state (RayServeConfig.affinity_slack)

    def initialize_state(self, slack: int = 4) -> None:
        """Serve calls this with the deployment's ``request_router_kwargs``."""
        if slack < 0:
            raise ValueError(f"affinity_slack: must be >= 0, got {slack}")
        self.slack = slack
        self._rng = random.Random()
        # adapter id -> replica -> when a request for it was last routed there
        self._recently_routed: defaultdict[str, dict[ReplicaID, float]] = defaultdict(dict)
        # id(pending request) -> (the replica chosen for it, when), until Serve sends it
        self._unsent: dict[int, tuple[ReplicaID, float]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Without it Serve retries at once, in a busy loop, when every replica is full.
            pending_request.routing_context.should_backoff = True
        adapter_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        queue_lens = await self._queue_lens(candidate_replicas)
        unsent = self._unsent_counts(pending_request)
        loads = [ReplicaLoad(r.replica_id, queue_lens[r.replica_id] + unsent[r.replica_id],
                             r.max_ongoing_requests, len(r.multiplexed_model_ids))
                 for r in candidate_replicas if r.replica_id in queue_lens]
        holders = ({r.replica_id for r in candidate_replicas
                    if adapter_id in r.multiplexed_model_ids} | self._recent_holders(adapter_id)
                   if adapter_id else set())
        choice = choose_replica(loads, adapter_id or None, holders, self.slack, self._rng)
        if choice is None:
            return []  # every replica full or silent: Serve backs off and asks again
        logger.debug("request for %r -> %s (%s)", adapter_id or "base", choice.replica_id,
                     choice.reason.value)
        if pending_request is not None:
            self._unsent[id(pending_request)] = (choice.replica_id, time.monotonic())
        chosen = [r for r in candidate_replicas if r.replica_id == choice.replica_id]
        rest = [r for r in candidate_replicas if r.replica_id != choice.replica_id]
        # If the chosen one turns out full by the time Serve sends, the least loaded of
        # the rest takes the request rather than waiting.
        return [chosen, rest] if rest else [chosen]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        self._unsent.pop(id(pending_request), None)  # sent: the queue length cache has it
        adapter_id = pending_request.metadata.multiplexed_model_id
        if adapter_id:
            self._recently_routed[adapter_id][replica_id] = time.monotonic()

    def _unsent_counts(self, pending_request: PendingRequest | None) -> defaultdict[ReplicaID, int]:
        """Per replica, the requests chosen for it and not sent yet, ``pending_request``
        aside (a retry of it is chosen anew); older choices than UNSENT_S are dropped."""
        now = time.monotonic()
        for key in [k for k, (_, at) in self._unsent.items() if now - at > UNSENT_S]:
            del self._unsent[key]
        counts: defaultdict[ReplicaID, int] = defaultdict(int)
        for key, (replica_id, _) in self._unsent.items():
            if pending_request is None or key != id(pending_request):
                counts[replica_id] += 1
        return counts

    def _recent_holders(self, adapter_id: str) -> set[ReplicaID]:
        routed = self._recently_routed.get(adapter_id)
        if not routed:
            return set()
        now = time.monotonic()
        for replica_id in [r for r, at in routed.items() if now - at > RECENT_HOLDER_S]:
            del routed[replica_id]
        return set(routed)

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Requests ongoing at each replica; a replica that does not answer the probe in
        time is left out of this attempt."""
        known: dict[ReplicaID, int] = {}
        to_probe: list[RunningReplica] = []
        for replica in replicas:
            # Without the handle's cache (Ray client), entries come from probes alone and
            # go stale: probe every time.
            queue_len = (self.replica_queue_len_cache.get(replica.replica_id)
                         if self._use_replica_queue_len_cache else None)
            if queue_len is None or queue_len >= replica.max_ongoing_requests:
                to_probe.append(replica)
            else:
                known[replica.replica_id] = queue_len
        if to_probe:
            # Serve's own probe: it updates the cache and drops replicas that died.
            for replica, queue_len in await self._probe_queue_lens(to_probe, 0):
                if queue_len is not None:
                    known[replica.replica_id] = queue_len
        return known
