"""Unpack an uploaded zip or tar of a PEFT folder, refusing anything that could escape.

Nothing in an archive is trusted: every member name is checked (no absolute path, no
``..``, no backslash), only regular files and folders are written (symlinks, hard links
and devices are refused, so nothing written can point outside the target), and the bytes
actually unpacked are counted against a limit, whatever sizes the headers claim. Any
refusal leaves the caller to delete the half-written target.
"""
from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from loraplex.lora.adapter import CONFIG_FILE

_CHUNK = 1 << 20
_IGNORED_TOP = {"__MACOSX"}  # resource forks that macOS's zip adds


_Member = tuple[str, str, Callable[[], IO[bytes]] | None]  # name, file | dir, opener


class ArchiveError(ValueError):
    """A malformed or unsafe archive."""


class ArchiveTooLargeError(ArchiveError):
    """The unpacked files exceed the limit."""


def member_path(name: str) -> PurePosixPath | None:
    """The safe relative path of a member, None for the archive's root itself."""
    if "\\" in name or "\x00" in name:
        raise ArchiveError(f"archive member {name!r}: backslashes and NUL are not allowed")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} escapes the adapter folder")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def extract_archive(file: IO[bytes], dest: Path, max_bytes: int, max_members: int = 256) -> None:
    """Unpack the zip or tar (optionally gzip, bz2 or xz) in ``file`` into the new folder ``dest``."""
    dest.mkdir(parents=True)
    file.seek(0)
    if zipfile.is_zipfile(file):
        file.seek(0)
        members = _zip_members(file)
    else:
        file.seek(0)
        try:
            tar = tarfile.open(fileobj=file, mode="r:*")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArchiveError(f"file: expected a zip or tar archive of a PEFT folder ({e})") from e
        members = _tar_members(tar)
    total = 0
    for i, (name, kind, reader) in enumerate(members):
        if i >= max_members:
            raise ArchiveError(f"archive: more than {max_members} members")
        rel = member_path(name)
        if rel is None:
            continue
        target = dest.joinpath(*rel.parts)
        if kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        if target.exists():
            raise ArchiveError(f"archive member {name!r} appears twice")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert reader is not None
        with reader() as src, open(target, "xb") as out:
            while chunk := src.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise ArchiveTooLargeError(f"archive: unpacks to more than {max_bytes} bytes")
                out.write(chunk)


def _zip_members(file: IO[bytes]) -> Iterator[_Member]:
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"file: a damaged zip archive ({e})") from e
    with archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"archive member {info.filename!r} is a symlink; "
                                   "only files and folders are accepted")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive member {info.filename!r} is encrypted")
            kind = "dir" if info.is_dir() else "file"
            yield info.filename, kind, lambda info=info: archive.open(info)


def _tar_members(tar: tarfile.TarFile) -> Iterator[_Member]:
    with tar:
        try:
            for member in tar:
                if member.isdir():
                    yield member.name, "dir", None
                elif member.isfile():
                    yield member.name, "file", lambda member=member: tar.extractfile(member)
                else:
                    kind = "link" if member.issym() or member.islnk() else "special file"
                    raise ArchiveError(f"archive member {member.name!r} is a {kind}; only "
                                       "files and folders are accepted")
        except (tarfile.TarError, EOFError) as e:
            raise ArchiveError(f"file: a damaged tar archive ({e})") from e


def find_adapter_folder(root: Path) -> Path:
    """The unpacked PEFT folder: ``root`` itself, or its one top folder."""
    if (root / CONFIG_FILE).is_file():
        return root
    tops = [p for p in root.iterdir() if p.name not in _IGNORED_TOP]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / CONFIG_FILE).is_file():
        return tops[0]
    raise ArchiveError(f"file: the archive holds no {CONFIG_FILE} at its top or in its one "
                       "top folder")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
