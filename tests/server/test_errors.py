"""Every error a client relies on, in OpenAI's shape ``{"error": {message, type, param, code}}``,
as the ``openai`` client raises it. (413 is in test_adapters_api.py, 429 in test_limits.py.)"""
from __future__ import annotations

from typing import Any

import openai
import pytest

from .conftest import A_KEY, RunningServer


def assert_error_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_missing_key_is_401(server: RunningServer) -> None:
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": server.base_id, "prompt": "Hi"})
        assert response.status_code == 401
        assert_error_shape(response.json())
        assert response.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models").status_code == 401


def test_wrong_key_is_401_even_with_a_bad_body(server: RunningServer) -> None:
    client = server.client("sk-not-a-key-at-all")
    with pytest.raises(openai.AuthenticationError) as info:
        client.completions.create(model=server.base_id, prompt="Hi", max_tokens=2)
    assert info.value.code == "invalid_api_key"
    with server.http("sk-not-a-key-at-all") as http:
        assert http.post("/v1/completions", json={"nonsense": 1}).status_code == 401


@pytest.mark.parametrize("params, param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=2), "n"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(extra_body={"top_k": -5}), "top_k"),
    (dict(max_tokens="many"), "max_tokens"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_parameters_are_400_naming_the_parameter(server: RunningServer, params: dict,
                                                     param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client(A_KEY).completions.create(model=server.base_id, prompt="Hi", **params)
    assert info.value.param == param, info.value.body
    assert info.value.type == "invalid_request_error"


def test_chat_specific_parameters(server: RunningServer) -> None:
    client = server.client(A_KEY)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.base_id, messages=messages,
                                       max_completion_tokens=0)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.base_id, messages=messages, logprobs=True,
                                       top_logprobs=50)
    assert info.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.base_id, messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.base_id,
            messages=[{"role": "user", "content": [{"type": "image_url",
                                                    "image_url": {"url": "x"}}]}])
    assert info.value.param.startswith("messages.0.content")


def test_prompt_over_the_context_is_400(server: RunningServer) -> None:
    max_model_len = server.state.engine.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as info:
        server.client(A_KEY).completions.create(model=server.base_id,
                                                prompt="hello " * (max_model_len + 10),
                                                max_tokens=1)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        server.client(A_KEY).chat.completions.create(
            model=server.base_id, max_tokens=1,
            messages=[{"role": "user", "content": "hello " * (max_model_len + 10)}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


def test_max_tokens_past_the_context_is_400(server: RunningServer) -> None:
    max_model_len = server.state.engine.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as info:
        server.client(A_KEY).completions.create(model=server.base_id, prompt="Hi",
                                                max_tokens=max_model_len)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"


def test_token_ids_outside_the_vocabulary_are_400(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client(A_KEY).completions.create(model=server.base_id, prompt=[1, 10**9],
                                                max_tokens=1)
    assert info.value.param == "prompt"


def test_unknown_model_is_404(server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        server.client(A_KEY).chat.completions.create(
            model="gpt-imaginary", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.code == "model_not_found"
    assert_error_shape(info.value.response.json())


def test_unknown_route_is_404_in_the_same_shape(server: RunningServer) -> None:
    with server.http(A_KEY) as http:
        response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert_error_shape(response.json())


def test_malformed_json_is_400(server: RunningServer) -> None:
    with server.http(A_KEY) as http:
        response = http.post("/v1/completions", content=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert_error_shape(response.json())


def test_errors_are_counted_by_status(server: RunningServer) -> None:
    from .conftest import ADMIN_KEY

    before = server.metrics(ADMIN_KEY).get('loraplex:http_errors_total{status="404"}', 0)
    with pytest.raises(openai.NotFoundError):
        server.client(A_KEY).completions.create(model="nope", prompt="Hi")
    after = server.metrics(ADMIN_KEY)['loraplex:http_errors_total{status="404"}']
    assert after == before + 1
