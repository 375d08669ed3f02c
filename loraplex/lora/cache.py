"""Adapter memory tiers: disk -> host LRU -> active slots.

Plain Python book-keeping; the model runner does the tensor copies it asks for.

- ``prefetch`` starts reading and validating an adapter in a background thread the moment
  a request names it, so the load overlaps the request's wait in the queue. After each load
  that thread allocates and faults in the buffer the next one will read into
  (``SpareBuffer``), so a load does not spend its time on fresh pages.
- The host tier keeps up to ``max_cpu_loras`` validated adapters, least recently used
  evicted first.
- The slot tier has ``max_loras`` slots. A slot is pinned while a running sequence uses
  its adapter; only unpinned slots are evicted (least recently used first).
"""
from __future__ import annotations

import ctypes
import mmap
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loraplex.config import LoRAConfig
from loraplex.lora.adapter import LoRAAdapter, load_adapter
from loraplex.lora.request import LoRARequest
from loraplex.models.llama import ModelArch


@dataclass(slots=True)
class AdapterStats:
    slot_hits: int = 0  # activations that found the adapter already in a slot
    slot_misses: int = 0
    slot_evictions: int = 0
    host_evictions: int = 0
    loads: int = 0
    load_seconds: float = 0.0  # disk -> validated host copy, summed
    merges: int = 0  # run-time merges into the live weights (engine/engine.py)
    unmerges: int = 0


class SpareBuffer:
    """One buffer for the next adapter file, allocated and faulted in ahead of time.

    The host tier keeps every loaded adapter's bytes, so each new one needs fresh memory,
    and the first touch of a page costs a fault (on this project's VMs, reading a 19.6 MB
    file into fresh pages took ~40-100 ms against ~10 ms into pages used before). ``refill``
    pays that between loads. Buffers are anonymous mappings, never ``bytearray(n)``: calloc
    may clear a reused heap region page by page while holding the GIL, stalling the engine
    thread. Used by the loading thread only: no lock."""

    SLACK = 64 << 10  # bytes: files of one shape differ only in their JSON header's length

    def __init__(self) -> None:
        self._buffer: mmap.mmap | None = None
        self._size = 0  # the last file size asked for

    def take(self, size: int) -> bytearray | memoryview:
        """A writable buffer of exactly ``size`` bytes (the spare, when it fits)."""
        spare, self._buffer = self._buffer, None
        self._size = size
        if spare is None or not size <= len(spare) <= size + 2 * self.SLACK:
            if not size:
                return bytearray()
            spare = mmap.mmap(-1, size)  # untouched: the file read faults it in, GIL released
        return memoryview(spare)[:size]

    def refill(self) -> None:
        """Prepare a buffer the size of the last file (plus slack) unless one is ready."""
        if self._buffer is None and self._size:
            size = self._size + self.SLACK
            if hasattr(mmap, "MAP_POPULATE"):  # the kernel faults every page in, in one call
                # (GIL let go): 8-19 ms for 19.6 MB here, where touching them took 15-57 ms.
                # It runs beside the engine's slot copy of the adapter just loaded, which the
                # touching slowed from 8 ms to up to 35.
                buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                   | mmap.MAP_POPULATE)
            else:
                buffer = mmap.mmap(-1, size)
                # Touch every page now; ctypes lets the GIL go for the call.
                ctypes.memset((ctypes.c_char * size).from_buffer(buffer), 0, size)
            self._buffer = buffer


class AdapterCache:
    def __init__(self, arch: ModelArch, config: LoRAConfig) -> None:
        self.arch = arch
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        self._spare = SpareBuffer()  # used on the executor's thread only
        self._loading: dict[str, Future[LoRAAdapter]] = {}  # resolved path -> load
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # content hash -> adapter
        self._host_by_path: dict[str, str] = {}  # resolved path -> content hash
        self.slot_owner: list[str | None] = [None] * config.max_loras  # content hash
        self.slot_refs = [0] * config.max_loras
        self._slot_of: dict[str, int] = {}
        self._unpinned: OrderedDict[int, None] = OrderedDict.fromkeys(range(config.max_loras))
        self._pending_loads: list[tuple[int, LoRAAdapter]] = []
        self.stats = AdapterStats()

    # ---- disk -> host -------------------------------------------------------------------

    def prefetch(self, request: LoRARequest) -> Future[LoRAAdapter]:
        """Start loading ``request``'s adapter unless it is in host memory or loading."""
        key = str(Path(request.path).resolve())
        content_hash = self._host_by_path.get(key)
        if content_hash in self.host:
            done: Future[LoRAAdapter] = Future()
            done.set_result(self.host[content_hash])
            return done
        future = self._loading.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._executor.submit(self._load, request, key)
            self._executor.submit(self._spare.refill)  # after this load, before the next
            self._loading[key] = future
        return future

    def load_now(self, request: LoRARequest) -> LoRAAdapter:
        """Load (or find) an adapter and wait for it; raises its validation error."""
        return self.take_loaded(self.prefetch(request).result())

    def take_loaded(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Record a finished load in the host tier (scheduler thread only)."""
        key = str(adapter.path.resolve())
        self._loading.pop(key, None)
        self._host_by_path[key] = adapter.content_hash
        cached = self.host.get(adapter.content_hash)
        if cached is not None:  # same content under another path or name
            self.host.move_to_end(adapter.content_hash)
            return cached
        self.host[adapter.content_hash] = adapter
        while len(self.host) > self.config.max_cpu_loras:
            # Least recently used first; never one a running request uses, nor the newcomer.
            victim = next((h for h in self.host
                           if h != adapter.content_hash and not self._is_pinned(h)), None)
            if victim is None:
                break
            del self.host[victim]
            self.stats.host_evictions += 1
        return adapter

    def _is_pinned(self, content_hash: str) -> bool:
        slot = self._slot_of.get(content_hash)
        return slot is not None and self.slot_refs[slot] > 0

    def _load(self, request: LoRARequest, key: str) -> LoRAAdapter:
        start = time.perf_counter()
        adapter = load_adapter(key, self.arch, self.config.max_lora_rank, name=request.name,
                               buffer_for=self._spare.take)
        self.stats.loads += 1
        self.stats.load_seconds += time.perf_counter() - start
        return adapter

    # ---- host -> slots ------------------------------------------------------------------

    def can_activate(self, adapter: LoRAAdapter) -> bool:
        return adapter.content_hash in self._slot_of or bool(self._unpinned)

    def activate(self, adapter: LoRAAdapter) -> int:
        """Pin ``adapter`` into a slot for one more running sequence; returns the slot."""
        slot = self._slot_of.get(adapter.content_hash)
        if slot is None:
            slot, _ = self._unpinned.popitem(last=False)  # least recently used
            old = self.slot_owner[slot]
            if old is not None:
                del self._slot_of[old]
                self.stats.slot_evictions += 1
            self.slot_owner[slot] = adapter.content_hash
            self._slot_of[adapter.content_hash] = slot
            self._pending_loads.append((slot, adapter))
            self.stats.slot_misses += 1
        else:
            self._unpinned.pop(slot, None)
            self.stats.slot_hits += 1
        self.slot_refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.slot_refs[slot] -= 1
        assert self.slot_refs[slot] >= 0
        if self.slot_refs[slot] == 0:
            self._unpinned[slot] = None  # most recently used end

    def take_pending_loads(self) -> list[tuple[int, LoRAAdapter]]:
        """Slots whose weights the model runner must copy in before the next forward."""
        loads, self._pending_loads = self._pending_loads, []
        return loads
