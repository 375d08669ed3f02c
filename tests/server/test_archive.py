"""Unpacking uploads: only plain files and folders, nothing outside the target, a byte limit
that counts what is unpacked, not what headers claim."""
from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from loraplex.server.archive import (ArchiveError, ArchiveTooLargeError, extract_archive,
                                     find_adapter_folder, member_path)


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    buffer.seek(0)
    return buffer


def tar_bytes(add) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        add(archive)
    buffer.seek(0)
    return buffer


def test_plain_folder_unpacks(tmp_path: Path) -> None:
    data = zip_bytes({"peft/adapter_config.json": b"{}", "peft/adapter_model.safetensors": b"w"})
    extract_archive(data, tmp_path / "out", max_bytes=1000)
    assert (tmp_path / "out" / "peft" / "adapter_config.json").read_bytes() == b"{}"
    assert find_adapter_folder(tmp_path / "out") == tmp_path / "out" / "peft"


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/abs/evil", "a\\..\\evil"])
def test_escaping_member_names_are_refused(name: str) -> None:
    with pytest.raises(ArchiveError, match="evil"):
        member_path(name)


def test_escaping_zip_member_writes_nothing_outside(tmp_path: Path) -> None:
    data = zip_bytes({"adapter_config.json": b"{}", "../evil.txt": b"x"})
    with pytest.raises(ArchiveError):
        extract_archive(data, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_is_refused(tmp_path: Path) -> None:
    data = zip_bytes({"adapter_config.json": b"{}"}, symlinks={"weights": "/etc/passwd"})
    with pytest.raises(ArchiveError, match="symlink"):
        extract_archive(data, tmp_path / "out", max_bytes=1000)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                  tarfile.FIFOTYPE])
def test_tar_links_and_special_files_are_refused(tmp_path: Path, kind: bytes) -> None:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.type, info.linkname = kind, "/etc/passwd"
        archive.addfile(info)

    with pytest.raises(ArchiveError, match="only files and folders"):
        extract_archive(tar_bytes(add), tmp_path / "out", max_bytes=1000)


def test_limit_counts_unpacked_bytes(tmp_path: Path) -> None:
    data = zip_bytes({"adapter_config.json": b"{}", "big": bytes(5000)})  # deflates to little
    assert len(data.getvalue()) < 1000
    with pytest.raises(ArchiveTooLargeError):
        extract_archive(data, tmp_path / "out", max_bytes=4000)


def test_tar_header_that_lies_about_size_is_still_bounded(tmp_path: Path) -> None:
    def add(archive: tarfile.TarFile) -> None:
        for i in range(3):
            info = tarfile.TarInfo(f"part{i}")
            info.size = 3000
            archive.addfile(info, io.BytesIO(bytes(3000)))

    with pytest.raises(ArchiveTooLargeError):
        extract_archive(tar_bytes(add), tmp_path / "out", max_bytes=8000)


def test_duplicate_members_and_junk_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="twice"):
        extract_archive(zip_bytes({"a": b"1", "./a": b"2"}), tmp_path / "dup", max_bytes=1000)
    with pytest.raises(ArchiveError, match="zip or tar"):
        extract_archive(io.BytesIO(b"not an archive at all"), tmp_path / "junk", max_bytes=1000)


def test_folder_without_adapter_config_is_refused(tmp_path: Path) -> None:
    extract_archive(zip_bytes({"a/readme": b"x", "b/readme": b"y"}), tmp_path / "out", 1000)
    with pytest.raises(ArchiveError, match="adapter_config.json"):
        find_adapter_folder(tmp_path / "out")
