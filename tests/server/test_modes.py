"""Serving modes: ``dedicated`` (one adapter merged at load, nothing else) and ``shared``
with ``--auto-merge`` (merge decisions counted in /metrics, outputs unchanged)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.config import EngineConfig, ServerConfig
from loraplex.server.launch import build_state

from .conftest import ADMIN_KEY, ENGINE_OPTIONS

# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
PROMPTS = ["Hello there", "Once upon a time", "The weather today"]


def offline_texts(llm: LLM, lora: LoRARequest | None = None) -> list[str]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [o.text for o in llm.generate(PROMPTS, params, lora=lora)]


def test_dedicated_serves_the_merged_adapter_alone(start_server: Callable, server_base: Path,
                                                   adapter_root: Path, tmp_path: Path) -> None:
    alpha = adapter_root / "alpha"
    server = start_server(engine={"merge": str(alpha)}, mode="dedicated",
                          adapter_root=str(adapter_root), state_dir=str(tmp_path / "state"))
    try:
        assert server.base_id == "alpha"
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["alpha"]
        texts = [client.completions.create(model="alpha", prompt=p, max_tokens=8, **GREEDY)
                 .choices[0].text for p in PROMPTS]
        # float32: the merged weights answer as the unmerged adapter does, not as the base.
        offline = LLM(str(server_base), **ENGINE_OPTIONS)
        assert texts == offline_texts(offline, LoRARequest("alpha", str(alpha)))
        assert texts != offline_texts(offline)
        with server.http(ADMIN_KEY) as http:
            response = http.post("/v1/load_lora_adapter",
                                 json={"lora_name": "beta", "lora_path": "beta"})
        assert response.status_code == 400 and "LoRA off" in response.json()["error"]["message"]
    finally:
        server.stop()


def test_mode_and_merge_must_agree(server_base: Path, adapter_root: Path) -> None:
    def build(mode: str, adapters: dict[str, str] | None = None, **engine: str) -> None:
        build_state(EngineConfig.from_flat(model=str(server_base), **ENGINE_OPTIONS, **engine),
                    ServerConfig(port=0, mode=mode), adapters)

    with pytest.raises(ValueError, match="--merge PATH"):
        build("dedicated")
    with pytest.raises(ValueError, match="--mode dedicated"):
        build("shared", merge=str(adapter_root / "alpha"))
    with pytest.raises(ValueError, match="only the --merge adapter"):
        build("dedicated", {"beta": str(adapter_root / "beta")}, merge=str(adapter_root / "alpha"))


def test_auto_merge_is_counted_and_changes_no_output(start_server: Callable, server_base: Path,
                                                     adapter_root: Path, tmp_path: Path) -> None:
    server = start_server(adapters={"alpha": str(adapter_root / "alpha"),
                                    "beta": str(adapter_root / "beta")},
                          engine={"auto_merge": True, "auto_merge_window": 2},
                          state_dir=str(tmp_path / "state"))
    try:
        client = server.client()
        # alpha alone for a while (merged), then beta alone (alpha unmerged, beta merged).
        got = {name: [client.completions.create(model=name, prompt=p, max_tokens=8, **GREEDY)
                      .choices[0].text for p in PROMPTS * 2] for name in ("alpha", "beta")}
        metrics = server.metrics()
        assert metrics['loraplex:adapter_runtime_merges_total{action="merge"}'] >= 2
        assert metrics['loraplex:adapter_runtime_merges_total{action="unmerge"}'] >= 1
    finally:
        server.stop()
    offline = LLM(str(server_base), **ENGINE_OPTIONS)
    for name in ("alpha", "beta"):
        assert got[name] == offline_texts(offline, LoRARequest(name, str(adapter_root / name))) * 2
