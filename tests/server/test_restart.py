"""The adapter registry survives a restart: loaded and uploaded adapters come back with their
owners, unloaded ones stay gone, and an upload left half-done by a crash is cleaned up."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from loraplex.lora.registry import REGISTRY_FILE

from .conftest import A_KEY, ADMIN_KEY, B_KEY, zip_folder


def greedy(server, key: str, model: str) -> str:
    return server.client(key).completions.create(
        model=model, prompt="Hello", max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].text


def test_registry_survives_restarts(start_server, keys_file: Path, adapter_root: Path,
                                    tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    options = dict(api_keys=str(keys_file), adapter_root=str(adapter_root),
                   state_dir=str(state_dir))
    first = start_server(adapters={"cli-alpha": str(adapter_root / "alpha")}, **options)
    with first.http(ADMIN_KEY) as http:
        assert http.post("/v1/load_lora_adapter",
                         json={"lora_name": "kept", "lora_path": "gamma"}).status_code == 200
    with first.http(A_KEY) as http:
        response = http.post("/v1/adapters", data={"name": "a-up"},
                             files={"file": ("a.zip", zip_folder(adapter_root / "beta"))})
        assert response.status_code == 200, response.text
    text = greedy(first, A_KEY, "a-up")
    first.stop()

    saved = json.loads((state_dir / REGISTRY_FILE).read_text())
    assert {(e["name"], e["owner"]) for e in saved["adapters"]} == {("kept", None), ("a-up", "a")}

    second = start_server(**options)  # no --adapter this time
    assert {m.id for m in second.client(A_KEY).models.list()} == {second.base_id, "kept", "a-up"}
    assert {m.id for m in second.client(B_KEY).models.list()} == {second.base_id, "kept"}
    assert greedy(second, A_KEY, "a-up") == text  # the same weights, from the uploaded copy
    with pytest.raises(openai.NotFoundError):
        greedy(second, B_KEY, "a-up")
    uploaded = Path(second.state.adapters.registry.get("a-up", "a").path)
    with second.http(A_KEY) as http:
        assert http.delete("/v1/adapters/a-up").status_code == 200
    assert not uploaded.exists()  # an unloaded upload's files go too
    second.stop()

    third = start_server(**options)
    assert {m.id for m in third.client(A_KEY).models.list()} == {third.base_id, "kept"}
    third.stop()


def test_leftovers_of_an_interrupted_upload_are_removed_at_start(start_server, tmp_path: Path) -> None:
    uploads = tmp_path / "state" / "uploads"
    (uploads / ".staging-0123").mkdir(parents=True)
    (uploads / ".staging-0123" / "adapter_config.json").write_text("{}")
    (uploads / "f00d").mkdir()  # moved into place, never registered
    server = start_server(state_dir=str(tmp_path / "state"))
    assert list(uploads.iterdir()) == []
    server.stop()


def test_an_unreadable_registry_stops_the_start(start_server, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / REGISTRY_FILE).write_text("{ half a file")
    with pytest.raises(ValueError, match="registry"):
        start_server(state_dir=str(tmp_path / "state"))
    assert (tmp_path / "state" / REGISTRY_FILE).read_text() == "{ half a file"  # kept as is
