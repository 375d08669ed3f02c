"""Errors as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}``.

Handlers turn every failure into that shape: ``APIError`` raised by the server, FastAPI's
validation errors (400, naming the field), unknown routes (404) and anything unexpected
(500, logged with its traceback, its text not shown to the client).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_request(error: Exception | str, param: str | None = None,
                code: str | None = None) -> APIError:
    """400 from a user-input error; ``param`` defaults to the field its message starts with
    (the engine's and SamplingParams' messages read ``field: what is wrong``)."""
    message = str(error)
    if param is None:
        match = _FIELD_PREFIX.match(message)
        param = match.group(1) if match else None
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    # Exactly the same for a name that does not exist and for another tenant's adapter.
    return APIError(404, f"The model `{name}` does not exist.", param="model",
                    code="model_not_found")


def error_response(status: int, message: str, param: str | None = None,
                   code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_event(status: int, message: str, code: str | None = None) -> str:
    """An error inside a stream that has already answered 200."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"),
                                         code=code))
    return f"data: {body.model_dump_json()}\n\n"


def install_error_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """``on_error(status)`` is told about every error response (for metrics)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        on_error(exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_error(400)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else \
            str(first.get("msg", "invalid request body"))
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        on_error(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        on_error(500)
        return error_response(500, "internal server error; the server log has the details",
                              code="internal_error")
