"""The queue limit (429 with Retry-After) and refusals while draining (503), on an open server
(no key file) whose batch holds one sequence and whose queue holds one more."""
from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .conftest import RunningServer


@pytest.fixture(scope="module")
def small(start_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(engine={"max_num_seqs": 1}, max_queue=1,
                     state_dir=str(tmp_path_factory.mktemp("state")))
    yield s
    s.stop()


def long_stream_body(server: RunningServer) -> dict:
    return {"model": server.base_id, "prompt": "Hi", "max_tokens": 500, "ignore_eos": True,
            "stream": True}


def gauge(server: RunningServer, name: str) -> float:
    return server.metrics()[f"loraplex:{name}"]


def test_a_full_queue_answers_429_with_retry_after(small: RunningServer) -> None:
    client = small.client()
    with small.http() as first_http, small.http() as second_http:
        with first_http.stream("POST", "/v1/completions", json=long_stream_body(small)) as first:
            assert first.status_code == 200
            small.wait_for(lambda: gauge(small, "num_requests_running") == 1, "one running")
            with second_http.stream("POST", "/v1/completions",
                                    json=long_stream_body(small)) as second:
                assert second.status_code == 200
                small.wait_for(lambda: gauge(small, "num_requests_waiting") == 1, "one waiting")
                with pytest.raises(openai.RateLimitError) as info:
                    client.completions.create(model=small.base_id, prompt="Hi", max_tokens=1)
                retry_after = info.value.response.headers["retry-after"]
                assert retry_after.isdigit() and int(retry_after) >= 1
                assert info.value.type == "rate_limit_error" and info.value.code == "queue_full"
                # a chat request counts against the same queue
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model=small.base_id, max_tokens=1,
                                                   messages=[{"role": "user", "content": "Hi"}])
    # both streams were dropped: the queue drains and requests are accepted again
    small.wait_for(lambda: gauge(small, "num_requests_running") == 0
                   and gauge(small, "num_requests_waiting") == 0, "the queue to drain")
    result = client.completions.create(model=small.base_id, prompt="Hi", max_tokens=2)
    assert result.usage.completion_tokens >= 1
    assert small.metrics()['loraplex:http_errors_total{status="429"}'] == 2


def test_open_server_lets_any_caller_administer(small: RunningServer) -> None:
    with small.http() as http:  # no key at all
        assert http.get("/v1/models").status_code == 200
        assert http.get("/metrics").status_code == 200
        # loading by path is off without --adapter-root, and says so
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "adapter_root_unset"


def test_draining_server_refuses_new_requests_with_503(small: RunningServer) -> None:
    engine = small.state.engine
    engine.is_accepting = False  # what SIGTERM does first (launch.DrainingServer)
    try:
        with small.http() as http:
            assert http.get("/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            small.client().completions.create(model=small.base_id, prompt="Hi", max_tokens=1)
        assert info.value.status_code == 503
    finally:
        engine.is_accepting = True
    assert small.client().completions.create(model=small.base_id, prompt="Hi", max_tokens=1)
