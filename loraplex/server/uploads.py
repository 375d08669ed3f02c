"""Read a multipart upload with a hard size limit, before any parser sees it.

The body is counted as it arrives (whatever ``Content-Length`` claims, or without one)
and spooled to a temporary file; past the limit the rest is read and dropped, up to a
bound, so the client gets a clean 413 instead of a reset connection. Only then does
Starlette's multipart parser run, on the spooled copy.
"""
from __future__ import annotations

import tempfile

from fastapi import Request
from starlette.datastructures import FormData
from starlette.types import Message

from loraplex.server.errors import APIError

_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields around the file
_MAX_DRAIN = 64 * 1024 * 1024  # past the limit, read at most this much more before giving up
_SPOOL_IN_MEMORY = 1024 * 1024


def _too_large(limit: int) -> APIError:
    return APIError(413, f"file: the upload is larger than the limit of {limit} bytes "
                    "(--max-upload-mib)", param="file", code="upload_too_large")


async def read_form_limited(request: Request, max_bytes: int) -> FormData:
    limit = max_bytes + _FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _MAX_DRAIN:
        raise _too_large(max_bytes)  # too big to even drain; the connection will close
    body = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
    try:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body.write(chunk)
            elif size > limit + _MAX_DRAIN:
                break
        if size > limit:
            raise _too_large(max_bytes)
        body.seek(0)

        async def replay() -> Message:
            chunk = body.read(_SPOOL_IN_MEMORY)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

        try:
            return await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except APIError:
            raise
        except Exception as e:  # the multipart parser's own errors: a malformed form
            raise APIError(400, f"file: expected a multipart form with 'name' and 'file' ({e})",
                           param="file", code="invalid_form") from None
    finally:
        body.close()
