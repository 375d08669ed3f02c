"""One engine replica: the single-process server's state and FastAPI app inside a Serve
replica.

``forward`` runs a request the router hands over through the same app
(``server.api.create_app``), so every route, key check and error shape is the single
server's. The adapter a request names arrives as Ray Serve's multiplexed model id;
the replica records it through ``serve.multiplexed`` (bookkeeping: the engine loads the
adapter itself, in the background, when the request arrives). Serve reports which replica
holds which adapter to the router (``balancer.py``), which sends the next request for it
there unless that replica is too busy. The multiplexer's LRU capacity is the replica's
adapter capacity (``max_adapters_per_replica``, default ``max_cpu_loras``).

Every response names the replica (``x-loraplex-replica``) and its engine's adapter loads
so far (``x-loraplex-adapter-loads``): the router keeps per-replica books from them.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve

from loraplex.config import EngineConfig, ServerConfig
from loraplex.distributed.asgi_bridge import RequestHead, ResponseHead, call_asgi
from loraplex.distributed.shared_store import MIN_ORPHAN_AGE_S, SharedAdapterRegistry
from loraplex.lora.registry import AdapterEntry
from loraplex.server.api import create_app
from loraplex.server.launch import build_state, state_dir_of

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraplex-replica"
LOADS_HEADER = "x-loraplex-adapter-loads"


def adapter_key(model: str, tenant: str | None) -> str:
    """The multiplexed model id of ``model`` as ``tenant`` names it: tenants' names are
    scoped, and adapter names never hold '/', so 'tenant/name' is unambiguous."""
    return model if tenant is None else f"{tenant}/{model}"


def split_adapter_key(key: str) -> tuple[str | None, str]:
    tenant, sep, model = key.rpartition("/")
    return (tenant if sep else None), model


class LoraplexReplica:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                 startup_adapters: dict[str, str], max_adapters: int) -> None:
        logging.basicConfig(level=logging.INFO)
        registry = SharedAdapterRegistry(state_dir_of(server_config))
        self.state = build_state(engine_config, server_config, startup_adapters,
                                 registry=registry, min_orphan_age_s=MIN_ORPHAN_AGE_S)
        # Not run through the app's lifespan: the replica lives as long as the actor.
        self.state.engine.start()
        self.app = create_app(self.state)
        # The replica actor's name in Ray (namespace "serve"): the books and tests use it.
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self.drain_seconds = server_config.drain_seconds
        # Wired at run time so the capacity comes from the config, not the class; Serve
        # keeps its LRU on the function object, so it must be a plain function.
        async def load_adapter(key: str) -> AdapterEntry | None:
            return await self._load_adapter(key)

        self.hold_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(
            load_adapter)
        logger.info("replica %s: engine up, adapter capacity %d", self.replica_id, max_adapters)

    async def _load_adapter(self, key: str) -> AdapterEntry | None:
        """Serve's loader for the multiplexed id ``key``: bookkeeping only. Serve loads one
        model at a time per replica under a lock, so loading the adapter here made every
        request for a new adapter wait for all loads before it (p99 TTFT 1.4x the blind
        baseline's in benchmarks/scaleout.py). The engine loads it in the background when
        the request arrives, as on a single server, while the other requests keep running;
        a name that resolves to nothing, or an adapter that fails to load, is answered by
        the request itself with the single server's error."""
        tenant, name = split_adapter_key(key)
        return self.state.adapters.registry.resolve(name, tenant)

    async def forward(self, head: RequestHead, body: bytes) -> AsyncIterator[ResponseHead | bytes]:
        key = serve.get_multiplexed_model_id()
        if key:
            await self.hold_adapter(key)
        cache = self.state.engine.engine.adapters  # its counter, read across threads
        loads = cache.stats.loads if cache is not None else 0
        extra = ((REPLICA_HEADER.encode(), self.replica_id.encode()),
                 (LOADS_HEADER.encode(), str(loads).encode()))
        async for item in call_asgi(self.app, head, body, extra):
            yield item

    def check_health(self) -> None:
        """Serve calls this periodically; a dead engine thread restarts the replica."""
        if not self.state.engine.is_alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread died")

    async def __del__(self) -> None:
        # Serve calls this on a graceful stop: let in-flight requests finish first.
        try:
            await self.state.engine.shutdown(self.drain_seconds)
        except Exception:  # noqa: BLE001 - shutting down; nothing to answer any more
            logger.exception("replica %s: engine shutdown failed", self.replica_id)


__all__ = ["LoraplexReplica", "adapter_key", "split_adapter_key"]
