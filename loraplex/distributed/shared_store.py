"""The adapter store every replica shares: one state folder on a disk all of them reach.

Replicas run the single server's ``AdapterRegistry`` on the same ``<state_dir>``
(``adapters.json`` + ``uploads/``). Two things make that safe with many writers:

- Before every lookup a replica compares the file's identity (inode, size, mtime) with
  the one it last read and re-reads it when another replica has rewritten it, so an
  adapter loaded or uploaded through any replica is visible to all of them.
- A change (add, remove) takes an exclusive ``flock`` on ``<state_dir>/adapters.lock``,
  re-reads the file, applies itself and writes atomically (the registry's temp + rename),
  so two replicas changing the registry at once never drop each other's entries.

A replica that restarts simply reads the file again. On a network filesystem, ``flock``
must be supported (NFSv4 is); object storage needs a sync to a local folder instead.
"""
from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loraplex.lora.registry import AdapterEntry, AdapterRegistry

logger = logging.getLogger(__name__)

LOCK_FILE = "adapters.lock"
# An upload stages its files before it registers them; a replica that starts meanwhile
# must not delete them as orphans. Uploads take seconds; an hour is far beyond that.
MIN_ORPHAN_AGE_S = 3600.0

FileIdentity = tuple[int, int, int] | None  # (inode, size, mtime_ns); None: no file yet


class SharedAdapterRegistry(AdapterRegistry):
    """An ``AdapterRegistry`` that other processes may change under it."""

    def __init__(self, state_dir: Path) -> None:
        self._seen: FileIdentity = None
        with self._file_lock(state_dir):
            super().__init__(state_dir)
            self._seen = self._identity()

    # ---- reads: refresh first -----------------------------------------------------------

    def resolve(self, name: str, tenant: str | None) -> AdapterEntry | None:
        self.refresh()
        return super().resolve(name, tenant)

    def get(self, name: str, owner: str | None) -> AdapterEntry | None:
        self.refresh()
        return super().get(name, owner)

    def visible_to(self, tenant: str | None) -> list[AdapterEntry]:
        self.refresh()
        return super().visible_to(tenant)

    def all(self) -> list[AdapterEntry]:
        self.refresh()
        return super().all()

    # ---- writes: under the file lock, on the newest state --------------------------------

    def add(self, entry: AdapterEntry, replace: bool = False) -> None:
        with self._file_lock(self._dir):
            self.refresh()
            super().add(entry, replace)
            self._seen = self._identity()

    def remove(self, name: str, owner: str | None) -> AdapterEntry | None:
        with self._file_lock(self._dir):
            self.refresh()
            entry = super().remove(name, owner)
            self._seen = self._identity()
            return entry

    def refresh(self) -> bool:
        """Re-read the file if another process replaced it; True if it did."""
        identity = self._identity()
        if identity == self._seen:
            return False
        with self._lock:
            # Command-line adapters are not in the file; every replica registers its own.
            self._entries = {k: e for k, e in self._entries.items() if e.source == "cli"}
            self._read()
            self._seen = identity
        return True

    @property
    def _dir(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir

    def _identity(self) -> FileIdentity:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    @staticmethod
    @contextmanager
    def _file_lock(state_dir: Path) -> Iterator[None]:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
