"""Scale-out on Ray Serve: adapter-affinity routing against adapter-blind routing.

    python benchmarks/scaleout.py [--replicas 2] [--adapters 16] [--requests 64]
                                  [--rounds 4] [--concurrency 16] [--max-tokens 16]
                                  [--affinity-slack 4] [--model smollm2-135m]
                                  [--dtype auto]

Starts a local Ray cluster (loopback only) and deploys two Serve applications side by
side, each ``--replicas`` engine replicas behind loraplex's router: ``affinity`` (requests
carry their adapter as Serve's multiplexed model id, and loraplex's bounded-load balancer
sends each to a replica holding its adapter unless that replica is more than
``--affinity-slack`` requests busier than the idlest) and ``blind`` (no id: Ray Serve's
default power-of-two-choices balancing, which spreads every adapter over every replica,
like round-robin). Each replica holds
``--adapters / --replicas`` adapters in host memory (``max_cpu_loras``, and the affinity
capacity), so together they fit all adapters once, not twice.

Traffic is skewed (Zipf, s = 1.1: the hottest adapter takes about 30 %), streamed, with
``ignore_eos`` so every request makes exactly ``--max-tokens`` tokens. Rounds alternate
between the two applications (A B, B A, ...) with the same requests, so both see the
same machine. Adapters are registered once through the API into each application's
shared store, then each is requested once per mode (untimed) so first loads stay out.
Reported per mode: adapter loads from disk during the rounds (the replicas' own counters,
as the router's per-replica books show them), TTFT p50/p99
(request sent -> first streamed text, client side), and the median over rounds of the
affinity/blind p99 TTFT ratio. Every request must complete. One summary line last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import free_port, make_adapters, one_request, percentile  # noqa: E402

MODES = ("affinity", "blind")


def zipf_models(models: list[str], count: int, seed: int, s: float = 1.1) -> list[str]:
    weights = [1 / (rank + 1) ** s for rank in range(len(models))]
    return random.Random(seed).choices(models, weights=weights, k=count)


def deploy(args: argparse.Namespace, adapters: dict[str, str], work: Path) -> None:
    from ray import serve

    from loraplex.config import EngineConfig, ServerConfig
    from loraplex.distributed import build_app
    from loraplex.distributed.config import RayServeConfig

    per_replica = max(1, -(-args.adapters // args.replicas))
    engine = EngineConfig.from_flat(model=args.model, dtype=args.dtype, num_threads=1,
                                    kv_cache_gib=0.25, max_loras=min(8, per_replica),
                                    max_cpu_loras=per_replica, max_lora_rank=8)
    for mode in MODES:
        server = ServerConfig(state_dir=str(work / f"state-{mode}"), max_queue=4096,
                              adapter_root=str(work / "adapters"))
        ray_config = RayServeConfig(replicas=args.replicas, adapter_affinity=mode == "affinity",
                                    max_ongoing_requests=args.max_ongoing, app_name=mode,
                                    affinity_slack=args.affinity_slack,
                                    max_adapters_per_replica=per_replica)
        serve.run(build_app(engine, server, ray_config), name=mode, route_prefix=f"/{mode}")


def register(url: str, adapters: dict[str, str]) -> None:
    """Into the application's shared registry, through the API, once (not per replica)."""
    import httpx

    for name, path in adapters.items():
        response = httpx.post(url + "/v1/load_lora_adapter",
                              json={"lora_name": name, "lora_path": path}, timeout=120)
        response.raise_for_status()


def total_loads(url: str) -> int:
    import httpx

    books = httpx.get(url + "/v1/replicas", timeout=30).json()["data"]
    return sum(row["adapter_loads"] for row in books)


async def run_round(url: str, models: list[str], prompts: list[str], args: argparse.Namespace
                    ) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                timeout=args.timeout)
    gate = asyncio.Semaphore(args.concurrency)

    async def bounded(model: str, prompt: str) -> dict:
        async with gate:
            try:
                return await one_request(client, model, prompt, args.max_tokens)
            except Exception as e:  # counted as lost below
                return {"error": repr(e)}

    async with client:  # closed on this event loop (each round runs its own)
        return await asyncio.wait_for(asyncio.gather(*(bounded(m, p) for m, p in
                                                       zip(models, prompts))),
                                      timeout=args.timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="Per round and mode.")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-ongoing", type=int, default=8,
                        help="Requests Serve sends one replica at once; past it, affinity "
                        "spills to another replica.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--affinity-slack", type=int, default=4,
                        help="Bounded-load affinity: queue excess a holder may have over "
                        "the idlest replica before requests overflow.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--timeout", type=float, default=900, help="Bound on one round, s.")
    args = parser.parse_args()

    import ray
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="scaleout-"))
    adapters = make_adapters(args.model, work / "adapters", args.adapters)
    port = free_port()
    ray.init(num_cpus=2 * args.replicas, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    p99_ratios: list[float] = []
    loads = {mode: 0 for mode in MODES}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(args, adapters, work)
        urls = {mode: f"http://127.0.0.1:{port}/{mode}" for mode in MODES}
        for mode in MODES:  # every adapter once per mode, untimed: first loads stay out
            register(urls[mode], adapters)
            asyncio.run(run_round(urls[mode], list(adapters), ["Warm up."] * len(adapters), args))
        time.sleep(1)
        baseline = {mode: total_loads(urls[mode]) for mode in MODES}
        rng = random.Random(1)
        for r in range(args.rounds):
            models = zipf_models(list(adapters), args.requests, seed=r)
            prompts = [f"Round {r} note {i}: " + " ".join(rng.choices("river mountain lantern "
                       "harbor violet engine meadow copper signal orchard".split(), k=12))
                       for i in range(args.requests)]
            p99 = {}
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                out = asyncio.run(run_round(urls[mode], models, prompts, args))
                results[mode] += out
                ttfts = [o["ttft"] for o in out if "ttft" in o]
                p99[mode] = percentile(ttfts, 99) if ttfts else float("nan")
            p99_ratios.append(p99["affinity"] / p99["blind"])
            print(f"round {r}: p99 TTFT affinity {p99['affinity'] * 1000:.0f} ms, blind "
                  f"{p99['blind'] * 1000:.0f} ms", flush=True)
        time.sleep(1)
        loads = {mode: total_loads(urls[mode]) - baseline[mode] for mode in MODES}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    lost = {m: sum(1 for o in results[m] if o.get("finish") != "length"
                   or o.get("tokens") != args.max_tokens) for m in MODES}
    ttft = {m: [o["ttft"] * 1000 for o in results[m] if "ttft" in o] for m in MODES}
    summary = {m: {"requests": len(results[m]), "lost": lost[m], "adapter_loads": loads[m],
                   "ttft_p50_ms": round(percentile(ttft[m], 50), 1) if ttft[m] else None,
                   "ttft_p99_ms": round(percentile(ttft[m], 99), 1) if ttft[m] else None}
               for m in MODES}
    print(json.dumps(summary))
    errors = [o["error"] for m in MODES for o in results[m] if "error" in o][:3]
    if errors:
        print("errors:", errors)
    ratio = statistics.median(p99_ratios)
    fewer_loads = loads["affinity"] < loads["blind"]
    ok = not any(lost.values()) and fewer_loads and ratio <= 1.05
    a, b = summary["affinity"], summary["blind"]
    print(f"scaleout: {args.replicas} replicas, {args.adapters} adapters (Zipf 1.1), "
          f"{args.rounds}x{args.requests} requests per mode, concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens, dtype {args.dtype}, affinity slack "
          f"{args.affinity_slack}: adapter loads affinity "
          f"{loads['affinity']} vs blind {loads['blind']}; TTFT p50 {a['ttft_p50_ms']} vs {b['ttft_p50_ms']} ms, "
          f"p99 {a['ttft_p99_ms']} vs {b['ttft_p99_ms']} ms (median round p99 ratio "
          f"{ratio:.2f}, target <= 1.05); lost {lost['affinity'] + lost['blind']}: "
          f"{'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
