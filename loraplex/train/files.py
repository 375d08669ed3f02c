"""Files written whole or not at all, and content hashes: what checkpoints, logs, adapters
and generated data share."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """``write(tmp_path)`` into a temp file beside ``path``, flush it to disk, rename it onto
    ``path``. A reader, or an interrupt at any moment, sees the old file or the new one,
    never a part; the temp file goes away on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a normal file is what users expect
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
