"""Scale-out settings (``loraplex serve --replicas N``): a frozen dataclass, no Ray import.

The CLI builds its flags from these fields, as it does for the engine and server configs,
so this module must stay importable without the ``ray`` extra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class RayServeConfig:
    replicas: int = _help("Engine replicas behind one endpoint; more than 1 (or a "
                          "--ray-address) serves on Ray Serve. With autoscaling, the "
                          "initial number.", default=1)
    ray_address: str | None = _help("Ray cluster to join: 'auto' (a running local cluster "
                                    "from `ray start`) or ADDRESS (head:6379 or "
                                    "ray://head:10001); default: start a local one.",
                                    default=None)
    min_replicas: int | None = _help("Autoscaling: fewest replicas (set it or "
                                     "--max-replicas to turn autoscaling on).", default=None)
    max_replicas: int | None = _help("Autoscaling: most replicas.", default=None)
    target_ongoing_requests: float = _help("Autoscaling: ongoing requests per replica the "
                                           "autoscaler aims for.", default=8.0)
    max_ongoing_requests: int = _help("Requests Ray Serve sends one replica at once (the "
                                      "engine batches them); the rest queue in the router.",
                                      default=64)
    max_queued_requests: int = _help("Requests the router may hold waiting for a replica; "
                                     "past it, 503 with Retry-After (-1 = no limit).",
                                     default=512)
    max_adapters_per_replica: int | None = _help("Adapters one replica holds for affinity "
                                                 "routing (LRU); default --max-cpu-loras.",
                                                 default=None)
    adapter_affinity: bool = _help("Route a request to a replica that already holds its "
                                   "adapter, within --affinity-slack of the least-loaded "
                                   "one; off: Ray Serve's default load balancing, blind to "
                                   "adapters.", default=True)
    affinity_slack: int = _help("Affinity's bound on load: a request goes to a replica "
                                "holding its adapter only while that replica's queue is at "
                                "most this many requests longer than the shortest; past "
                                "it, to the least-loaded replica, which loads the adapter "
                                "too. 4 measured best in benchmarks/scaleout.py (2 "
                                "replicas, concurrency 16).", default=4)
    replica_num_cpus: float = _help("CPUs Ray reserves for each replica.", default=1.0)
    app_name: str = _help("Ray Serve application name.", default="loraplex")

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")
        if self.min_replicas is not None and self.min_replicas < 0:
            raise ValueError(f"min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError(f"max_replicas: must be >= 1, got {self.max_replicas}")
        low, high = self.min_replicas or 0, self.max_replicas
        if high is not None and not low <= self.replicas <= high:
            raise ValueError(f"replicas: the initial {self.replicas} must lie within "
                             f"min_replicas..max_replicas ({low}..{high})")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests: must be > 0, got "
                             f"{self.target_ongoing_requests}")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ValueError(f"max_queued_requests: must be >= 1 or -1, got "
                             f"{self.max_queued_requests}")
        if self.max_adapters_per_replica is not None and self.max_adapters_per_replica < 1:
            raise ValueError(f"max_adapters_per_replica: must be >= 1, got "
                             f"{self.max_adapters_per_replica}")
        if self.affinity_slack < 0:
            raise ValueError(f"affinity_slack: must be >= 0, got {self.affinity_slack}")
        if self.replica_num_cpus < 0:
            raise ValueError(f"replica_num_cpus: must be >= 0, got {self.replica_num_cpus}")
        if not self.app_name:
            raise ValueError("app_name: must not be empty")

    @property
    def is_distributed(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None or self.is_autoscaling

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def deployment_options(self) -> dict[str, Any]:
        """Ray Serve options of the replica deployment."""
        options: dict[str, Any] = dict(max_ongoing_requests=self.max_ongoing_requests,
                                       max_queued_requests=self.max_queued_requests,
                                       ray_actor_options={"num_cpus": self.replica_num_cpus})
        if self.is_autoscaling:
            options["autoscaling_config"] = dict(
                min_replicas=self.min_replicas if self.min_replicas is not None else 1,
                max_replicas=self.max_replicas if self.max_replicas is not None else self.replicas,
                initial_replicas=self.replicas,
                target_ongoing_requests=self.target_ongoing_requests)
        else:
            options["num_replicas"] = self.replicas
        return options
