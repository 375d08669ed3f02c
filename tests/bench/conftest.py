"""A real server (the server tests' tiny Llama with the default model's tokenizer and real
PEFT adapters, started in-process by tests/server/conftest.py's ``RunningServer``)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loraplex.config import EngineConfig, ServerConfig
from loraplex.server.launch import build_state
from server.conftest import ENGINE_OPTIONS, RunningServer, make_lora  # tests/ is on sys.path


@pytest.fixture(scope="session")
def bench_base(tiny_model: Callable[..., Path]) -> Path:
    return tiny_model()


@pytest.fixture(scope="session")
def bench_adapters(tmp_path_factory: pytest.TempPathFactory, bench_base: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_adapters")
    return {name: make_lora(bench_base, root / name, seed) for seed, name in enumerate(("ad1", "ad2"))}


@pytest.fixture(scope="module")
def bench_server(bench_base: Path, bench_adapters: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    import torch

    threads = torch.get_num_threads()
    engine_config = EngineConfig.from_flat(model=str(bench_base), **ENGINE_OPTIONS)
    state = build_state(engine_config, ServerConfig(port=0, state_dir=str(tmp_path_factory.mktemp("state"))),
                        {name: str(path) for name, path in bench_adapters.items()})
    server = RunningServer(state)
    yield server
    server.stop()
    torch.set_num_threads(threads)
