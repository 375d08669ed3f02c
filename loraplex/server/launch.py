"""Build a server from its configs and run it under uvicorn, with a graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops accepting connections and new requests (503),
lets in-flight requests finish for up to ``drain_seconds``, aborts the rest, stops the
engine thread and exits with status 0.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import uvicorn

from loraplex.config import EngineConfig, ServerConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import LLMEngine
from loraplex.lora.registry import AdapterRegistry
from loraplex.models.registry import loraplex_home
from loraplex.server.adapters import AdapterService
from loraplex.server.api import ServerState, create_app
from loraplex.server.auth import ApiKeys
from loraplex.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def state_dir_of(config: ServerConfig) -> Path:
    return Path(config.state_dir).expanduser() if config.state_dir else loraplex_home() / "server"


def build_state(engine_config: EngineConfig, config: ServerConfig,
                startup_adapters: dict[str, str] | None = None,
                engine: LLMEngine | None = None) -> ServerState:
    """Check everything cheap (keys, registry, adapter root) before the model loads."""
    engine_config = _for_mode(engine_config, config, startup_adapters)
    auth = ApiKeys.from_file(config.api_keys) if config.api_keys else ApiKeys.open()
    adapter_root = Path(config.adapter_root).expanduser() if config.adapter_root else None
    if adapter_root is not None and not adapter_root.is_dir():
        raise ValueError(f"adapter_root: {config.adapter_root!r} is not a folder")
    for name, path in (startup_adapters or {}).items():
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"adapter: {name}={path}: not a folder")
    state_dir = state_dir_of(config)
    registry = AdapterRegistry(state_dir)
    engine = engine or LLMEngine(engine_config)
    async_engine = AsyncEngine(engine, config.max_queue)
    metrics = ServerMetrics(lambda: async_engine.snapshot, lambda: len(registry.all()))
    async_engine.observer = metrics
    base_model_id = config.served_model_name or (
        Path(engine_config.model.merge).name if config.mode == "dedicated"
        else engine_config.model.model)
    adapters = AdapterService(registry, async_engine, base_model_id, adapter_root,
                              state_dir / "uploads", config.max_upload_mib * 2**20)
    adapters.register_startup(startup_adapters or {})
    return ServerState(engine=async_engine, adapters=adapters, auth=auth, metrics=metrics,
                       config=config, base_model_id=base_model_id, created=int(time.time()))


def _for_mode(engine_config: EngineConfig, config: ServerConfig,
              startup_adapters: dict[str, str] | None) -> EngineConfig:
    """shared: a base and many unmerged adapters. dedicated: one adapter merged into the
    weights at load, served at base speed under its own name, and nothing else."""
    merge = engine_config.model.merge
    if config.mode == "shared":
        if merge is not None:
            raise ValueError("merge: a merged adapter is served with --mode dedicated")
        return engine_config
    if merge is None:
        raise ValueError("mode: 'dedicated' serves one merged adapter: give it with --merge PATH")
    if startup_adapters:
        raise ValueError("adapter: --mode dedicated serves only the --merge adapter")
    if not Path(merge).expanduser().is_dir():
        raise ValueError(f"merge: {merge!r} is not a folder")
    lora = dataclasses.replace(engine_config.lora, max_loras=0, auto_merge=False)
    return dataclasses.replace(engine_config, lora=lora)


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: the engine refuses new requests from the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.loraplex_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.loraplex_state.engine.is_accepting = False
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, so the process ends as
        # killed by it; a server that drained cleanly exits with status 0 instead.
        getattr(self, "_captured_signals", []).clear()


def uvicorn_config(state: ServerState, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = dict(host=state.config.host, port=state.config.port,
                                   timeout_graceful_shutdown=state.config.drain_seconds,
                                   log_level="info", access_log=False)
    options.update(overrides)
    return uvicorn.Config(create_app(state), **options)


def serve(engine_config: EngineConfig, config: ServerConfig,
          startup_adapters: dict[str, str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = build_state(engine_config, config, startup_adapters)
    server = DrainingServer(uvicorn_config(state), state)
    server.run()
    if not server.started:
        raise ValueError("the server did not start; the log above says why")
