"""Sampling parameters: validation, seeds, top-k/top-p, stops, EOS, logprobs, chat.

Most checks read one shared batch (``runs``): every request below runs side by side in a
single ``generate`` call on the real default model, which is also what they must survive.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from loraplex import SamplingParams

ONCE = "Once upon a time"
FRANCE = "The capital of France is"
OTHER = "Write a list of three fruits:"
YES_NO = [{"role": "user", "content": "Reply with one word: yes or no?"}]


# ---- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5),
    ("temperature", -0.5), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1),
    ("top_k", -2), ("top_k", 0),
    ("logprobs", -1), ("logprobs", 21),
    ("stop_token_ids", (-1,)),
])
def test_invalid_value_names_field_and_value(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert message.startswith(f"{field}:"), message
    assert repr(value) in message, message


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^stop: .*''"):
        SamplingParams(stop=["ok", ""])


@pytest.mark.parametrize("field, value", [
    ("temperature", "0.7"), ("top_p", "0.9"), ("seed", "7"), ("max_tokens", "16"),
])
def test_wrong_type_names_field_and_value(field: str, value: Any) -> None:
    """Validated on creation, like every other field: a string where a number belongs is
    refused at once with the field named, not later with an internal error."""
    with pytest.raises((ValueError, TypeError)) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value), str(err.value)


def test_valid_edges_are_accepted() -> None:
    SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=-1, logprobs=0)
    SamplingParams(top_p=1e-9, top_k=1, logprobs=20, stop="x", stop_token_ids=[0])
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[5]).stop_token_ids == (5,)


# ---- one shared batch on the real model ---------------------------------------------------

def _requests(tokenizer) -> dict[str, tuple[Any, SamplingParams]]:
    hi = tokenizer.apply_chat_template(YES_NO)  # the answer is "Yes." and EOS
    seeded = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    return {
        "greedy": (ONCE, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
        "top_k_1": (ONCE, SamplingParams(max_tokens=12, temperature=1.3, top_k=1, ignore_eos=True)),
        # Every token has probability >= 1/vocab > 1e-5: top_p=1e-5 keeps only the top one.
        "top_p_tiny": (ONCE, SamplingParams(max_tokens=12, temperature=1.3, top_p=1e-5,
                                            ignore_eos=True)),
        "seed_a": (ONCE, SamplingParams(seed=1234, **seeded)),
        "seed_a_again": (ONCE, SamplingParams(seed=1234, **seeded)),
        "seed_b": (ONCE, SamplingParams(seed=4321, **seeded)),
        "noise_1": (OTHER, SamplingParams(max_tokens=12, temperature=1.0)),
        "noise_2": (FRANCE, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9)),
        "logprobs": (ONCE, SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=7,
                                          logprobs=5, ignore_eos=True)),
        "logprobs_0": (FRANCE, SamplingParams(max_tokens=6, temperature=0, logprobs=0)),
        "france": (FRANCE, SamplingParams(max_tokens=12, temperature=0)),
        "stop": (FRANCE, SamplingParams(max_tokens=12, temperature=0, stop="answer")),
        "stop_incl": (FRANCE, SamplingParams(max_tokens=12, temperature=0, stop="answer",
                                             include_stop_str_in_output=True)),
        "stop_across_tokens": (FRANCE, SamplingParams(max_tokens=12, temperature=0,
                                                      stop=["is: 20"])),
        "stop_earliest": (FRANCE, SamplingParams(max_tokens=12, temperature=0,
                                                 stop=["2018", "\n\n"])),
        "stop_token": (FRANCE, SamplingParams(max_tokens=12, temperature=0,
                                              stop_token_ids=[198])),  # "\n"
        "max_tokens": (FRANCE, SamplingParams(max_tokens=5, temperature=0)),
        "eos": (hi, SamplingParams(max_tokens=12, temperature=0)),
        "ignore_eos": (hi, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)),
        "eos_shown": (hi, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                         skip_special_tokens=False)),
    }


@pytest.fixture(scope="module")
def runs(llm_f32) -> dict[str, Any]:
    requests = _requests(llm_f32.tokenizer)
    outputs = llm_f32.generate([p for p, _ in requests.values()], [sp for _, sp in requests.values()])
    result = dict(zip(requests, outputs))
    # The seeded request once more, alone.
    prompt, params = requests["seed_a"]
    (result["seed_a_alone"],) = llm_f32.generate(prompt, params)
    return result


def test_greedy_is_deterministic_and_sane(runs: dict[str, Any]) -> None:
    assert runs["france"].text.startswith(" Paris")
    assert len(runs["greedy"].token_ids) == 12


def test_seed_reproducible_regardless_of_batch(runs: dict[str, Any]) -> None:
    alone = runs["seed_a_alone"].token_ids
    assert len(alone) == 12
    assert runs["seed_a"].token_ids == alone
    assert runs["seed_a_again"].token_ids == alone


def test_different_seeds_differ(runs: dict[str, Any]) -> None:
    assert runs["seed_b"].token_ids != runs["seed_a"].token_ids
    # And sampling at temperature 1 is not greedy decoding in disguise.
    assert runs["seed_a"].token_ids != runs["greedy"].token_ids


def test_top_k_1_equals_greedy(runs: dict[str, Any]) -> None:
    assert runs["top_k_1"].token_ids == runs["greedy"].token_ids


def test_tiny_top_p_equals_greedy(runs: dict[str, Any]) -> None:
    assert runs["top_p_tiny"].token_ids == runs["greedy"].token_ids


def test_stop_string(runs: dict[str, Any]) -> None:
    full = runs["france"]
    index = full.text.index("answer")
    out = runs["stop"]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:index] and "answer" not in out.text
    # Generation stopped at the token that completed the stop string.
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)


def test_stop_string_included(runs: dict[str, Any]) -> None:
    full = runs["france"]
    index = full.text.index("answer")
    out = runs["stop_incl"]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:index + len("answer")]
    assert out.token_ids == runs["stop"].token_ids


def test_stop_string_across_tokens(runs: dict[str, Any]) -> None:
    full = runs["france"]
    out = runs["stop_across_tokens"]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index("is: 20")]
    assert out.token_ids == full.token_ids[:len(out.token_ids)]


def test_streamed_text_never_shows_a_stop_string(llm_f32, runs: dict[str, Any]) -> None:
    """What a client saw while streaming must be what the request finally says: text that
    might be the start of a stop string is held back until it is known not to be."""
    params = SamplingParams(max_tokens=12, temperature=0, stop=["is: 20"])
    streamed = "".join(llm_f32.stream(FRANCE, params))
    assert streamed == runs["stop_across_tokens"].text
    assert "is: 2" not in streamed


def test_earliest_stop_string_wins(runs: dict[str, Any]) -> None:
    full = runs["france"]
    out = runs["stop_earliest"]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index("\n\n")]


def test_stop_token_ids(runs: dict[str, Any]) -> None:
    full = runs["france"]
    first_newline = full.token_ids.index(198)
    out = runs["stop_token"]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:first_newline + 1]  # the stop token is the last
    assert out.text == full.text[:full.text.index("\n")]  # and its text is not shown


def test_max_tokens_gives_length(runs: dict[str, Any]) -> None:
    out = runs["max_tokens"]
    assert out.finish_reason == "length"
    assert out.token_ids == runs["france"].token_ids[:5]


def test_eos_stops_and_is_not_shown(runs: dict[str, Any], llm_f32) -> None:
    out = runs["eos"]
    eos = llm_f32.tokenizer.eos_token_ids
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in eos and not set(out.token_ids[:-1]) & eos
    assert len(out.token_ids) < 12
    assert "<|im_end|>" not in out.text and out.text.strip()


def test_ignore_eos_runs_to_max_tokens(runs: dict[str, Any]) -> None:
    natural = runs["eos"].token_ids
    out = runs["ignore_eos"]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 10
    assert out.token_ids[:len(natural)] == natural  # the EOS is generated and passed over
    assert out.text.startswith(runs["eos"].text)
    shown = runs["eos_shown"]
    assert shown.token_ids == out.token_ids
    assert "<|im_end|>" in shown.text and "<|im_end|>" not in out.text


def test_logprobs_match_transformers(runs: dict[str, Any], hf_f32) -> None:
    out = runs["logprobs"]
    assert len(out.logprobs) == len(out.token_ids) == 12
    with torch.no_grad():
        logits = hf_f32(torch.tensor([out.prompt_token_ids + out.token_ids])).logits[0]
    logp = logits.float().log_softmax(-1)[len(out.prompt_token_ids) - 1:-1]
    for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(logp[step, token].item(), abs=1e-4)
        assert len(lp.top) == 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(logp[step].topk(5).values.tolist(), abs=1e-4)
        for tid, v in lp.top:
            assert v == pytest.approx(logp[step, tid].item(), abs=1e-4)
    # Sampling at temperature 0.8 picked something other than the argmax at least once,
    # so these are the raw distribution's logprobs of the sampled token, not of the top one.
    assert any(lp.token_id != lp.top[0][0] for lp in out.logprobs)


def test_logprobs_zero_gives_the_token_only(runs: dict[str, Any]) -> None:
    out = runs["logprobs_0"]
    assert len(out.logprobs) == len(out.token_ids)
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.top == [] and lp.logprob <= 0
    assert runs["france"].logprobs is None  # not asked for, not returned


def test_chat_uses_the_models_template(llm_f32, hf_tokenizer) -> None:
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    expected = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    text = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    params = SamplingParams(max_tokens=6, temperature=0)
    (out,) = llm_f32.chat(conversation, params)
    assert out.prompt_token_ids == list(expected)
    (same,) = llm_f32.generate(list(expected), params)
    assert out.token_ids == same.token_ids
    # A list of conversations gives one output each, in order.
    outs = llm_f32.chat([conversation, YES_NO], params)
    assert [o.prompt_token_ids for o in outs] == [
        list(expected), hf_tokenizer.apply_chat_template(YES_NO, add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)]


def test_chat_refuses_malformed_messages(llm_f32) -> None:
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        llm_f32.chat([{"role": "user", "content": "hi"}, {"content": "no role"}])
