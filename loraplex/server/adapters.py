"""The server's adapters: names in the ``model`` field, tenant scoping, load, unload, upload.

Every adapter is validated by the engine's own adapter cache before its name is
registered, so a registered name always loaded once. Command-line adapters go through
``AdapterCache.load_now`` before the engine thread starts. At run time the same load runs
in two steps on the engine thread (``prefetch``, then ``take_loaded`` once the background
read is done: ``load_now`` without its blocking wait), so a large adapter never stalls the
running batch.

Uploaded adapters live in ``<state_dir>/uploads/<uuid>``: an archive unpacks into a
staging folder there, the PEFT folder moves into place with ``os.replace``, is validated,
then registered; any failure deletes what was written. Folders that no registry entry
names (a crash between two of those steps) are deleted at start.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path, PurePath
from typing import IO

from loraplex.engine.async_engine import AsyncEngine
from loraplex.lora.adapter import AdapterError
from loraplex.lora.registry import AdapterEntry, AdapterRegistry, NameTakenError, check_name
from loraplex.lora.request import LoRARequest
from loraplex.server.archive import (ArchiveError, ArchiveTooLargeError, extract_archive,
                                     find_adapter_folder, remove_tree)
from loraplex.server.auth import Caller
from loraplex.server.errors import APIError, bad_request, model_not_found

logger = logging.getLogger(__name__)


class AdapterService:
    def __init__(self, registry: AdapterRegistry, engine: AsyncEngine, base_model_id: str,
                 adapter_root: Path | None, uploads_dir: Path, max_upload_bytes: int,
                 min_orphan_age_s: float = 0.0) -> None:
        self.registry = registry
        self.engine = engine
        self.base_model_id = base_model_id
        self.adapter_root = adapter_root.resolve() if adapter_root is not None else None
        uploads_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir = uploads_dir.resolve()
        self.max_upload_bytes = max_upload_bytes
        self._remove_orphan_uploads(min_orphan_age_s)

    # ---- names --------------------------------------------------------------------------

    def resolve(self, model: str, caller: Caller) -> tuple[LoRARequest | None, AdapterEntry | None]:
        """(None, None) for the base model; 404 for a name this caller cannot use."""
        if model == self.base_model_id:
            return None, None
        entry = self.registry.resolve(model, caller.tenant)
        if entry is None:
            raise model_not_found(model)
        return LoRARequest(entry.name, entry.path), entry

    def _check_new_name(self, name: str, owner: str | None) -> None:
        try:
            check_name(name)
        except ValueError as e:
            raise bad_request(e, param="lora_name") from None
        if name == self.base_model_id:
            raise APIError(409, f"lora_name: {name!r} is the base model's id", param="lora_name",
                           code="name_taken")
        taken = self.registry.get(name, owner) or (owner is not None and self.registry.get(name, None))
        if taken:
            raise APIError(409, f"lora_name: {name!r} is already registered", param="lora_name",
                           code="name_taken")

    # ---- validation ---------------------------------------------------------------------

    async def validate(self, name: str, folder: Path, shown_as: str | None = None) -> None:
        """Load ``folder`` through the engine's adapter cache; 400 with its reason if refused.
        ``shown_as`` replaces the folder's path in messages (uploads: the caller's name)."""
        if self.engine.engine.adapters is None:
            raise APIError(400, "lora_name: this server runs with --max-loras 0 (LoRA off)",
                           param="lora_name", code="lora_disabled")
        request = LoRARequest(name, str(folder))
        future = await self.engine.run(lambda e: e.adapters.prefetch(request))
        try:
            adapter = await asyncio.wrap_future(future)
        except (AdapterError, OSError) as e:
            message = str(e) if shown_as is None else str(e).replace(str(folder), shown_as)
            raise APIError(400, message, param="lora_path", code="invalid_adapter") from None
        await self.engine.run(lambda e: e.adapters.take_loaded(adapter))

    def path_in_root(self, lora_path: str) -> Path:
        """The folder ``lora_path`` names, which must lie inside ``--adapter-root`` after
        every symlink is followed; relative paths are relative to the root."""
        root = self.adapter_root
        if root is None:
            raise APIError(400, "lora_path: loading adapters by path is off; start the server "
                           "with --adapter-root", param="lora_path", code="adapter_root_unset")

        def refuse(why: str) -> APIError:
            return APIError(400, f"lora_path: {lora_path!r} {why}", param="lora_path",
                            code="invalid_path")

        if not lora_path or "\x00" in lora_path:
            raise refuse("is empty or holds NUL")
        if ".." in PurePath(lora_path).parts:
            raise refuse("holds '..'")
        candidate = Path(lora_path) if Path(lora_path).is_absolute() else root / lora_path
        try:
            folder = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            raise refuse("is not a folder under the adapter root") from None
        if not folder.is_relative_to(root):
            raise refuse("lies outside the adapter root")
        if not folder.is_dir():
            raise refuse("is not a folder")
        for child in folder.iterdir():  # a file inside may itself link out of the root
            if not child.resolve().is_relative_to(root):
                raise refuse(f"holds {child.name!r}, which links outside the adapter root")
        return folder

    # ---- changes ------------------------------------------------------------------------

    def register_startup(self, adapters: dict[str, str]) -> None:
        """Command-line adapters: shared, validated, not persisted. Runs before the engine
        thread starts (it loads on this thread), so a bad one stops the start cleanly."""
        assert not self.engine.is_alive, "the engine thread must not run yet"
        for name, path in adapters.items():
            check_name(name)
            folder = Path(path).expanduser().resolve()
            if self.engine.engine.adapters is None:
                raise ValueError(f"adapter: {name}: this server runs with --max-loras 0")
            try:
                self.engine.engine.adapters.load_now(LoRARequest(name, str(folder)))
            except (AdapterError, OSError) as e:
                raise ValueError(f"adapter: {name}: {e}") from None
            self.registry.add(AdapterEntry(name, str(folder), None, "cli"), replace=True)
            logger.info("adapter %s: %s", name, folder)

    async def load(self, name: str, lora_path: str, owner: str | None) -> AdapterEntry:
        self._check_new_name(name, owner)
        folder = self.path_in_root(lora_path)
        await self.validate(name, folder)
        return self._add(AdapterEntry(name, str(folder), owner, "api"))

    async def upload(self, name: str, owner: str | None, archive: IO[bytes]) -> AdapterEntry:
        self._check_new_name(name, owner)
        staging = self.uploads_dir / f".staging-{uuid.uuid4().hex}"
        final = self.uploads_dir / uuid.uuid4().hex
        try:
            try:
                await asyncio.to_thread(extract_archive, archive, staging, self.max_upload_bytes)
                folder = find_adapter_folder(staging)
            except ArchiveTooLargeError as e:
                raise APIError(413, str(e), param="file", code="upload_too_large") from None
            except ArchiveError as e:
                raise bad_request(e, param="file", code="invalid_archive") from None
            os.replace(folder, final)
            await self.validate(name, final, shown_as=name)
            return self._add(AdapterEntry(name, str(final), owner, "upload"))
        except BaseException:
            remove_tree(final)
            raise
        finally:
            remove_tree(staging)

    async def unload(self, name: str, owner: str | None) -> AdapterEntry:
        entry = self.registry.get(name, owner)
        if entry is None:
            raise model_not_found(name)
        if entry.source == "cli":
            raise APIError(400, f"lora_name: {name!r} was given on the command line; restart "
                           "without it instead", param="lora_name", code="cli_adapter")
        self.registry.remove(name, owner)
        if entry.source == "upload" and Path(entry.path).parent == self.uploads_dir:
            remove_tree(Path(entry.path))
        return entry

    def _add(self, entry: AdapterEntry) -> AdapterEntry:
        try:
            self.registry.add(entry)
        except NameTakenError as e:  # registered meanwhile by a concurrent call
            raise APIError(409, str(e), param="lora_name", code="name_taken") from None
        logger.info("adapter %s (owner %s, %s): %s", entry.name, entry.owner or "shared",
                    entry.source, entry.path)
        return self.registry.get(entry.name, entry.owner) or entry

    def _remove_orphan_uploads(self, min_age_s: float) -> None:
        """``min_age_s`` spares young folders: with replicas sharing the folder, another
        one may be between unpacking an upload and registering it."""
        named = {Path(e.path) for e in self.registry.all() if e.source == "upload"}
        now = time.time()
        for child in self.uploads_dir.iterdir():
            if child not in named and now - child.lstat().st_mtime >= min_age_s:
                logger.warning("removing %s: an upload no registry entry names", child)
                remove_tree(child) if child.is_dir() else child.unlink(missing_ok=True)
