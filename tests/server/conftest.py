"""Real uvicorn servers on 127.0.0.1 for the server tests, and the adapters they serve.

The base is the session's tiny random Llama (hidden 64, 2 layers) carrying the default
model's tokenizer, so text prompts and the chat template work and a step takes about a
millisecond. Its text is gibberish, so tests compare the server with the offline engine
on the same weights instead of reading the text. Adapters are real PEFT adapters made on
that base with ``get_peft_model`` + ``save_pretrained``.
"""
from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from loraplex import LLM
from loraplex.config import EngineConfig, ServerConfig
from loraplex.server.api import ServerState
from loraplex.server.launch import DrainingServer, build_state, uvicorn_config

A_KEY, B_KEY, ADMIN_KEY, NO_TENANT_KEY = ("sk-tenant-a-0001", "sk-tenant-b-0002",
                                          "sk-admin-0003", "sk-no-tenant-0004")
KEYS = {"keys": {A_KEY: {"tenant": "a"}, B_KEY: {"tenant": "b"},
                 ADMIN_KEY: {"tenant": None, "admin": True}, NO_TENANT_KEY: {"tenant": None}}}
ENGINE_OPTIONS: dict[str, Any] = dict(dtype="float32", kv_cache_gib=0.01, num_threads=1,
                                      max_loras=4, max_lora_rank=8)


def make_lora(base: Path, dest: Path, seed: int, r: int = 4) -> Path:
    """A PEFT adapter on ``base`` with random lora_B (PEFT starts it at zero, which would
    make the adapter a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param))
    peft_model.save_pretrained(dest)
    return dest


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, prefix + file.name)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def server_base(tiny_model: Callable[..., Path]) -> Path:
    return tiny_model()


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, server_base: Path) -> Path:
    """alpha, beta, gamma: three valid adapters under one root."""
    root = tmp_path_factory.mktemp("adapter_root")
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        make_lora(server_base, root / name, seed)
    return root


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


class RunningServer:
    """One uvicorn server in a background thread of the test process."""

    def __init__(self, state: ServerState, **uvicorn_options: Any) -> None:
        self.state = state
        self.server = DrainingServer(uvicorn_config(state, port=0, log_level="warning",
                                                    **uvicorn_options), state)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "the server failed to start (see the log)"
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.base_id = state.base_model_id

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "unused", max_retries=0,
                             timeout=60)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def metrics(self, key: str | None = None) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        with self.http(key) as http:
            response = http.get("/metrics")
        assert response.status_code == 200, response.text
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Poll until ``condition()``; bounded, fails naming ``what``."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="session")
def start_server(server_base: Path) -> Iterator[Callable[..., RunningServer]]:
    """``start_server(state_dir=..., adapters={...}, engine={...}, **server_config)``;
    every server still running at the end of the session is stopped."""
    running: list[RunningServer] = []
    threads = torch.get_num_threads()

    def start(adapters: dict[str, str] | None = None, engine: dict[str, Any] | None = None,
              **server_options: Any) -> RunningServer:
        engine_config = EngineConfig.from_flat(model=str(server_base),
                                               **{**ENGINE_OPTIONS, **(engine or {})})
        state = build_state(engine_config, ServerConfig(port=0, **server_options), adapters)
        server = RunningServer(state)
        running.append(server)
        return server

    yield start
    for server in running:
        if server.thread.is_alive():
            server.stop()
    torch.set_num_threads(threads)  # the engine set it to 1 for the whole process


@pytest.fixture(scope="module")
def server(start_server: Callable[..., RunningServer], keys_file: Path, adapter_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Keys for tenants a and b and an admin; shared adapter shared-alpha (command line),
    a's own a-beta (loaded by the admin); uploads up to 1 MiB. One per test module."""
    s = start_server(adapters={"shared-alpha": str(adapter_root / "alpha")},
                     api_keys=str(keys_file), adapter_root=str(adapter_root),
                     state_dir=str(tmp_path_factory.mktemp("state")), max_upload_mib=1)
    with s.http(ADMIN_KEY) as http:  # tenant a's own adapter, registered by the admin
        response = http.post("/v1/load_lora_adapter",
                             json={"lora_name": "a-beta", "lora_path": "beta", "tenant": "a"})
        assert response.status_code == 200, response.text
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(server_base: Path) -> LLM:
    """The oracle: the same weights through the offline engine."""
    return LLM(str(server_base), **ENGINE_OPTIONS)
