"""Build the Ray Serve application, and run it for ``loraplex serve --replicas N``.

``build_app(engine_config, server_config, ray_config)`` returns a bound Serve application
(router -> replicas; with ``adapter_affinity``, the replicas' handle routes by
``balancer.AdapterAffinityRouter``) for users who deploy with their own Serve setup, e.g.
``serve.run(build_app(...), route_prefix="/")``; ``app_builder`` is the same for Serve's
CLI and config files (``import_path``). ``serve_on_ray`` is what the CLI runs:
join or start a Ray cluster, start Serve's HTTP proxy on ``--host``/``--port``, deploy,
and wait for SIGTERM or Ctrl-C.

Every replica must reach the same ``state_dir`` (the shared adapter store), the same
``--adapter-root`` and key file, and the model folder: on one machine that is given; on
a cluster, put them on a filesystem every node mounts at the same path.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from loraplex.config import CONFIG_PARTS, EngineConfig, ServerConfig
from loraplex.distributed.balancer import AdapterAffinityRouter
from loraplex.distributed.config import RayServeConfig
from loraplex.distributed.replica import LoraplexReplica
from loraplex.distributed.router import LoraplexRouter
from loraplex.server.launch import for_mode, base_model_id_of, state_dir_of

logger = logging.getLogger(__name__)


def build_app(engine_config: EngineConfig, server_config: ServerConfig,
              ray_config: RayServeConfig | None = None,
              startup_adapters: dict[str, str] | None = None) -> Application:
    """The Serve application: a router deployment in front of the engine replicas. Checks
    what it can before anything is deployed (paths must be the same on every node)."""
    ray_config = ray_config or RayServeConfig()
    startup_adapters = dict(startup_adapters or {})
    for_mode(engine_config, server_config, startup_adapters)  # refuses bad combinations
    for name, path in startup_adapters.items():
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"adapter: {name}={path}: not a folder")
        startup_adapters[name] = str(Path(path).expanduser().resolve())
    # Relative paths would mean something else in each worker's working directory.
    server_config = _absolute_paths(server_config)
    max_adapters = ray_config.max_adapters_per_replica or engine_config.lora.max_cpu_loras
    options = ray_config.deployment_options()
    if ray_config.adapter_affinity:  # else Serve's default router: the adapter-blind baseline
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"slack": ray_config.affinity_slack})
    replica = serve.deployment(LoraplexReplica, name="LoraplexReplica", **options)
    router = serve.deployment(LoraplexRouter, name="LoraplexRouter", num_replicas=1,
                              max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
    replicas = replica.bind(engine_config, server_config, startup_adapters, max_adapters)
    return router.bind(replicas, base_model_id_of(engine_config, server_config),
                       server_config.api_keys, ray_config.adapter_affinity,
                       server_config.max_upload_mib * 2**20)


def app_builder(args: dict[str, Any]) -> Application:
    """For Serve's own tooling: ``serve run loraplex.distributed.app:app_builder
    model=smollm2-135m replicas=2``, or ``import_path`` + ``args`` in a Serve config file.
    Keys are the ``loraplex serve`` flags with underscores (engine, server and Ray Serve
    options); ``adapters`` is ``NAME=PATH,NAME=PATH`` or a mapping. Strings are converted
    to each field's type; an unknown key is an error naming it."""
    options = dict(args)
    adapters = options.pop("adapters", None) or {}
    if isinstance(adapters, str):
        adapters = dict(spec.split("=", 1) for spec in adapters.split(",") if spec)
    parts: dict[type, dict[str, Any]] = {part: {} for part in
                                         (*CONFIG_PARTS.values(), ServerConfig, RayServeConfig)}
    for part, values in parts.items():
        for f in dataclasses.fields(part):
            if f.name in options:
                values[f.name] = _typed(f, options.pop(f.name))
    if options:
        raise ValueError(f"app_builder: unknown option(s) {sorted(options)}")
    engine = EngineConfig(**{name: part(**parts[part]) for name, part in CONFIG_PARTS.items()})
    return build_app(engine, ServerConfig(**parts[ServerConfig]),
                     RayServeConfig(**parts[RayServeConfig]), adapters)


def _typed(f: dataclasses.Field, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind = str(f.type)
    if kind.startswith("bool"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{f.name}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if value.lower() in ("none", "null") and "None" in kind:
        return None
    for name, convert in (("int", int), ("float", float)):
        if kind.startswith(name):
            try:
                return convert(value)
            except ValueError:
                raise ValueError(f"{f.name}: expected {name}, got {value!r}") from None
    return value


def _absolute_paths(config: ServerConfig) -> ServerConfig:
    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else None

    return dataclasses.replace(config, api_keys=absolute(config.api_keys),
                               adapter_root=absolute(config.adapter_root),
                               state_dir=str(state_dir_of(config).resolve()))


def start_serve(ray_config: RayServeConfig, host: str, port: int) -> None:
    """Join (``ray_address``) or start a Ray cluster, and Serve's HTTP proxy on host:port."""
    if not ray.is_initialized():
        ray.init(address=ray_config.ray_address, namespace="loraplex",
                 ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})


def serve_on_ray(engine_config: EngineConfig, server_config: ServerConfig,
                 ray_config: RayServeConfig,
                 startup_adapters: dict[str, str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(engine_config, server_config, ray_config, startup_adapters)
    start_serve(ray_config, server_config.host, server_config.port)
    serve.run(app, name=ray_config.app_name, route_prefix="/")
    logger.info("loraplex on Ray Serve: %d replica(s) at http://%s:%d", ray_config.replicas,
                server_config.host, server_config.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("stopping: replicas drain for up to %.0f s", server_config.drain_seconds)

    def stop_serve() -> None:
        serve.delete(ray_config.app_name)
        serve.shutdown()

    # Bounded: a signal sent to the whole process group (Ctrl-C, `timeout`) also stops
    # the local Ray cluster's own processes, and Serve then waits for them in vain.
    stopper = threading.Thread(target=stop_serve, name="serve-stop", daemon=True)
    stopper.start()
    stopper.join(server_config.drain_seconds + 30)
    if stopper.is_alive():
        logger.warning("Ray Serve did not stop in time; leaving it")
    ray.shutdown()
