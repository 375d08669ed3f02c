"""The async streaming client of ``loraplex bench``: send the workload, time every token.

Each request is one streamed POST (``stream: true``, ``stream_options.include_usage``) read
with httpx as server-sent events. Times are ``time.perf_counter`` on the client:

- TTFT: request sent -> first chunk carrying generated text.
- ITL: every gap between two consecutive chunks carrying text (a chunk may hold more than
  one token when the server holds text back, e.g. half a UTF-8 character).
- E2EL: request sent -> the end of the stream.
- output tokens: the server's ``usage.completion_tokens`` (the count, not the chunks).

Any failure (HTTP status, an error event mid-stream, a connection error, a timeout, a
stream without usage) makes the request failed with its reason; nothing is dropped.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from loraplex.bench.workload import BenchRequest, arrival_gaps


@dataclass(slots=True)
class RequestResult:
    index: int
    model: str
    success: bool = False
    error: str | None = None
    status_code: int | None = None
    expected_prompt_tokens: int | None = None
    prompt_tokens: int | None = None  # the server's usage
    output_tokens: int | None = None  # the server's usage
    max_tokens: int = 0
    finish_reason: str | None = None
    start_s: float = 0.0  # sent, seconds after the run began
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1); None with fewer than two tokens."""
        if not self.success or self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    url: str
    api_key: str | None = None
    endpoint: str = "completions"
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected http://HOST:PORT, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout_s}")

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": request.model, "stream": True, "max_tokens": request.max_tokens,
                                "stream_options": {"include_usage": True},
                                "temperature": self.temperature}
        if self.ignore_eos:
            body["ignore_eos"] = True
        body["messages" if self.endpoint == "chat" else "prompt"] = request.prompt
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


async def send_one(http: Any, options: ClientOptions, request: BenchRequest,
                   run_start: float) -> RequestResult:
    result = RequestResult(request.index, request.model, max_tokens=request.max_tokens,
                           expected_prompt_tokens=request.num_prompt_tokens)
    sent = time.perf_counter()
    result.start_s = sent - run_start
    usage = None
    last_token_time = None
    try:
        async with http.stream("POST", options.path, json=options.body(request)) as response:
            result.status_code = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_error_message(text)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {_error_message(data)}"
                    return result
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if result.ttft_s is None:
                        result.ttft_s = now - sent
                    else:
                        result.itl_s.append(now - last_token_time)
                    last_token_time = now
                for choice in chunk.get("choices") or []:
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as e:  # connection refused, reset, timeout, bad JSON: a failed request
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return result
    result.e2el_s = time.perf_counter() - sent
    if usage is None:
        result.error = "the stream ended without usage (stream_options.include_usage)"
        return result
    result.prompt_tokens = usage.get("prompt_tokens")
    result.output_tokens = usage.get("completion_tokens")
    if result.ttft_s is None:  # tokens without text (all special): first token = the end
        result.ttft_s = result.e2el_s
    result.success = True
    return result


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def run_requests(options: ClientOptions, requests: list[BenchRequest],
                       request_rate: float, max_concurrency: int | None, seed: int,
                       progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send every request (Poisson arrivals at ``request_rate``, at most ``max_concurrency``
    in flight); returns the results in request order and the run's wall time."""
    import httpx
    from tqdm import tqdm

    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
    # The pool must not queue requests on the client, or TTFT would include that wait.
    limit = max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    gate = asyncio.Semaphore(limit)
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
    async with httpx.AsyncClient(base_url=options.url.rstrip("/"), headers=options.headers,
                                 timeout=httpx.Timeout(options.timeout_s), limits=limits) as http:
        async def bounded(request: BenchRequest) -> RequestResult:
            async with gate:
                result = await send_one(http, options, request, start)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, arrival_gaps(len(requests), request_rate, seed)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(bounded(request)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    bar.close()
    return list(results), wall
