"""One request's outputs on the caller's event loop, as an async iterator.

The engine thread puts outputs in (through ``loop.call_soon_threadsafe``); the caller reads
them in order until the finished one. A caller that leaves early (its client went away)
or calls ``cancel`` aborts the request, which frees its KV blocks on the engine thread.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from loraplex.engine.sequence import RequestOutput


class RequestStream:
    def __init__(self, request_id: str, on_done: Callable[[RequestStream], None],
                 abort: Callable[[str], None]) -> None:
        """``on_done(stream)``: the engine is done with it (finished, failed or cancelled);
        ``abort(request_id)``: stop the request in the engine."""
        self.request_id = request_id
        self.is_finished = False  # the caller has read the end, or cancelled
        self._on_done = on_done
        self._abort = abort
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """On the caller's loop only. An exception ends the stream with that error."""
        self._queue.put_nowait(item)
        if isinstance(item, BaseException) or item.finished:
            self._on_done(self)  # done in the engine, whether read yet or not

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.is_finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.is_finished = True
                    raise item
                self.is_finished = item.finished
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Abort the request unless the caller has already read its end."""
        if not self.is_finished:
            self.is_finished = True
            self._on_done(self)
            self._abort(self.request_id)
