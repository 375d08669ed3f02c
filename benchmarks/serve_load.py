"""A bounded load test of ``loraplex serve`` on loopback: many streamed requests over many adapters.

    python benchmarks/serve_load.py [--requests 200] [--concurrency 32] [--adapters 16]
                                    [--max-tokens 32] [--model smollm2-135m] [--dtype auto]

Starts ``loraplex serve`` as a subprocess on 127.0.0.1 (a free port) with N adapters given
on the command line, then sends the requests with the ``openai`` async client, at most
``concurrency`` in flight, round-robin over the adapters, each streamed with
``stream_options.include_usage`` and ``ignore_eos`` so every request must produce exactly
``max_tokens`` tokens. Checks: every request completes with finish_reason ``length`` and
that many tokens, and the server's own counters (``/metrics``) saw every request and every
token; none is lost. Prints TTFT p50/p99 (request sent -> first streamed text, client side),
E2EL p50/p99, throughput (output tokens/s and requests/s over the run) and, last, one
summary line. The whole run is bounded by ``--timeout``; traffic goes to 127.0.0.1 only.

Adapters: one real PEFT adapter (rank 8 on every projection, random lora_B) and copies with
lora_B scaled by 1 + k/100, so each has its own content hash and the engine treats them
as distinct adapters.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

WORDS = ("river mountain lantern harbor violet engine meadow copper signal orchard winter "
         "compass thunder velvet granite falcon whisper canyon ember glacier").split()


def make_adapters(model: str, out: Path, count: int) -> dict[str, str]:
    from safetensors.torch import load_file, save_file

    from demo_adapters import write_adapter
    from loraplex.models.registry import resolve_model

    first = out / "load-0"
    write_adapter(resolve_model(model), first, seed=0, rank=8)
    weights = load_file(first / "adapter_model.safetensors")
    for k in range(1, count):
        folder = out / f"load-{k}"
        folder.mkdir()
        shutil.copy(first / "adapter_config.json", folder)
        scaled = {n: t * (1 + k / 100) if "lora_B" in n else t for n, t in weights.items()}
        save_file(scaled, folder / "adapter_model.safetensors")
    return {f"load-{k}": str(out / f"load-{k}") for k in range(count)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, adapters: dict[str, str], port: int,
                 log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "loraplex", "serve", "--model", args.model,
               "--dtype", args.dtype, "--port", str(port), "--host", "127.0.0.1",
               "--state-dir", str(log.parent / "state"), "--max-queue", "1024"]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve_load: the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    sys.exit("serve_load: the server did not come up in time")


def read_metrics(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            samples[s.name] = samples.get(s.name, 0.0) + s.value  # summed over labels
    return samples


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    first = None
    usage = finish = None
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices:
            if first is None and chunk.choices[0].text:
                first = time.perf_counter()
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    done = time.perf_counter()
    return {"ttft": (first or done) - sent, "e2e": done - sent, "finish": finish,
            "tokens": usage.completion_tokens if usage else None}


async def run_load(url: str, args: argparse.Namespace, models: list[str]) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                timeout=args.timeout)
    rng = random.Random(0)
    prompts = [f"Note {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))
               for i in range(args.requests)]
    gate = asyncio.Semaphore(args.concurrency)

    async def bounded(i: int) -> dict:
        async with gate:
            try:
                return await one_request(client, models[i % len(models)], prompts[i],
                                         args.max_tokens)
            except Exception as e:  # counted as lost below
                return {"error": repr(e)}

    start = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(args.requests))),
                                     timeout=args.timeout)
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--timeout", type=float, default=900, help="Bound on the whole load, s.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    adapters = make_adapters(args.model, work / "adapters", args.adapters)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, adapters, port, work / "server.log")
    try:
        wait_healthy(url, proc, work / "server.log", timeout=300)
        before = read_metrics(url)
        results, wall = asyncio.run(run_load(url, args, list(adapters)))
        after = read_metrics(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r for r in results if r.get("finish") == "length" and r.get("tokens") == args.max_tokens]
    lost = len(results) - len(ok)
    seen = after["loraplex:requests_total"] - before.get("loraplex:requests_total", 0)
    tokens = after["loraplex:generation_tokens_total"] - before.get("loraplex:generation_tokens_total", 0)
    ttft = [r["ttft"] * 1000 for r in ok]
    e2e = [r["e2e"] * 1000 for r in ok]
    print(json.dumps({"requests": args.requests, "completed": len(ok), "lost": lost,
                      "server_requests": seen, "server_tokens": tokens,
                      "errors": [r["error"] for r in results if "error" in r][:3]}))
    if ok:
        print(f"TTFT ms: p50 {percentile(ttft, 50):.0f}  p99 {percentile(ttft, 99):.0f}   "
              f"E2EL ms: p50 {percentile(e2e, 50):.0f}  p99 {percentile(e2e, 99):.0f}")
    good = lost == 0 and seen == args.requests and tokens == args.requests * args.max_tokens
    print(f"serve_load: {len(ok)}/{args.requests} ok ({'none lost' if good else 'FAILED'}), "
          f"{args.adapters} adapters, concurrency {args.concurrency}, {args.max_tokens} tokens "
          f"each, dtype {args.dtype}: TTFT p50 {percentile(ttft, 50) if ttft else float('nan'):.0f} ms"
          f" p99 {percentile(ttft, 99) if ttft else float('nan'):.0f} ms, throughput "
          f"{len(ok) * args.max_tokens / wall:.0f} tok/s ({len(ok) / wall:.1f} req/s)")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
