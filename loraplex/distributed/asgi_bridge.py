"""Run one forwarded HTTP request through an ASGI app inside a replica, streaming back.

The router receives the HTTP request and hands it to a replica through a Ray Serve
handle (which is what lets it choose the replica); the replica then runs it through the
very same FastAPI app the single-process server uses, so routes, auth, validation and
error shapes are that server's. ``call_asgi`` yields the response head first, then the
body chunks as the app sends them (server-sent events stay streamed).

When the caller stops iterating (its client went away, the router cancelled), the app
sees ``http.disconnect`` and aborts the request in the engine, as under uvicorn.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()  # lower-case names, as ASGI has them
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)


async def call_asgi(app: ASGIApp, head: RequestHead, body: bytes,
                    extra_headers: tuple[tuple[bytes, bytes], ...] = ()
                    ) -> AsyncIterator[ResponseHead | bytes]:
    """Yields one ``ResponseHead``, then ``bytes`` chunks; ``extra_headers`` are added to
    the response (the replica names itself)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": head.method, "scheme": "http",
             "path": head.path, "raw_path": head.path.encode(), "root_path": "",
             "query_string": head.query_string, "headers": list(head.headers),
             "client": head.client, "server": None}
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # nothing more comes until the listener leaves
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                headers = tuple(message.get("headers", ())) + extra_headers
                yield ResponseHead(message["status"], headers)
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
    finally:
        # An app error after its answer (Starlette re-raises past its 500 handler) is
        # the app's to log; the answer has gone out.
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
