"""The OpenAI API end to end: a real uvicorn server on 127.0.0.1, the official ``openai``
client, API keys for tenants a and b and an admin.

The server's answers are checked against the offline engine on the same weights (greedy
text must match token for token), so a request that silently dropped its adapter or a
sampling parameter fails here.
"""
from __future__ import annotations

from pathlib import Path

import openai
import pytest

from loraplex import LLM, LoRARequest, SamplingParams

from .conftest import A_KEY, ADMIN_KEY, B_KEY, NO_TENANT_KEY, RunningServer

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def offline_text(llm: LLM, prompt: str | list[int], max_tokens: int,
                 adapter: Path | None = None) -> str:
    lora = LoRARequest(adapter.name, str(adapter)) if adapter is not None else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return llm.generate(prompt, params, lora=lora)[0].text


# ---- generation ------------------------------------------------------------------------

def test_completion_matches_the_offline_engine_with_usage(server: RunningServer,
                                                          offline: LLM) -> None:
    result = server.client(A_KEY).completions.create(model=server.base_id, prompt="Hello there",
                                                     max_tokens=6, **GREEDY)
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert result.model == server.base_id
    assert result.choices[0].text == offline_text(offline, "Hello there", 6)
    assert result.choices[0].finish_reason == "length"
    num_prompt = len(offline.tokenizer.encode("Hello there"))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens,
            result.usage.total_tokens) == (num_prompt, 6, num_prompt + 6)


def test_adapter_named_in_model_field_is_applied(server: RunningServer, offline: LLM,
                                                 adapter_root: Path) -> None:
    client = server.client(A_KEY)
    shared = client.completions.create(model="shared-alpha", prompt="Hello", max_tokens=8, **GREEDY)
    own = client.completions.create(model="a-beta", prompt="Hello", max_tokens=8, **GREEDY)
    assert shared.choices[0].text == offline_text(offline, "Hello", 8, adapter_root / "alpha")
    assert own.choices[0].text == offline_text(offline, "Hello", 8, adapter_root / "beta")
    assert shared.choices[0].text != offline_text(offline, "Hello", 8)  # the adapter matters
    assert shared.model == "shared-alpha"


def test_chat_completion(server: RunningServer, offline: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    result = server.client(B_KEY).chat.completions.create(
        model=server.base_id, messages=messages, max_completion_tokens=5, **GREEDY)
    prompt_ids = offline.tokenizer.apply_chat_template(messages)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == offline_text(offline, prompt_ids, 5)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == 5


def test_chat_accepts_text_parts(server: RunningServer, offline: LLM) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    result = server.client(A_KEY).chat.completions.create(
        model=server.base_id, messages=[{"role": "user", "content": parts}], max_tokens=3, **GREEDY)
    prompt_ids = offline.tokenizer.apply_chat_template([{"role": "user", "content": "Hi\nthere"}])
    assert result.usage.prompt_tokens == len(prompt_ids)


def test_streamed_completion_equals_the_whole_one_and_ends_with_usage(server: RunningServer) -> None:
    client = server.client(A_KEY)
    whole = client.completions.create(model="shared-alpha", prompt="Once", max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model="shared-alpha", prompt="Once", max_tokens=12,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_chat_has_role_first_and_usage_last(server: RunningServer) -> None:
    client = server.client(B_KEY)
    messages = [{"role": "user", "content": "Count to three."}]
    whole = client.chat.completions.create(model=server.base_id, messages=messages, max_tokens=7,
                                           **GREEDY)
    chunks = list(client.chat.completions.create(model=server.base_id, messages=messages,
                                                 max_tokens=7, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == \
        whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage(server: RunningServer) -> None:
    chunks = list(server.client(A_KEY).completions.create(
        model=server.base_id, prompt="Hi", max_tokens=3, stream=True, **GREEDY))
    assert chunks and all(c.usage is None and c.choices for c in chunks)


def test_logprobs(server: RunningServer) -> None:
    client = server.client(A_KEY)
    completion = client.completions.create(model=server.base_id, prompt="Hello", max_tokens=4,
                                           logprobs=3, **GREEDY)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == completion.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy
    chat = client.chat.completions.create(model=server.base_id, max_tokens=4, logprobs=True,
                                          top_logprobs=2,
                                          messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_seed_stop_and_top_k(server: RunningServer) -> None:
    client = server.client(A_KEY)
    sampled = [client.completions.create(model=server.base_id, prompt="Hello", max_tokens=8,
                                         temperature=1.0, seed=1234).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    greedy = client.completions.create(model=server.base_id, prompt="Hello", max_tokens=8,
                                       **GREEDY).choices[0].text
    top_k_1 = client.completions.create(model=server.base_id, prompt="Hello", max_tokens=8,
                                        temperature=1.0, extra_body={"top_k": 1,
                                                                     "ignore_eos": True})
    assert top_k_1.choices[0].text == greedy  # top_k reached the sampler
    stop = greedy[len(greedy) // 2:][:3]
    stopped = client.completions.create(model=server.base_id, prompt="Hello", max_tokens=8,
                                        stop=[stop], **GREEDY).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == greedy[:greedy.index(stop)]


# ---- models and tenants ------------------------------------------------------------------

def test_models_list_shows_base_shared_and_own_adapters_only(server: RunningServer) -> None:
    def models(key: str) -> dict[str, openai.types.Model]:
        return {m.id: m for m in server.client(key).models.list()}

    a, b = models(A_KEY), models(B_KEY)
    assert set(a) == {server.base_id, "shared-alpha", "a-beta"}
    assert set(b) == {server.base_id, "shared-alpha"}
    assert a["a-beta"].parent == server.base_id and a["shared-alpha"].parent == server.base_id
    assert a[server.base_id].parent is None
    assert a["a-beta"].owned_by == "a" and a["shared-alpha"].owned_by == "shared"
    assert server.client(A_KEY).models.retrieve("a-beta").id == "a-beta"


def test_another_tenants_adapter_answers_exactly_like_a_missing_one(server: RunningServer) -> None:
    client = server.client(B_KEY)
    errors = []
    for name in ("a-beta", "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model=name, prompt="Hi", max_tokens=2)
        errors.append(info.value.body)
    assert errors[0] == {**errors[1], "message": errors[1]["message"].replace("no-such-adapter",
                                                                              "a-beta")}
    assert errors[0]["code"] == "model_not_found" and errors[0]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("a-beta")
    with pytest.raises(openai.NotFoundError):  # nor may b delete it
        client.delete("/adapters/a-beta", cast_to=object)
    assert "a-beta" in {m.id for m in server.client(A_KEY).models.list()}


def test_key_without_tenant_sees_shared_adapters_only(server: RunningServer) -> None:
    ids = {m.id for m in server.client(NO_TENANT_KEY).models.list()}
    assert ids == {server.base_id, "shared-alpha"}


# ---- operations ----------------------------------------------------------------------------

def test_health_and_version_need_no_key(server: RunningServer) -> None:
    import loraplex

    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/version").json() == {"version": loraplex.__version__}


def test_metrics_parse_and_count_requests(server: RunningServer) -> None:
    before = server.metrics(ADMIN_KEY)
    client = server.client(A_KEY)
    for _ in range(3):
        client.completions.create(model="shared-alpha", prompt="Hi", max_tokens=2, **GREEDY)
    after = server.metrics(ADMIN_KEY)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta('loraplex:requests_total{model="shared-alpha",tenant="a"}') == 3
    assert delta("loraplex:time_to_first_token_seconds_count") == 3
    assert delta("loraplex:e2e_request_latency_seconds_count") == 3
    assert delta("loraplex:inter_token_latency_seconds_count") == 3  # one gap per request
    assert delta("loraplex:generation_tokens_total") == 6
    assert delta('loraplex:request_success_total{finished_reason="length"}') == 3
    assert after["loraplex:num_requests_running"] == 0
    assert after["loraplex:adapters_registered"] >= 2
    assert after["loraplex:adapter_cache_hits_total"] + after["loraplex:adapter_cache_misses_total"] >= 3
    assert after["loraplex:adapter_loads_total"] >= 2 and after["loraplex:adapter_load_seconds_total"] > 0


def test_metrics_need_an_admin_key(server: RunningServer) -> None:
    with server.http() as http:
        assert http.get("/metrics").status_code == 401
    with server.http(A_KEY) as http:
        response = http.get("/metrics")
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"


def test_disconnect_mid_stream_aborts_and_frees_the_request(server: RunningServer) -> None:
    before = server.metrics(ADMIN_KEY)
    body = {"model": server.base_id, "prompt": "Hi", "max_tokens": 500, "stream": True,
            "ignore_eos": True}
    with server.http(A_KEY) as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection mid-stream
    aborted = 'loraplex:request_success_total{finished_reason="abort"}'
    server.wait_for(lambda: server.metrics(ADMIN_KEY).get(aborted, 0) == before.get(aborted, 0) + 1,
                    "the abort")
    after = server.metrics(ADMIN_KEY)
    assert after["loraplex:num_requests_running"] == 0
    assert after["loraplex:num_requests_waiting"] == 0
    assert after["loraplex:kv_cache_usage_ratio"] == 0  # its KV blocks are free again
    assert after["loraplex:generation_tokens_total"] - before["loraplex:generation_tokens_total"] < 500


def test_disconnect_while_waiting_for_a_whole_response_aborts(server: RunningServer) -> None:
    import httpx

    before = server.metrics(ADMIN_KEY)
    aborted = 'loraplex:request_success_total{finished_reason="abort"}'
    body = {"model": server.base_id, "prompt": "Hi", "max_tokens": 500, "ignore_eos": True}
    with server.http(A_KEY) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.2))
    server.wait_for(lambda: server.metrics(ADMIN_KEY).get(aborted, 0) == before.get(aborted, 0) + 1,
                    "the abort")
    assert server.metrics(ADMIN_KEY)["loraplex:kv_cache_usage_ratio"] == 0
