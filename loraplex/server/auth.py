"""API keys: who is calling, which tenant's adapters they see, whether they administer.

The key file (``--api-keys FILE``) is JSON::

    {"keys": {
        "sk-alice-...": {"tenant": "alice"},
        "sk-bob-...":   {"tenant": "bob"},
        "sk-ops-...":   {"tenant": null, "admin": true}
    }}

A caller sends ``Authorization: Bearer KEY`` (what the ``openai`` client does). A tenant
sees and uses its own adapters and the shared ones (owner none); an admin also loads and
unloads adapters by path and reads ``/metrics``. A key with no tenant sees only shared
adapters. Without a key file the server is open: every caller is an admin with no tenant,
and the server says so in its log at start.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.errors import APIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str | None  # None: no tenant of its own, sees shared adapters only
    is_admin: bool = False


OPEN_CALLER = Caller(tenant=None, is_admin=True)


def _digest(key: str) -> bytes:
    # Keys are looked up by digest so the lookup's timing says nothing about a key.
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, callers: dict[str, Caller] | None) -> None:
        """``callers``: key -> Caller; None makes an open server."""
        self._by_digest = None if callers is None else {_digest(k): c for k, c in callers.items()}

    @classmethod
    def open(cls) -> ApiKeys:
        return cls(None)

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"api_keys: cannot read {path}: {e}") from e
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, dict) or not keys:
            raise ValueError(f"api_keys: {path} must hold {{\"keys\": {{KEY: {{\"tenant\": ..., "
                             "\"admin\": ...}}}}} with at least one key")
        callers = {}
        for i, (key, spec) in enumerate(keys.items()):
            where = f"api_keys: {path}, key #{i + 1}"
            if not isinstance(key, str) or len(key) < 8:
                raise ValueError(f"{where}: a key must be a string of at least 8 characters")
            if not isinstance(spec, dict) or set(spec) - {"tenant", "admin"}:
                raise ValueError(f"{where}: expected {{\"tenant\": str|null, \"admin\": bool}}, "
                                 f"got {spec!r}")
            tenant, admin = spec.get("tenant"), spec.get("admin", False)
            if tenant is not None and (not isinstance(tenant, str) or not tenant):
                raise ValueError(f"{where}: tenant must be a non-empty string or null, got {tenant!r}")
            if not isinstance(admin, bool):
                raise ValueError(f"{where}: admin must be true or false, got {admin!r}")
            callers[key] = Caller(tenant=tenant, is_admin=admin)
        tenants = sorted({c.tenant for c in callers.values() if c.tenant is not None})
        logger.info("api keys: %d key(s), tenants %s", len(callers), ", ".join(tenants) or "none")
        return cls(callers)

    @property
    def is_open(self) -> bool:
        return self._by_digest is None

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller an ``Authorization`` header names; 401 when it names nobody."""
        if self._by_digest is None:
            return OPEN_CALLER
        if not authorization:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer KEY'.",
                           code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        caller = self._by_digest.get(_digest(key.strip())) if scheme.lower() == "bearer" else None
        if caller is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return caller


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise APIError(403, "This endpoint needs an admin key.", code="admin_only")
