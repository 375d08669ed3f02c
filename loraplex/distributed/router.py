"""The ingress: one HTTP endpoint that sends each request to a replica.

It reads the OpenAI body's ``model``; for an adapter (anything but the base model id) it
calls the replicas with that adapter as Ray Serve's multiplexed model id. The replicas'
handle routes with ``balancer.AdapterAffinityRouter``: to the least-busy replica holding
the adapter while its queue stays within ``affinity_slack`` of the shortest, else to the
least-loaded replica (which then loads the adapter). Base-model requests carry no id and
go to the less loaded of two random replicas. With ``adapter_affinity`` off, no request
carries an id and Serve's default router balances blind to adapters (the baseline the
benchmark compares).

Everything else (auth, validation, errors) is the replica's: the router only needs the
caller's tenant to tell tenant a's ``bot`` from tenant b's. Failures between router and
replica become the single server's backpressure answers: 503 with ``Retry-After`` when
Serve's queue is full or the chosen replica died (the client retries; Serve has routed
around the dead one by then).

``GET /v1/replicas`` (an admin key when the server has keys) shows per-replica books from
the replicas' response headers: requests by model, and their engines' adapter loads.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loraplex.distributed.asgi_bridge import RequestHead, ResponseHead
from loraplex.distributed.replica import LOADS_HEADER, REPLICA_HEADER, adapter_key
from loraplex.server.auth import ApiKeys, require_admin
from loraplex.server.errors import APIError, error_event, error_response

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
REPLICA_LOST = (RayActorError, DeploymentUnavailableError)
_FORM_OVERHEAD = 1024 * 1024


class ReplicaBooks:
    """What the router saw of each replica: requests by model, adapter loads so far."""

    def __init__(self) -> None:
        self.requests: dict[str, Counter[str]] = {}
        self.adapter_loads: dict[str, int] = {}

    def record(self, replica_id: str | None, model: str | None, loads: str | None) -> None:
        if replica_id is None:
            return
        self.requests.setdefault(replica_id, Counter())
        if model is not None:
            self.requests[replica_id][model] += 1
        if loads is not None and loads.isdigit():
            self.adapter_loads[replica_id] = max(int(loads), self.adapter_loads.get(replica_id, 0))

    def as_json(self) -> dict:
        return {"object": "list", "data": [
            {"replica_id": rid, "requests": dict(counts),
             "adapter_loads": self.adapter_loads.get(rid, 0)}
            for rid, counts in sorted(self.requests.items())]}


class LoraplexRouter:
    def __init__(self, replicas: DeploymentHandle, base_model_id: str, api_keys: str | None,
                 is_affinity: bool, max_upload_bytes: int) -> None:
        self.replicas = replicas
        self.base_model_id = base_model_id
        self.auth = ApiKeys.from_file(api_keys) if api_keys else ApiKeys.open()
        self.is_affinity = is_affinity
        self.max_body_bytes = max_upload_bytes + _FORM_OVERHEAD
        self.books = ReplicaBooks()

    async def __call__(self, request: Request) -> Response:
        try:
            if _app_path(request) == "/v1/replicas" and request.method == "GET":
                if not self.auth.is_open:
                    require_admin(self.auth.authenticate(request.headers.get("authorization")))
                return JSONResponse(self.books.as_json())
            body = await self._read_body(request)
            return await self._forward(request, body)
        except APIError as e:
            return error_response(e.status, e.message, e.param, e.code, e.headers)

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"file: the request body is larger than the limit of "
                               f"{self.max_body_bytes} bytes", param="file",
                               code="upload_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _model_of(self, request: Request, body: bytes) -> tuple[str | None, str | None]:
        """(the body's model, its multiplexed id or None for the base / no affinity)."""
        if request.method != "POST" or _app_path(request) not in GENERATION_PATHS:
            return None, None
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return None, None  # the replica answers the malformed body with its 400
        if not isinstance(model, str):
            return None, None
        if model == self.base_model_id or not self.is_affinity:
            return model, None
        try:
            caller = self.auth.authenticate(request.headers.get("authorization"))
        except APIError:
            return model, None  # the replica answers 401
        return model, adapter_key(model, caller.tenant)

    async def _forward(self, request: Request, body: bytes) -> Response:
        model, key = self._model_of(request, body)
        head = RequestHead(request.method, _app_path(request), request.url.query.encode(),
                           tuple(request.headers.raw),
                           (request.client.host, request.client.port) if request.client else None)
        handle = self.replicas.options(stream=True, multiplexed_model_id=key or "")
        stream = handle.forward.remote(head, body)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the replica gave no answer", code="internal_error") from None
        except BackPressureError:
            raise _unavailable("every replica is busy and the router's queue is full",
                               "queue_full") from None
        except REPLICA_LOST as e:
            logger.warning("replica lost before answering: %s", e)
            raise _unavailable("the replica serving this request went away; retry",
                               "replica_lost") from None
        assert isinstance(first, ResponseHead)
        self.books.record(first.header(REPLICA_HEADER), model, first.header(LOADS_HEADER))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in first.headers
                   if k.lower() != b"content-length"]
        if (first.header("content-type") or "").startswith("text/event-stream"):
            response = StreamingResponse(_rest(stream), status_code=first.status)
        else:
            try:
                content = b"".join([chunk async for chunk in stream])
            except REPLICA_LOST:
                raise _unavailable("the replica serving this request went away; retry",
                                   "replica_lost") from None
            response = Response(content, status_code=first.status)
        for name, value in headers:  # raw pairs: repeated headers survive
            response.headers.append(name, value)
        return response


def _app_path(request: Request) -> str:
    """The path inside the application: Serve keeps a route prefix in ``path`` and says
    it in ``root_path``."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


async def _rest(stream: AsyncIterator[ResponseHead | bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            assert isinstance(chunk, bytes)
            yield chunk
    except REPLICA_LOST:
        # The stream has answered 200 already: end it with an error event, as the single
        # server does when its engine stops mid-stream.
        yield error_event(503, "the replica serving this stream went away",
                          code="replica_lost").encode()


def _unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": "1"})
