"""The adapter registry: names scoped by tenant, persisted atomically, read back on start."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loraplex.lora.registry import (REGISTRY_FILE, AdapterEntry, AdapterRegistry,
                                    NameTakenError)


def entry(name: str, owner: str | None = None, source: str = "api", path: str = "/x") -> AdapterEntry:
    return AdapterEntry(name=name, path=path, owner=owner, source=source)


def test_a_tenant_resolves_its_own_adapter_then_a_shared_one(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.add(entry("bot", owner="a", path="/a/bot"))
    registry.add(entry("common", path="/shared/common"))
    assert registry.resolve("bot", "a").path == "/a/bot"
    assert registry.resolve("bot", "b") is None
    assert registry.resolve("bot", None) is None
    assert registry.resolve("common", "b").path == "/shared/common"
    assert [e.name for e in registry.visible_to("a")] == ["bot", "common"]
    assert [e.name for e in registry.visible_to("b")] == ["common"]


def test_names_are_per_tenant_but_cannot_hide_a_shared_one(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.add(entry("bot", owner="a"))
    registry.add(entry("bot", owner="b"))  # b cannot see a's, so the name is free for b
    with pytest.raises(NameTakenError):
        registry.add(entry("bot", owner="a"))
    registry.add(entry("common"))
    with pytest.raises(NameTakenError):
        registry.add(entry("common", owner="a"))


def test_entries_persist_and_command_line_ones_do_not(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.add(entry("kept", owner="a"))
    registry.add(entry("from-cli", source="cli"))
    registry.add(entry("gone"))
    assert registry.remove("gone", None) is not None
    again = AdapterRegistry(tmp_path)
    assert {(e.name, e.owner) for e in again.all()} == {("kept", "a")}
    assert again.get("kept", "a").created > 0


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.add(entry("first"))
    before = (tmp_path / REGISTRY_FILE).read_text()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        registry.add(entry("second"))
    assert (tmp_path / REGISTRY_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [REGISTRY_FILE]  # no temp file left


def test_an_unreadable_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / REGISTRY_FILE).write_text(json.dumps({"version": 99, "adapters": []}))
    with pytest.raises(ValueError, match="version"):
        AdapterRegistry(tmp_path)


@pytest.mark.parametrize("name", ["", "-lead", "has space", "a/b", "x" * 129, "ümlaut"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="lora_name"):
        entry(name)
