"""Adapter names a server answers to: name -> (PEFT folder, owner tenant or None = shared).

Names are scoped by owner: tenant a's ``bot`` and tenant b's ``bot`` are two adapters, and
neither tenant can learn that the other's exists. A tenant resolves a name to its own
adapter first, then to a shared one. Adapters registered at run time (loaded by an admin,
uploaded by a tenant) are persisted in ``<state_dir>/adapters.json``, rewritten atomically
(a temporary file in the same folder, fsync, ``os.replace``) on every change, and read back
on start. Adapters given on the command line are not persisted: the command line says
them again at every start.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REGISTRY_FILE = "adapters.json"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SOURCES = ("cli", "api", "upload")


class NameTakenError(ValueError):
    """The name is already used by an adapter the owner can see."""


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: str  # absolute PEFT folder
    owner: str | None = None  # tenant; None = shared, visible to every caller
    source: str = "api"  # cli | api | upload (an uploaded folder belongs to the server)
    created: int = 0  # unix seconds

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.owner is not None and (not isinstance(self.owner, str) or not self.owner):
            raise ValueError(f"owner: expected a non-empty string or None, got {self.owner!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source: expected one of {SOURCES}, got {self.source!r}")

    @property
    def is_shared(self) -> bool:
        return self.owner is None


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"lora_name: expected 1-128 characters of letters, digits and . _ : - "
                         f"starting with a letter or digit, got {name!r}")
    return name


class AdapterRegistry:
    """Thread-safe; ``state_dir=None`` keeps everything in memory only."""

    def __init__(self, state_dir: Path | None) -> None:
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._entries: dict[tuple[str | None, str], AdapterEntry] = {}  # (owner, name)
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._read()

    @property
    def file(self) -> Path | None:
        return self.state_dir / REGISTRY_FILE if self.state_dir is not None else None

    def resolve(self, name: str, tenant: str | None) -> AdapterEntry | None:
        """The adapter ``name`` means for ``tenant``: its own first, then a shared one."""
        with self._lock:
            if tenant is not None and (tenant, name) in self._entries:
                return self._entries[(tenant, name)]
            return self._entries.get((None, name))

    def get(self, name: str, owner: str | None) -> AdapterEntry | None:
        with self._lock:
            return self._entries.get((owner, name))

    def visible_to(self, tenant: str | None) -> list[AdapterEntry]:
        """Shared adapters and ``tenant``'s own, one per name (its own wins), by name."""
        with self._lock:
            seen = {e.name: e for e in self._entries.values() if e.owner is None}
            if tenant is not None:
                seen.update({e.name: e for e in self._entries.values() if e.owner == tenant})
        return sorted(seen.values(), key=lambda e: e.name)

    def all(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._entries.values())

    def add(self, entry: AdapterEntry, replace: bool = False) -> None:
        """Register ``entry``. A tenant may not take a name its own adapters or the shared
        ones use (a shared name may shadow nothing the tenant could not already see)."""
        with self._lock:
            key = (entry.owner, entry.name)
            if not replace:
                if key in self._entries:
                    raise NameTakenError(f"lora_name: {entry.name!r} is already registered")
                if entry.owner is not None and (None, entry.name) in self._entries:
                    raise NameTakenError(f"lora_name: {entry.name!r} is the name of a shared "
                                         "adapter")
            if entry.created == 0:
                entry = AdapterEntry(**{**asdict(entry), "created": int(time.time())})
            replaced = self._entries.get(key)
            self._entries[key] = entry
            if entry.source != "cli" or (replaced is not None and replaced.source != "cli"):
                self._write()

    def remove(self, name: str, owner: str | None) -> AdapterEntry | None:
        with self._lock:
            entry = self._entries.pop((owner, name), None)
            if entry is not None and entry.source != "cli":
                self._write()
            return entry

    # ---- persistence --------------------------------------------------------------------

    def _read(self) -> None:
        assert self.file is not None
        if not self.file.exists():
            return
        try:
            data = json.loads(self.file.read_text())
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"version: expected {FORMAT_VERSION}, got {data.get('version')!r}")
            entries = [AdapterEntry(**item) for item in data["adapters"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # Refuse to start rather than forget every tenant's adapters on the next write.
            raise ValueError(f"adapter registry {self.file} is unreadable: {e}") from e
        for entry in entries:
            if not Path(entry.path).is_dir():
                logger.warning("adapter %r (owner %r): folder %s is gone; requests for it "
                               "will fail until it is unloaded", entry.name, entry.owner, entry.path)
            self._entries[(entry.owner, entry.name)] = entry
        logger.info("adapter registry: %d adapter(s) from %s", len(entries), self.file)

    def _write(self) -> None:
        """Write every persisted entry atomically: readers see the old file or the new one."""
        if self.state_dir is None:
            return
        assert self.file is not None
        entries = sorted((asdict(e) for e in self._entries.values() if e.source != "cli"),
                         key=lambda d: (d["owner"] or "", d["name"]))
        text = json.dumps({"version": FORMAT_VERSION, "adapters": entries}, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".adapters-", suffix=".json", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
