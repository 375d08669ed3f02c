"""The engine behind an event loop: one thread steps ``LLMEngine``, callers await outputs.

Only the engine thread touches the ``LLMEngine``. Callers on any event loop send it
commands through a thread-safe queue (add a request, abort one, run a function on the
engine); the thread hands each request's outputs back to the caller's loop with
``loop.call_soon_threadsafe``, into that request's ``asyncio.Queue``. While requests are
unfinished the thread steps without pause and picks up new commands between steps; when
idle it sleeps on the command queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from loraplex.engine.engine import LLMEngine
from loraplex.engine.request_stream import RequestStream
from loraplex.engine.sequence import RequestOutput
from loraplex.lora.cache import AdapterStats
from loraplex.lora.request import LoRARequest
from loraplex.sampling import SamplingParams
from loraplex.spec.decoder import SpecStats

logger = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """More requests wait than ``max_queue`` allows; try again after ``retry_after_s``."""

    def __init__(self, num_waiting: int, max_queue: int, retry_after_s: int) -> None:
        super().__init__(f"{num_waiting} requests are waiting (max_queue {max_queue}); "
                         f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or died) and takes no new requests."""


class EngineObserver(Protocol):
    """Told about every step's outputs, on the engine thread (keep it cheap)."""

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...


@dataclass(slots=True)
class EngineSnapshot:
    """What the engine thread publishes after each step, for readers on other threads."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    adapter_stats: AdapterStats = field(default_factory=AdapterStats)
    spec_stats: dict[str | None, SpecStats] = field(default_factory=dict)  # by adapter name


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256,
                 observer: EngineObserver | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue: must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.observer = observer
        self.snapshot = EngineSnapshot(num_blocks=engine.block_manager.num_blocks,
                                       num_free_blocks=engine.block_manager.num_free_blocks)
        self.is_accepting = True
        self.error: BaseException | None = None  # why the engine thread died, if it did
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "stopped" against queueing a command
        self._is_stopped = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}  # engine thread
        self._active: set[RequestStream] = set()  # caller side: accepted, not finished
        self._num_submitting = 0  # caller side: sent to the thread, not yet accepted
        self._mean_e2e_s = 1.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)

    # ---- caller side (any event loop) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None,
                          lora: LoRARequest | None = None) -> RequestStream:
        """Validate and queue a request; its stream follows. Raises the engine's
        ValueError for a bad request, QueueFullError, or EngineStoppedError."""
        if not self.is_accepting or not self.is_alive:
            raise EngineStoppedError("the engine is shutting down and takes no new requests")
        num_waiting = self.snapshot.num_waiting + self._num_submitting
        if num_waiting >= self.max_queue:
            raise QueueFullError(num_waiting, self.max_queue, self._retry_after_s())
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, on_done=self._active.discard, abort=self.abort)
        loop = asyncio.get_running_loop()

        def add() -> None:
            seq = self.engine.make_sequence(prompt, params, request_id, lora=lora)
            self._streams[request_id] = (loop, stream)
            self.engine.add_sequence(seq)
            self._publish()  # the queue limit counts this request from now on

        self._num_submitting += 1
        try:
            await self._call(add)
        finally:
            self._num_submitting -= 1
        self._active.add(stream)
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None,
                       lora: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """``add_request`` and iterate its stream, in one."""
        stream = await self.add_request(prompt, params, request_id, lora)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        """Abort a request if it is unfinished; safe from any thread, any time."""
        self._submit(_Command(lambda: self._abort_now(request_id)))

    async def run(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps; return its result."""
        return await self._call(lambda: fn(self.engine))

    async def shutdown(self, drain_seconds: float = 30.0) -> None:
        """Take no new requests, let the unfinished ones finish for up to
        ``drain_seconds``, abort what remains, then stop the engine thread."""
        self.is_accepting = False
        deadline = time.monotonic() + drain_seconds
        while self._active and self.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._active:
            logger.warning("aborting %d unfinished request(s) at shutdown", len(self._active))
            for stream in list(self._active):
                self.abort(stream.request_id)
        with self._lock:
            self._commands.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    def _retry_after_s(self) -> int:
        """A guess at when a queue slot frees: the waiting requests' share of the batch."""
        batch = max(1, self.snapshot.num_running)
        waves = (self.snapshot.num_waiting + 1) / batch
        return int(min(60, max(1, math.ceil(waves * self._mean_e2e_s))))

    async def _call(self, fn: Callable[[], T]) -> T:
        future: Future[T] = Future()
        if not self._thread.is_alive() and not self._is_stopped:
            raise EngineStoppedError("the engine thread was never started")
        self._submit(_Command(fn, future))
        return await asyncio.wrap_future(future)

    def _submit(self, command: _Command) -> None:
        with self._lock:
            if not self._is_stopped:
                self._commands.put(command)
                return
        command.refuse()

    # ---- engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._run_commands(block=idle):
                    break
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._deliver(outputs)
                self._publish()
        except BaseException as e:
            logger.exception("the engine thread died")
            self.error = e
            for loop, stream in self._streams.values():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens
                    loop.call_soon_threadsafe(stream.put, EngineStoppedError(f"engine failed: {e}"))
            self._streams.clear()
        finally:
            with self._lock:
                self._is_stopped = True
            self._run_commands(block=False, refuse=True)  # their callers must not hang

    def _run_commands(self, block: bool, refuse: bool = False) -> bool:
        """Run (or refuse) the queued commands; False once asked to stop."""
        while True:
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            if command is None and not refuse:
                return False
            if command is not None:
                command.refuse() if refuse else command.run()
            block = False

    def _abort_now(self, request_id: str) -> None:
        seq = self.engine.sequences.get(request_id)
        self.engine.abort_request(request_id)
        if seq is not None:
            self._deliver([self.engine.output_of(seq)])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        if self.observer is not None and outputs:
            self.observer.on_outputs(outputs, now)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            loop, stream = entry
            by_loop.setdefault(loop, []).append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
                e2e = now - out.metrics.arrival_time
                self._mean_e2e_s = 0.9 * self._mean_e2e_s + 0.1 * e2e
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody listens any more
                for stream, _ in items:
                    self.engine.abort_request(stream.request_id)

    def _publish(self) -> None:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        stats = self.engine.adapters.stats if self.engine.adapters is not None else AdapterStats()
        self.snapshot = EngineSnapshot(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_free_blocks=blocks.num_free_blocks, num_blocks=blocks.num_blocks,
            adapter_stats=dataclasses.replace(stats),
            spec_stats={k: dataclasses.replace(v) for k, v in self.engine.spec.stats.items()}
            if self.engine.spec is not None else {})


@dataclass(slots=True)
class _Command:
    """A function for the engine thread; its result or exception goes to ``future``."""

    fn: Callable[[], Any]
    future: Future[Any] | None = None  # None: nobody waits (aborts)

    def run(self) -> None:
        if self.future is not None and not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn()
        except BaseException as e:  # the caller gets it; the engine thread goes on
            if self.future is None:
                logger.exception("engine command failed")
            else:
                self.future.set_exception(e)
            return
        if self.future is not None:
            self.future.set_result(result)

    def refuse(self) -> None:
        if self.future is not None and self.future.set_running_or_notify_cancel():
            self.future.set_exception(EngineStoppedError("the engine has stopped"))


def _put_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.put(out)
