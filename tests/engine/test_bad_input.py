"""Bad input is refused with a clear exception naming the field and the value, before any
work starts, and the engine that refused it keeps serving.

Runs on a tiny random model (the default model's tokenizer, random weights): what is
checked here is the validation, not the text.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loraplex import LLM, SamplingParams
import loraplex.engine.engine as engine_module

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model: Callable[..., Path]) -> LLM:
    return LLM(str(tiny_model()), dtype="float32", max_model_len=64, kv_cache_gib=0.01)


@pytest.fixture
def watched(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts model runs; checks afterwards that nothing was left queued or holding blocks."""
    counts = {"execute": 0}
    execute = llm.engine.runner.execute

    def counting(batch: Any) -> Any:
        counts["execute"] += 1
        return execute(batch)

    monkeypatch.setattr(llm.engine.runner, "execute", counting)
    yield counts
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.sequences == {}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[int]:
    (out,) = llm.generate("Hello there", GREEDY)
    return out.token_ids


def _prompt_of(num_tokens: int) -> list[int]:
    return [(i * 7919) % 40000 + 100 for i in range(num_tokens)]


def test_prompt_longer_than_the_context(llm: LLM, watched: dict[str, int]) -> None:
    assert llm.engine.max_model_len == 64
    with pytest.raises(ValueError) as err:
        llm.generate(_prompt_of(64), GREEDY)
    message = str(err.value)
    assert message.startswith("prompt:") and "64" in message and "max_model_len" in message
    with pytest.raises(ValueError, match=r"^prompt: 200 tokens .*max_model_len 64"):
        llm.generate(_prompt_of(200), GREEDY)
    text = "word " * 100  # a text prompt is measured after tokenizing
    with pytest.raises(ValueError, match=r"^prompt: \d+ tokens .*max_model_len 64"):
        llm.generate(text, GREEDY)
    assert watched["execute"] == 0


def test_prompt_that_just_fits_stops_at_the_context(llm: LLM, watched: dict[str, int]) -> None:
    (out,) = llm.generate(_prompt_of(63), SamplingParams(max_tokens=16, temperature=0,
                                                              ignore_eos=True))
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


def test_empty_prompt(llm: LLM, watched: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"^prompt: is empty"):
        llm.generate([[]], GREEDY)
    assert watched["execute"] == 0


@pytest.mark.parametrize("bad_id", [-1, 49152, 10**9])
def test_token_id_outside_the_vocabulary(llm: LLM, watched: dict[str, int], bad_id: int) -> None:
    with pytest.raises(ValueError) as err:
        llm.generate([5, 6, bad_id, 7], GREEDY)
    assert str(err.value).startswith("prompt:") and repr(bad_id) in str(err.value)
    assert "49152" in str(err.value)
    assert watched["execute"] == 0


def test_max_tokens_below_one() -> None:
    for value in (0, -1):
        with pytest.raises(ValueError, match=rf"^max_tokens: .*got {value}$"):
            SamplingParams(max_tokens=value)


def test_params_of_the_wrong_type(llm: LLM, watched: dict[str, int]) -> None:
    with pytest.raises(TypeError, match=r"^params: expected SamplingParams, got dict"):
        llm.generate(["a", "b"], [GREEDY, {"max_tokens": 4}])
    with pytest.raises(ValueError, match=r"^params: got 3 entries for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY] * 3)
    assert watched["execute"] == 0


def test_duplicate_request_id(llm: LLM, watched: dict[str, int]) -> None:
    engine = llm.engine
    seq = engine.add_request("Hello", GREEDY, request_id="dup")
    with pytest.raises(ValueError, match=r"^request_id: 'dup' is already in use"):
        engine.add_request("Hello again", GREEDY, request_id="dup")
    engine.abort_request(seq.request_id)


def test_bad_request_in_a_list_runs_nothing(llm: LLM, watched: dict[str, int],
                                            reference: list[int]) -> None:
    prompts: list[Any] = ["Hello there", "Good morning", _prompt_of(80)]
    with pytest.raises(ValueError, match=r"^prompt: 80 tokens"):
        llm.generate(prompts, GREEDY)
    assert watched["execute"] == 0
    # A bad params entry after good ones: same.
    with pytest.raises(ValueError, match=r"^prompt: is empty"):
        llm.generate(["Hello there", []], GREEDY)
    assert watched["execute"] == 0


def test_engine_still_serves_after_errors(llm: LLM, watched: dict[str, int],
                                          reference: list[int]) -> None:
    for bad in ([], _prompt_of(70), [1, 2, -5]):
        with pytest.raises(ValueError):
            llm.generate(["Hello there", bad], GREEDY)
    outs = llm.generate(["Hello there", "Hello there"], GREEDY)
    assert [o.token_ids for o in outs] == [reference, reference]
    assert all(o.finish_reason == "length" for o in outs)


def test_engine_is_clean_after_an_exception_mid_run(llm: LLM, reference: list[int],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception while requests run (a Ctrl-C in a notebook, an internal error) must not
    leave them queued and holding KV blocks, to run again inside the next call."""
    engine = llm.engine
    execute = engine.runner.execute
    calls = {"n": 0}

    def failing(batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", failing)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(["Hello there", "Good morning"], GREEDY)
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:  # leave the shared engine usable for whatever runs next
        for request_id in list(engine.sequences):
            engine.abort_request(request_id)
    monkeypatch.setattr(engine.runner, "execute", execute)
    (out,) = llm.generate("Hello there", GREEDY)
    assert out.token_ids == reference


# ---- engine options: refused before the model is loaded -----------------------------------

@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the bad option was refused")

    monkeypatch.setattr(engine_module, "load_model", fail)


def test_unknown_model_name(no_loading: None) -> None:
    with pytest.raises(ValueError) as err:
        LLM("no-such-model")
    message = str(err.value)
    assert message.startswith("model:") and "'no-such-model'" in message
    assert "smollm2-135m" in message  # says what would work


def test_folder_without_config(no_loading: None, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        LLM(str(tmp_path))
    assert str(err.value).startswith("model:")
    assert repr(str(tmp_path)) in str(err.value) and "config.json" in str(err.value)


@pytest.mark.parametrize("option, value", [
    ("dtype", "int8"), ("device", "tpu"), ("max_model_len", 1), ("block_size", 12),
    ("kv_cache_gib", 0), ("max_num_seqs", 0), ("max_num_batched_tokens", 0),
    ("num_threads", 0),
])
def test_bad_engine_option(no_loading: None, option: str, value: Any) -> None:
    with pytest.raises(ValueError) as err:
        LLM("smollm2-135m", **{option: value})
    assert str(err.value).startswith(f"{option}:") and str(value) in str(err.value)


def test_unknown_engine_option(no_loading: None) -> None:
    with pytest.raises(TypeError, match="max_batch_size"):
        LLM("smollm2-135m", max_batch_size=4)


def test_max_model_len_beyond_the_model(tiny_model: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match=r"^max_model_len: 100000 exceeds .*\(512\)"):
        LLM(str(tiny_model()), dtype="float32", max_model_len=100_000, kv_cache_gib=0.01)
