"""Adapter administration over HTTP: load and unload by path (admin, inside the adapter root
only), uploads of zip and tar archives for the caller's tenant, and what is refused."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import A_KEY, ADMIN_KEY, B_KEY, NO_TENANT_KEY, RunningServer, zip_folder


def load(server: RunningServer, key: str, **body: str) -> httpx.Response:
    with server.http(key) as http:
        return http.post("/v1/load_lora_adapter", json=body)


def unload(server: RunningServer, key: str, **body: str) -> httpx.Response:
    with server.http(key) as http:
        return http.post("/v1/unload_lora_adapter", json=body)


def upload(server: RunningServer, key: str, name: str, data: bytes,
           filename: str = "adapter.zip") -> httpx.Response:
    with server.http(key) as http:
        return http.post("/v1/adapters", data={"name": name}, files={"file": (filename, data)})


def model_ids(server: RunningServer, key: str) -> set[str]:
    return {m.id for m in server.client(key).models.list()}


def uploads_on_disk(server: RunningServer) -> set[str]:
    return {p.name for p in server.state.adapters.uploads_dir.iterdir()}


def tar_of(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def folder_members(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + f.name: f.read_bytes() for f in folder.iterdir()}


# ---- load and unload by path ---------------------------------------------------------------

def test_admin_loads_and_unloads_a_shared_adapter(server: RunningServer) -> None:
    response = load(server, ADMIN_KEY, lora_name="g", lora_path="gamma")
    assert response.status_code == 200, response.text
    assert response.json()["parent"] == server.base_id
    assert "g" in model_ids(server, B_KEY)
    result = server.client(B_KEY).completions.create(model="g", prompt="Hi", max_tokens=2)
    assert result.usage.completion_tokens >= 1
    assert unload(server, ADMIN_KEY, lora_name="g").json()["deleted"] is True
    assert "g" not in model_ids(server, B_KEY)
    with pytest.raises(openai.NotFoundError):
        server.client(B_KEY).completions.create(model="g", prompt="Hi", max_tokens=2)
    assert unload(server, ADMIN_KEY, lora_name="g").status_code == 404


def test_load_and_unload_need_an_admin(server: RunningServer) -> None:
    response = load(server, A_KEY, lora_name="g2", lora_path="gamma")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert unload(server, A_KEY, lora_name="shared-alpha").status_code == 403
    assert "g2" not in model_ids(server, ADMIN_KEY)


def test_load_refuses_a_taken_name_and_the_base_id(server: RunningServer) -> None:
    assert load(server, ADMIN_KEY, lora_name="shared-alpha", lora_path="gamma").status_code == 409
    assert load(server, ADMIN_KEY, lora_name=server.base_id, lora_path="gamma").status_code in (400, 409)
    bad_name = load(server, ADMIN_KEY, lora_name="no spaces/here", lora_path="gamma")
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "lora_name"


def test_load_refuses_an_invalid_adapter_and_registers_nothing(server: RunningServer,
                                                               adapter_root: Path) -> None:
    broken = adapter_root / "broken"
    shutil.copytree(adapter_root / "gamma", broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    response = load(server, ADMIN_KEY, lora_name="broken", lora_path="broken")
    assert response.status_code == 400
    assert "use_dora" in response.json()["error"]["message"]
    assert "broken" not in model_ids(server, ADMIN_KEY)


@pytest.mark.parametrize("make_path", [
    lambda root, outside: "../" + outside.name,
    lambda root, outside: "gamma/../../" + outside.name,
    lambda root, outside: str(outside),
    lambda root, outside: "link-out",
    lambda root, outside: "file-link-out",
], ids=["dotdot", "dotdot-inside", "absolute", "symlinked-folder", "symlinked-file"])
def test_paths_outside_the_adapter_root_are_refused(server: RunningServer, adapter_root: Path,
                                                    tmp_path_factory: pytest.TempPathFactory,
                                                    make_path) -> None:
    outside = tmp_path_factory.mktemp("outside_root") / "adapter"
    if not outside.exists():
        shutil.copytree(adapter_root / "gamma", outside)  # a valid adapter, but not under the root
    if not (adapter_root / "link-out").exists():
        os.symlink(outside, adapter_root / "link-out")
        (adapter_root / "file-link-out").mkdir()
        shutil.copy(outside / "adapter_config.json", adapter_root / "file-link-out")
        os.symlink(outside / "adapter_model.safetensors",
                   adapter_root / "file-link-out" / "adapter_model.safetensors")
    response = load(server, ADMIN_KEY, lora_name="escape", lora_path=make_path(adapter_root, outside))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "lora_path"
    assert "escape" not in model_ids(server, ADMIN_KEY)


# ---- uploads -------------------------------------------------------------------------------

def test_tenant_uploads_a_zip_and_only_it_can_use_it(server: RunningServer,
                                                     adapter_root: Path) -> None:
    response = upload(server, A_KEY, "a-up", zip_folder(adapter_root / "gamma", prefix="gamma/"))
    assert response.status_code == 200, response.text
    assert response.json()["owned_by"] == "a" and response.json()["parent"] == server.base_id
    assert "a-up" in model_ids(server, A_KEY) and "a-up" not in model_ids(server, B_KEY)
    server.client(A_KEY).completions.create(model="a-up", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        server.client(B_KEY).completions.create(model="a-up", prompt="Hi", max_tokens=2)
    # b may use the same name for an adapter of its own: names are per tenant
    assert upload(server, B_KEY, "a-up", zip_folder(adapter_root / "alpha")).status_code == 200
    assert upload(server, A_KEY, "a-up", zip_folder(adapter_root / "alpha")).status_code == 409
    with server.http(A_KEY) as http:
        assert http.delete("/v1/adapters/a-up").status_code == 200
    assert "a-up" not in model_ids(server, A_KEY) and "a-up" in model_ids(server, B_KEY)


def test_upload_of_a_tar_gz(server: RunningServer, adapter_root: Path) -> None:
    data = tar_of(folder_members(adapter_root / "beta"))
    response = upload(server, B_KEY, "b-tar", data, "adapter.tar.gz")
    assert response.status_code == 200, response.text
    assert server.client(B_KEY).completions.create(model="b-tar", prompt="Hi", max_tokens=2).usage


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "no-config", "invalid-adapter",
                                  "not-an-archive"])
def test_bad_uploads_are_refused_and_leave_nothing_behind(server: RunningServer,
                                                          adapter_root: Path, case: str,
                                                          tmp_path: Path) -> None:
    good = folder_members(adapter_root / "gamma")
    data = {
        "dotdot": lambda: tar_of({**good, "../../escaped.txt": b"x"}),
        "absolute": lambda: tar_of({**good, str(tmp_path / "escaped.txt"): b"x"}),
        "symlink": lambda: tar_of(good, symlinks={"adapter_model.safetensors.link": "/etc/passwd"}),
        "no-config": lambda: tar_of({"README.md": b"hello"}),
        "invalid-adapter": lambda: tar_of({**good, "adapter_config.json": b'{"peft_type": "IA3"}'}),
        "not-an-archive": lambda: b"plain bytes, neither zip nor tar",
    }[case]()
    before = uploads_on_disk(server)
    response = upload(server, A_KEY, f"bad-{case}", data, "adapter.tar.gz")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "file" or case == "invalid-adapter"
    assert uploads_on_disk(server) == before
    assert f"bad-{case}" not in model_ids(server, A_KEY)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (server.state.adapters.uploads_dir.parent / "escaped.txt").exists()
    if case == "invalid-adapter":  # the engine's reason, without the server's paths
        message = response.json()["error"]["message"]
        assert "peft_type" in message and str(server.state.adapters.uploads_dir) not in message


def test_upload_over_the_size_limit_is_413(server: RunningServer, adapter_root: Path) -> None:
    before = uploads_on_disk(server)
    padding = {"padding.bin": os.urandom(1024 * 1024 + 4096)}  # the limit is 1 MiB
    response = upload(server, A_KEY, "too-big",
                      tar_of({**folder_members(adapter_root / "gamma"), **padding}))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"
    assert uploads_on_disk(server) == before


def test_archive_that_unpacks_past_the_limit_is_413(server: RunningServer,
                                                    adapter_root: Path) -> None:
    bomb = {**folder_members(adapter_root / "gamma"), "zeros.bin": bytes(3 * 1024 * 1024)}
    data = tar_of(bomb)  # gzip packs the zeros into a few KiB
    assert len(data) < 512 * 1024
    before = uploads_on_disk(server)
    response = upload(server, A_KEY, "bomb", data, "adapter.tar.gz")
    assert response.status_code == 413
    assert uploads_on_disk(server) == before


def test_upload_needs_a_tenant_and_its_form_fields(server: RunningServer, adapter_root: Path) -> None:
    data = zip_folder(adapter_root / "gamma")
    assert upload(server, NO_TENANT_KEY, "nt", data).status_code == 403
    with server.http(A_KEY) as http:
        missing_file = http.post("/v1/adapters", data={"name": "x"})
        assert missing_file.status_code == 400 and missing_file.json()["error"]["param"] == "file"
        missing_name = http.post("/v1/adapters", files={"file": ("a.zip", data)})
        assert missing_name.status_code == 400 and missing_name.json()["error"]["param"] == "name"
