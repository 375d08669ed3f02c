"""Prometheus metrics, all named ``loraplex:*``, served at ``/metrics``.

Latencies come from the engine's own timestamps, observed on the engine thread after each
step (``ServerMetrics`` is the ``AsyncEngine``'s observer): time to first token, the time
between tokens, queue time and end-to-end latency of every request. Queue depths, KV-cache
use and the adapter cache's counters are read at scrape time from what the engine thread
last published. Request counts per model (base or adapter) and tenant are counted by the
HTTP layer, which knows the tenant.

Every ``ServerMetrics`` has its own registry, so several servers in one process (tests)
keep separate books.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.async_engine import EngineSnapshot
from loraplex.engine.sequence import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                    0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot],
                 num_adapters: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("loraplex:time_to_first_token_seconds",
                              "Arrival to first generated token.", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("loraplex:inter_token_latency_seconds",
                             "Time between two generated tokens of one request.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex:e2e_request_latency_seconds",
                             "Arrival to the last token (or the abort).",
                             buckets=_REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("loraplex:request_queue_time_seconds",
                                    "Arrival to first scheduled.", buckets=_REQUEST_BUCKETS,
                                    registry=r)
        self.prompt_tokens = Counter("loraplex:prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=r)
        self.generation_tokens = Counter("loraplex:generation_tokens", "Generated tokens of "
                                         "finished requests.", registry=r)
        self.finished = Counter("loraplex:request_success", "Finished requests, by reason "
                                "(stop, length, abort, error).", ["finished_reason"], registry=r)
        self.requests = Counter("loraplex:requests", "Requests accepted, by model (the base id "
                                "or an adapter name) and the caller's tenant.",
                                ["model", "tenant"], registry=r)
        self.errors = Counter("loraplex:http_errors", "Error responses, by HTTP status.",
                              ["status"], registry=r)
        r.register(_EngineCollector(snapshot, num_adapters))
        # Per-request state of the observer; only the engine thread touches it.
        self._last_token: dict[str, tuple[float, int]] = {}

    # ---- engine thread ------------------------------------------------------------------

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            num_tokens = len(out.token_ids)
            last = self._last_token.get(out.request_id)
            if last is None and num_tokens:
                if out.metrics.ttft_s is not None:
                    self.ttft.observe(out.metrics.ttft_s)
                if out.metrics.queue_s is not None:
                    self.queue_time.observe(out.metrics.queue_s)
                self._last_token[out.request_id] = (now, num_tokens)
            elif last is not None and num_tokens > last[1]:
                gap = (now - last[0]) / (num_tokens - last[1])
                for _ in range(num_tokens - last[1]):
                    self.itl.observe(gap)
                self._last_token[out.request_id] = (now, num_tokens)
            if out.finished:
                self._last_token.pop(out.request_id, None)
                self.e2e.observe(max(0.0, now - out.metrics.arrival_time))
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.generation_tokens.inc(num_tokens)
                self.finished.labels(out.finish_reason).inc()

    # ---- HTTP layer ---------------------------------------------------------------------

    def count_request(self, model: str, tenant: str | None) -> None:
        self.requests.labels(model, tenant or "").inc()

    def count_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and counters the engine thread keeps, read from its last snapshot."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot],
                 num_adapters: Callable[[], int]) -> None:
        self._snapshot = snapshot
        self._num_adapters = num_adapters

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield GaugeMetricFamily("loraplex:num_requests_running",
                                "Requests in the running batch.", value=s.num_running)
        yield GaugeMetricFamily("loraplex:num_requests_waiting",
                                "Requests waiting to be scheduled.", value=s.num_waiting)
        used = 1 - s.num_free_blocks / s.num_blocks if s.num_blocks else 0.0
        yield GaugeMetricFamily("loraplex:kv_cache_usage_ratio",
                                "Share of KV-cache blocks held by requests.", value=used)
        yield GaugeMetricFamily("loraplex:adapters_registered",
                                "Adapters in the registry (all tenants).",
                                value=self._num_adapters())
        a = s.adapter_stats
        yield CounterMetricFamily("loraplex:adapter_cache_hits", "Adapter activations that "
                                  "found it already in a slot.", value=a.slot_hits)
        yield CounterMetricFamily("loraplex:adapter_cache_misses", "Adapter activations that "
                                  "had to copy it into a slot.", value=a.slot_misses)
        evictions = CounterMetricFamily("loraplex:adapter_cache_evictions",
                                        "Adapters evicted, by tier (slot, host).",
                                        labels=["tier"])
        evictions.add_metric(["slot"], a.slot_evictions)
        evictions.add_metric(["host"], a.host_evictions)
        yield evictions
        yield CounterMetricFamily("loraplex:adapter_loads", "Adapters read and validated "
                                  "from disk.", value=a.loads)
        yield CounterMetricFamily("loraplex:adapter_load_seconds", "Time spent reading and "
                                  "validating adapters from disk.", value=a.load_seconds)
        merges = CounterMetricFamily("loraplex:adapter_runtime_merges", "Adapters merged into "
                                     "or unmerged from the live weights (auto-merge), by "
                                     "action (merge, unmerge).", labels=["action"])
        merges.add_metric(["merge"], a.merges)
        merges.add_metric(["unmerge"], a.unmerges)
        yield merges
        yield from _spec_metrics(s)


def _spec_metrics(s: EngineSnapshot) -> Iterator[Metric]:
    """Speculative decoding per adapter (label "" for the base model)."""
    families = {
        "steps": CounterMetricFamily("loraplex:spec_verify_steps", "Steps that verified "
                                     "draft tokens, by adapter.", labels=["adapter"]),
        "drafts": CounterMetricFamily("loraplex:spec_draft_tokens", "Draft tokens proposed, "
                                      "by adapter.", labels=["adapter"]),
        "accepted": CounterMetricFamily("loraplex:spec_accepted_tokens", "Draft tokens "
                                        "accepted, by adapter.", labels=["adapter"]),
        "rate": GaugeMetricFamily("loraplex:spec_acceptance_rate", "Accepted share of the "
                                  "draft tokens, by adapter.", labels=["adapter"]),
        "length": GaugeMetricFamily("loraplex:spec_mean_accepted_length", "Accepted draft "
                                    "tokens per verification step, by adapter.",
                                    labels=["adapter"]),
    }
    for name, stats in s.spec_stats.items():
        label = [name or ""]
        families["steps"].add_metric(label, stats.num_steps)
        families["drafts"].add_metric(label, stats.num_draft_tokens)
        families["accepted"].add_metric(label, stats.num_accepted_tokens)
        families["rate"].add_metric(label, stats.acceptance_rate or 0.0)
        families["length"].add_metric(label, stats.mean_accepted_length or 0.0)
    yield from families.values()
