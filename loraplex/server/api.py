"""The OpenAI-compatible HTTP API (FastAPI): ``create_app(state)``.

Routes: ``/v1/completions``, ``/v1/chat/completions`` (streamed as server-sent events when
asked), ``/v1/models``, adapter administration (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``, upload ``/v1/adapters``), and ``/health``, ``/version``,
``/metrics``. Everything under ``/v1`` needs an API key when the server has a key file;
``/metrics`` then needs an admin key (its labels name every tenant's adapters).

A request leaves the engine as soon as nobody listens: a client that disconnects from a
stream, or from a request it waits on, aborts it, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

import loraplex
from loraplex.config import ServerConfig
from loraplex.engine.async_engine import (AsyncEngine, EngineStoppedError, QueueFullError,
                                          RequestStream)
from loraplex.engine.sequence import RequestOutput
from loraplex.lora.registry import AdapterEntry
from loraplex.server.adapters import AdapterService
from loraplex.server.auth import ApiKeys, Caller, require_admin
from loraplex.server.errors import APIError, bad_request, install_error_handlers
from loraplex.server.metrics import ServerMetrics
from loraplex.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                      LoadLoRAAdapterRequest, ModelCard, ModelList,
                                      UnloadLoRAAdapterRequest)
from loraplex.server.requests import chat_prompt, completion_prompt, sampling_params
from loraplex.server.responses import (ResponseContext, chat_events, chat_response,
                                       completion_events, completion_response)
from loraplex.server.uploads import read_form_limited

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Everything the routes share; built by ``server/launch.py`` (or a test)."""

    engine: AsyncEngine
    adapters: AdapterService
    auth: ApiKeys
    metrics: ServerMetrics
    config: ServerConfig
    base_model_id: str
    created: int = 0


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        if state.auth.is_open:
            logger.warning("no --api-keys file: the server is open, every caller is an admin")
        yield
        await state.engine.shutdown(state.config.drain_seconds)

    app = FastAPI(title="loraplex", version=loraplex.__version__, lifespan=lifespan)
    app.state.loraplex = state
    install_error_handlers(app, state.metrics.count_error)

    async def caller(request: Request) -> Caller:
        return state.auth.authenticate(request.headers.get("authorization"))

    # ---- generation ---------------------------------------------------------------------

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request,
                          who: Caller = Depends(caller)) -> Response:
        return await generate(body, request, who)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               who: Caller = Depends(caller)) -> Response:
        return await generate(body, request, who)

    async def generate(body: CompletionRequest | ChatCompletionRequest, request: Request,
                       who: Caller) -> Response:
        is_chat = isinstance(body, ChatCompletionRequest)
        lora, _ = state.adapters.resolve(body.model, who)
        tokenizer = state.engine.engine.tokenizer
        prompt_ids = chat_prompt(body, tokenizer) if is_chat else completion_prompt(body, tokenizer)
        params = sampling_params(body, len(prompt_ids), state.engine.engine.max_model_len)
        request_id = new_request_id("chatcmpl" if is_chat else "cmpl")
        try:
            stream = await state.engine.add_request(prompt_ids, params, request_id, lora)
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), code="shutting_down") from None
        except (ValueError, TypeError) as e:
            raise bad_request(e) from None
        state.metrics.count_request(body.model, who.tenant)
        ctx = ResponseContext.new(request_id, body.model, tokenizer)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_events if is_chat else completion_events
            return _sse(events(ctx, stream, include_usage), stream, request)
        out = await _finish(request, stream)
        result = chat_response(ctx, out) if is_chat else completion_response(ctx, out)
        return Response(result.model_dump_json(), media_type="application/json")

    # ---- models and adapters ------------------------------------------------------------

    def base_card() -> ModelCard:
        return ModelCard(id=state.base_model_id, created=state.created, owned_by="loraplex",
                         root=state.base_model_id, max_model_len=state.engine.engine.max_model_len)

    def adapter_card(entry: AdapterEntry) -> ModelCard:
        return ModelCard(id=entry.name, created=entry.created, owned_by=entry.owner or "shared",
                         root=entry.name, parent=state.base_model_id,
                         max_model_len=state.engine.engine.max_model_len)

    @app.get("/v1/models")
    async def list_models(who: Caller = Depends(caller)) -> ModelList:
        visible = state.adapters.registry.visible_to(who.tenant)
        return ModelList(data=[base_card()] + [adapter_card(e) for e in visible])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, who: Caller = Depends(caller)) -> ModelCard:
        _, entry = state.adapters.resolve(model, who)
        return base_card() if entry is None else adapter_card(entry)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest,
                                who: Caller = Depends(caller)) -> ModelCard:
        require_admin(who)
        return adapter_card(await state.adapters.load(body.lora_name, body.lora_path, body.tenant))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest,
                                  who: Caller = Depends(caller)) -> dict:
        require_admin(who)
        entry = await state.adapters.unload(body.lora_name, body.tenant)
        return {"id": entry.name, "object": "model", "deleted": True}

    @app.post("/v1/adapters")
    async def upload_adapter(request: Request, who: Caller = Depends(caller)) -> ModelCard:
        """Multipart form: ``name`` (the adapter's name) and ``file`` (a zip or tar of a
        PEFT folder). The adapter belongs to the caller's tenant (shared for an admin key
        without a tenant)."""
        if who.tenant is None and not who.is_admin:
            raise APIError(403, "This key has no tenant to own an upload.", code="no_tenant")
        form = await read_form_limited(request, state.adapters.max_upload_bytes)
        try:
            name, upload = form.get("name"), form.get("file")
            if not isinstance(name, str):
                raise bad_request("name: the form field 'name' is required", param="name")
            if not isinstance(upload, UploadFile):
                raise bad_request("file: the form field 'file' (an archive) is required",
                                  param="file")
            entry = await state.adapters.upload(name, who.tenant, upload.file)
        finally:
            await form.close()
        return adapter_card(entry)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, who: Caller = Depends(caller)) -> dict:
        """A tenant removes one of its own adapters (another tenant's answers 404)."""
        if who.tenant is None:
            raise APIError(403, "This key has no tenant; admins use /v1/unload_lora_adapter.",
                           code="no_tenant")
        entry = await state.adapters.unload(name, who.tenant)
        return {"id": entry.name, "object": "model", "deleted": True}

    # ---- operations ---------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.engine.is_alive:
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        if not state.engine.is_accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": loraplex.__version__}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not state.auth.is_open:
            require_admin(await caller(request))
        return Response(state.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(events: AsyncIterator[str], stream: RequestStream, request: Request) -> StreamingResponse:
    async def watched() -> AsyncIterator[str]:
        # Starlette cancels the body on a disconnect for ASGI servers before spec 2.4; the
        # watcher covers servers that leave that to the application.
        watcher = asyncio.ensure_future(_disconnected(request))
        watcher.add_done_callback(lambda task: task.cancelled() or stream.cancel())
        try:
            async for event in events:
                yield event
        finally:
            watcher.cancel()

    # The background task covers a response that ends before its body is iterated.
    return StreamingResponse(watched(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(stream.cancel))


async def _finish(request: Request, stream: RequestStream) -> RequestOutput:
    """The final output; aborts the request if the client goes away first."""
    async def last_output() -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        assert final is not None
        return final

    consume = asyncio.ensure_future(last_output())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({consume, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not consume.done():
            consume.cancel()
            stream.cancel()
    if not consume.done() or consume.cancelled():
        raise APIError(499, "client disconnected", code="client_disconnected")
    try:
        out = consume.result()
    except EngineStoppedError as e:
        raise APIError(503, str(e), code="engine_stopped") from None
    if out.finish_reason == "error":
        raise APIError(500, f"the request failed: {out.error}", code="request_failed")
    if out.finish_reason == "abort":
        raise APIError(503, "the request was aborted: the server is shutting down",
                       code="aborted")
    return out
