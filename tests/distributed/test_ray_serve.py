"""loraplex on a local Ray cluster: 2 replicas of the tiny model behind the router.

One Ray cluster and one Serve application for the whole module (Ray starts slowly on a
small machine). The replicas share one state folder; alpha..delta are command-line
adapters on every replica, and each replica holds at most two adapters for affinity.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from loraplex import LLM, SamplingParams  # noqa: E402
from loraplex.config import EngineConfig, ServerConfig  # noqa: E402
from loraplex.distributed import build_app  # noqa: E402
from loraplex.distributed.config import RayServeConfig  # noqa: E402
from loraplex.distributed.replica import REPLICA_HEADER  # noqa: E402
from loraplex.lora.request import LoRARequest  # noqa: E402
from server.conftest import (A_KEY, ADMIN_KEY, B_KEY, ENGINE_OPTIONS, KEYS,  # noqa: E402
                             make_lora, zip_folder)

ADAPTERS = ("alpha", "beta", "gamma", "delta")
APP = "loraplex-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, url: str, base_id: str, root: Path) -> None:
        self.url = url
        self.base_id = base_id
        self.root = root

    def client(self, key: str = ADMIN_KEY, max_retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=max_retries,
                             timeout=120)

    def http(self, key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                            timeout=120)

    def complete(self, model: str, key: str = ADMIN_KEY, max_retries: int = 0,
                 prompt: str = "The capital of France is") -> tuple[str, str]:
        """(text, the replica that answered)."""
        raw = self.client(key, max_retries).completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=4, temperature=0)
        return raw.parse().choices[0].text, raw.headers[REPLICA_HEADER]

    def replica_status(self) -> tuple[str, dict[str, int]]:
        deployment = serve.status().applications[APP].deployments["LoraplexReplica"]
        return (str(getattr(deployment.status, "value", deployment.status)),
                {str(getattr(state, "value", state)): num
                 for state, num in deployment.replica_states.items()})

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def adapters_dir(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_adapters")
    for seed, name in enumerate(ADAPTERS):
        make_lora(tiny_model(), root / name, seed)
    return root


@pytest.fixture(scope="module")
def cluster(tiny_model: Callable[..., Path], adapters_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    keys = tmp_path_factory.mktemp("ray_keys") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    engine_config = EngineConfig.from_flat(model=str(tiny_model()), **ENGINE_OPTIONS)
    server_config = ServerConfig(api_keys=str(keys), adapter_root=str(adapters_dir),
                                 state_dir=str(tmp_path_factory.mktemp("ray_state")))
    ray_config = RayServeConfig(replicas=2, max_adapters_per_replica=2, replica_num_cpus=1,
                                affinity_slack=2, app_name=APP)
    app = build_app(engine_config, server_config, ray_config,
                    {name: str(adapters_dir / name) for name in ADAPTERS})
    # 3 logical CPUs: two replicas, and room for a replacement while a killed one goes.
    ray.init(num_cpus=3, include_dashboard=False, namespace="loraplex-test",
             log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=APP, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", str(tiny_model()), adapters_dir)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_same_api_and_answers_as_the_offline_engine(cluster: Cluster,
                                                    tiny_model: Callable[..., Path]) -> None:
    threads = torch.get_num_threads()
    try:  # the oracle: the same weights through the offline engine in this process
        offline = LLM(str(tiny_model()), **ENGINE_OPTIONS)
        params = SamplingParams(max_tokens=4, temperature=0)
        prompt = "The capital of France is"
        for model in (cluster.base_id, "alpha", "gamma"):
            is_base = model == cluster.base_id
            lora = None if is_base else LoRARequest(model, str(cluster.root / model))
            expected = offline.generate([prompt], params, lora=lora)[0].text
            assert cluster.complete(model)[0] == expected, model
    finally:
        torch.set_num_threads(threads)  # the engine set it to 1 for the whole process

    ids = {m.id for m in cluster.client().models.list().data}
    assert ids == {cluster.base_id, *ADAPTERS}

    chat = dict(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                temperature=0)
    whole = cluster.client().chat.completions.create(**chat).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in cluster.client().chat.completions.create(**chat, stream=True)
                       if chunk.choices)
    assert streamed == whole

    # The single server's error shapes, through the router.
    with pytest.raises(openai.NotFoundError) as missing:
        cluster.complete("no-such-adapter")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        cluster.complete("alpha", key="sk-wrong")
    with cluster.http() as http:
        bad = http.post("/v1/completions", json={"model": "alpha", "prompt": "x",
                                                 "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def books(cluster: Cluster) -> dict[str, dict[str, int]]:
    """/v1/replicas: requests by model, per replica."""
    with cluster.http() as http:
        response = http.get("/v1/replicas")
    assert response.status_code == 200, response.text
    return {row["replica_id"]: row["requests"] for row in response.json()["data"]}


def test_requests_for_an_adapter_concentrate_on_one_replica(cluster: Cluster) -> None:
    served: dict[str, Counter[str]] = {name: Counter() for name in ADAPTERS}
    # First requests: each adapter lands somewhere and loads there. Serve's router learns
    # which replica holds it from the replica's report, a moment later: wait until two
    # requests in a row meet the same replica.
    for name in ADAPTERS:
        cluster.wait_for(lambda: cluster.complete(name)[1] == cluster.complete(name)[1],
                         f"{name} to stay on one replica", timeout=60)
    before = books(cluster)
    for _ in range(5):
        for name in ADAPTERS:
            served[name][cluster.complete(name)[1]] += 1
    for name, counts in served.items():
        replica, top = counts.most_common(1)[0]
        assert top >= 4, f"{name} spread over replicas: {dict(counts)}"
    holders = {counts.most_common(1)[0][0] for counts in served.values()}
    assert len(holders) == 2, f"all adapters went to one replica: {served}"

    # The replicas' own books, as the router collected them, say the same.
    after = books(cluster)
    for name, counts in served.items():
        for replica in after:
            seen = after[replica].get(name, 0) - before.get(replica, {}).get(name, 0)
            assert seen == counts[replica], (name, replica, dict(counts), after)
    with cluster.http(A_KEY) as http:  # per-replica books are for admins
        assert http.get("/v1/replicas").status_code == 403

    # Base-model requests carry no adapter and spread over both replicas.
    base_replicas: Counter[str] = Counter()
    lock = threading.Lock()

    def base_request() -> None:
        replica = cluster.complete(cluster.base_id)[1]
        with lock:
            base_replicas[replica] += 1

    threads = [threading.Thread(target=base_request) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(base_replicas.values()) == 12 and len(base_replicas) == 2, base_replicas


def test_a_busy_holder_shares_its_adapter(cluster: Cluster) -> None:
    """Bounded load: a burst for one adapter fills its holder only up to the slack (2
    requests more than the idlest replica); the surplus goes to the other replica, which
    loads the adapter too. Serve's plain multiplexing would queue all of them on the holder
    (its limit, 64 ongoing requests, is far away)."""
    cluster.wait_for(lambda: cluster.complete("gamma")[1] == cluster.complete("gamma")[1],
                     "gamma to stay on one replica", timeout=60)
    served: Counter[str] = Counter()
    lock = threading.Lock()
    client = cluster.client()

    def long_request() -> None:
        raw = client.completions.with_raw_response.create(
            model="gamma", prompt="Count:", max_tokens=200, temperature=0,
            extra_body={"ignore_eos": True})
        with lock:
            served[raw.headers[REPLICA_HEADER]] += 1

    threads = [threading.Thread(target=long_request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sum(served.values()) == 8 and len(served) == 2, served


def test_uploads_are_visible_to_every_replica(cluster: Cluster) -> None:
    archive = zip_folder(cluster.root / "alpha")
    with cluster.http(A_KEY) as http:
        response = http.post("/v1/adapters", data={"name": "a-upload"},
                             files={"file": ("a.zip", archive, "application/zip")})
        assert response.status_code == 200, response.text
        answered: Counter[str] = Counter()
        for _ in range(12):  # no adapter in the body: these spread over the replicas
            card = http.get("/v1/models/a-upload")
            assert card.status_code == 200, card.text
            answered[card.headers[REPLICA_HEADER]] += 1
    assert len(answered) == 2, answered
    with cluster.http(B_KEY) as http:  # still tenant a's alone
        assert http.get("/v1/models/a-upload").status_code == 404
    text, _ = cluster.complete("a-upload", key=A_KEY)
    assert text == cluster.complete("alpha")[0]  # the same weights as alpha


def test_a_killed_replica_loses_no_retried_request(cluster: Cluster) -> None:
    with cluster.http() as http:  # persisted in the shared registry (not a command-line one)
        response = http.post("/v1/load_lora_adapter",
                             json={"lora_name": "shared-delta", "lora_path": "delta"})
        assert response.status_code == 200, response.text
    before: set[str] = set()
    with cluster.http() as http:  # both replicas' names, from requests that spread
        cluster.wait_for(lambda: len(before) == 2 or before.add(
            http.get("/v1/models/alpha").headers[REPLICA_HEADER]) or False, "both replicas")
    victim = cluster.complete("alpha")[1]
    statuses: list[tuple[int, str | None]] = []  # every answer, retried ones included
    results: list[str] = []
    errors: list[BaseException] = []
    first_done = threading.Event()

    def record(response: httpx.Response) -> None:
        statuses.append((response.status_code, response.headers.get("retry-after")))

    def worker(k: int) -> None:
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=ADMIN_KEY, max_retries=8,
                               timeout=120, http_client=httpx.Client(
                                   event_hooks={"response": [record]}, timeout=120))
        for _ in range(3):
            # All for alpha, so affinity sends them to the victim (up to the slack; the
            # surplus shares the other replica); lengths differ, so when the first
            # finishes the others are still running there.
            try:
                out = client.completions.create(model="alpha", prompt="Count:", temperature=0,
                                                max_tokens=60 + 40 * k,
                                                extra_body={"ignore_eos": True})
                results.append(out.choices[0].text)
            except BaseException as e:  # noqa: BLE001 - the test reports it below
                errors.append(e)
            first_done.set()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    assert first_done.wait(timeout=120)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 18
    lost = [s for s in statuses if s[0] != 200]
    assert lost, "no request was in flight on the killed replica; the test proved nothing"
    assert all(status == 503 and retry_after for status, retry_after in lost), lost

    # Serve replaces the replica; the newcomer reads the shared registry.
    cluster.wait_for(lambda: cluster.replica_status()[1].get("RUNNING") == 2
                     and cluster.replica_status()[0] == "HEALTHY", "two running replicas")
    seen: set[str] = set()
    with cluster.http() as http:

        def newcomer_answers() -> bool:
            card = http.get("/v1/models/shared-delta")
            assert card.status_code == 200, card.text
            seen.add(card.headers[REPLICA_HEADER])
            return bool(seen - before - {victim})

        cluster.wait_for(newcomer_answers, "the new replica to answer")
    assert victim not in seen
    assert cluster.complete("shared-delta")[0] == cluster.complete("delta")[0]


def test_app_builder_for_serve_config_files(tiny_model: Callable[..., Path],
                                            tmp_path: Path) -> None:
    from loraplex.distributed.app import app_builder

    app = app_builder({"model": str(tiny_model()), "replicas": "3", "max_loras": "2",
                       "adapter_affinity": "false", "state_dir": str(tmp_path)})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="unknown option.*'replica'"):
        app_builder({"model": str(tiny_model()), "replica": "3"})
    with pytest.raises(ValueError, match="^replicas: expected int, got 'two'"):
        app_builder({"model": str(tiny_model()), "replicas": "two"})
    with pytest.raises(ValueError, match="^replicas: must be >= 1"):
        app_builder({"model": str(tiny_model()), "replicas": "0"})


def test_a_full_queue_answers_503_with_retry_after(cluster: Cluster,
                                                  tiny_model: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    """One replica taking one request at a time, and room for one more in the router's
    queue: of four long requests at once, some are turned away, as the single server does."""
    engine_config = EngineConfig.from_flat(model=str(tiny_model()), **ENGINE_OPTIONS)
    ray_config = RayServeConfig(replicas=1, max_ongoing_requests=1, max_queued_requests=1,
                                replica_num_cpus=0, app_name="tight")
    serve.run(build_app(engine_config, ServerConfig(state_dir=str(tmp_path)), ray_config),
              name="tight", route_prefix="/tight")
    try:
        answers: list[httpx.Response] = []

        def request() -> None:
            with httpx.Client(base_url=cluster.url + "/tight", timeout=120) as http:
                answers.append(http.post("/v1/completions", json={
                    "model": cluster.base_id, "prompt": "Count:", "max_tokens": 200,
                    "temperature": 0, "ignore_eos": True}))

        threads = [threading.Thread(target=request) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        statuses = sorted(a.status_code for a in answers)
        assert 200 in statuses and 503 in statuses, statuses
        for refused in (a for a in answers if a.status_code == 503):
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
    finally:
        serve.delete("tight")
