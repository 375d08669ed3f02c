"""AsyncEngine: the engine on its own thread behind asyncio — outputs, validation before
streaming, abort, the queue limit, graceful and hard shutdown."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine, EngineStoppedError, QueueFullError
from loraplex.engine.engine import LLMEngine

OPTIONS = dict(dtype="float32", kv_cache_gib=0.01, num_threads=1)
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def make_engine(tiny_model: Callable[..., Path]):
    threads = torch.get_num_threads()
    made: dict[int, LLMEngine] = {}

    def make(max_num_seqs: int = 8) -> LLMEngine:
        """One LLMEngine per batch size, reused: every test leaves it idle."""
        if max_num_seqs not in made:
            made[max_num_seqs] = LLMEngine(EngineConfig.from_flat(
                model=str(tiny_model()), max_num_seqs=max_num_seqs, **OPTIONS))
        return made[max_num_seqs]

    yield make
    torch.set_num_threads(threads)


def run(coro_fn, engine: LLMEngine, **options):
    """Run ``coro_fn(async_engine)`` with a started AsyncEngine, shut down afterwards."""
    async def main():
        async_engine = AsyncEngine(engine, **options)
        async_engine.start()
        try:
            return await coro_fn(async_engine)
        finally:
            await async_engine.shutdown(drain_seconds=0)
            assert not engine.has_unfinished_requests()

    return asyncio.run(main())


def test_generate_matches_the_offline_engine(make_engine, tiny_model) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def go(ae: AsyncEngine):
        outs = [out async for out in ae.generate("Hello", params)]
        return outs

    outs = run(go, make_engine())
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert "".join(o.new_text for o in outs) == outs[-1].text
    expected = LLM(str(tiny_model()), **OPTIONS).generate("Hello", params)[0]
    assert outs[-1].token_ids == expected.token_ids


def test_concurrent_requests_all_finish_with_their_own_lengths(make_engine) -> None:
    async def one(ae: AsyncEngine, n: int) -> int:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        async for out in ae.generate(f"prompt {n}", params):
            last = out
        return len(last.token_ids)

    async def go(ae: AsyncEngine):
        return await asyncio.gather(*(one(ae, n) for n in range(1, 13)))

    assert run(go, make_engine()) == list(range(1, 13))


def test_a_bad_request_raises_before_any_output(make_engine) -> None:
    async def go(ae: AsyncEngine):
        with pytest.raises(ValueError, match="prompt"):
            await ae.add_request([], SamplingParams())
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await ae.add_request([10**9], SamplingParams())
        running = await ae.add_request("Hi", LONG, request_id="same")
        with pytest.raises(ValueError, match="request_id"):
            await ae.add_request("Hi", LONG, request_id="same")
        running.cancel()
        return ae.is_alive  # the engine thread survives bad requests

    assert run(go, make_engine()) is True


def test_leaving_the_stream_aborts_the_request(make_engine) -> None:
    async def go(ae: AsyncEngine):
        stream = await ae.add_request("Hi", LONG)
        async for out in stream:
            if len(out.token_ids) >= 2:
                break  # the consumer goes away
        await asyncio.sleep(0)
        for _ in range(200):  # bounded: the abort is one command away
            if not await ae.run(lambda e: e.has_unfinished_requests()):
                break
            await asyncio.sleep(0.01)
        return await ae.run(lambda e: (e.has_unfinished_requests(),
                                       e.block_manager.num_free_blocks == e.block_manager.num_blocks))

    assert run(go, make_engine()) == (False, True)


def test_queue_limit_raises_queue_full(make_engine) -> None:
    async def go(ae: AsyncEngine):
        first = await ae.add_request("a", LONG)
        for _ in range(1000):  # bounded wait until it runs and the queue is empty again
            if ae.snapshot.num_running == 1 and ae.snapshot.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        second = await ae.add_request("b", LONG)  # the batch holds one: this one waits
        with pytest.raises(QueueFullError) as info:
            await ae.add_request("c", LONG)
        assert info.value.retry_after_s >= 1
        first.cancel()
        second.cancel()

    run(go, make_engine(max_num_seqs=1), max_queue=1)


def test_shutdown_lets_running_requests_finish_then_refuses(make_engine) -> None:
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def go(ae: AsyncEngine):
        stream = await ae.add_request("Hi", params)

        async def consume():
            return [out async for out in stream][-1]

        task = asyncio.ensure_future(consume())
        await ae.shutdown(drain_seconds=60)
        last = await task
        with pytest.raises(EngineStoppedError):
            await ae.add_request("Hi", params)
        return last

    last = run(go, make_engine())
    assert last.finish_reason == "length" and len(last.token_ids) == 30


def test_shutdown_without_drain_aborts(make_engine) -> None:
    async def go(ae: AsyncEngine):
        stream = await ae.add_request("Hi", LONG)
        outs = []

        async def consume():
            async for out in stream:
                outs.append(out)

        task = asyncio.ensure_future(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await ae.shutdown(drain_seconds=0)
        await asyncio.wait_for(task, timeout=30)
        return outs[-1]

    last = run(go, make_engine())
    assert last.finish_reason == "abort" and len(last.token_ids) < 400


def test_run_executes_on_the_engine_thread(make_engine) -> None:
    async def go(ae: AsyncEngine):
        return await ae.run(lambda e: threading.current_thread().name)

    assert run(go, make_engine()) == "loraplex-engine"


def test_requests_before_start_or_after_shutdown_are_refused(make_engine) -> None:
    async def go():
        ae = AsyncEngine(make_engine())
        with pytest.raises(EngineStoppedError):
            await ae.add_request("Hi", SamplingParams())
        ae.start()
        await ae.shutdown(0)
        with pytest.raises(EngineStoppedError):
            await ae.run(lambda e: None)

    asyncio.run(go())
