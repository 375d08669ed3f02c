"""Engine outputs -> OpenAI response bodies and server-sent-event streams.

A stream is ``data: {chunk}`` events ending with ``data: [DONE]``. With
``stream_options.include_usage`` the last chunk before ``[DONE]`` has no choices and
carries the usage, as OpenAI does. A request that fails after the stream has answered 200
sends one ``data: {"error": ...}`` event, then ``[DONE]``.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.engine.async_engine import RequestStream
from loraplex.engine.sequence import RequestOutput
from loraplex.models.tokenizer import Tokenizer
from loraplex.sampling import TokenLogprob
from loraplex.server.errors import error_event
from loraplex.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse,
                                      ChatLogprobs, ChatResponseMessage, ChatStreamChoice,
                                      ChatTokenLogprob, CompletionChoice, CompletionLogprobs,
                                      CompletionResponse, DeltaMessage, TopLogprob, UsageInfo)

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ResponseContext:
    """What every body or chunk of one response repeats."""

    request_id: str
    model: str
    tokenizer: Tokenizer
    created: int = 0

    @classmethod
    def new(cls, request_id: str, model: str, tokenizer: Tokenizer) -> ResponseContext:
        return cls(request_id, model, tokenizer, int(time.time()))

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def usage_of(out: RequestOutput) -> UsageInfo:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def completion_logprobs(ctx: ResponseContext, logprobs: list[TokenLogprob],
                        offset: int = 0) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for lp in logprobs:
        text = ctx.token_text(lp.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(lp.logprob)
        result.top_logprobs.append({ctx.token_text(t): v for t, v in lp.top})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(ctx: ResponseContext, logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = ctx.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(lp.token_id, lp.logprob).model_dump(),
                         top_logprobs=[entry(t, v) for t, v in lp.top])
        for lp in logprobs])


def completion_response(ctx: ResponseContext, out: RequestOutput) -> CompletionResponse:
    logprobs = completion_logprobs(ctx, out.logprobs) if out.logprobs is not None else None
    choice = CompletionChoice(text=out.text, logprobs=logprobs, finish_reason=out.finish_reason)
    return CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                              choices=[choice], usage=usage_of(out))


def chat_response(ctx: ResponseContext, out: RequestOutput) -> ChatCompletionResponse:
    logprobs = chat_logprobs(ctx, out.logprobs) if out.logprobs is not None else None
    choice = ChatChoice(message=ChatResponseMessage(content=out.text), logprobs=logprobs,
                        finish_reason=out.finish_reason)
    return ChatCompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                  choices=[choice], usage=usage_of(out))


def _event(body: CompletionResponse | ChatCompletionChunk) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _failed(out: RequestOutput) -> str | None:
    if out.finish_reason == "error":
        return error_event(500, f"the request failed: {out.error}", code="request_failed")
    return None


async def completion_events(ctx: ResponseContext, stream: RequestStream,
                            include_usage: bool) -> AsyncIterator[str]:
    num_sent_logprobs, offset, last = 0, 0, None
    async for out in stream:
        last = out
        if (failure := _failed(out)) is not None:
            yield failure
            break
        logprobs = None
        if out.logprobs is not None and len(out.logprobs) > num_sent_logprobs:
            logprobs = completion_logprobs(ctx, out.logprobs[num_sent_logprobs:], offset)
            num_sent_logprobs = len(out.logprobs)
            offset += sum(len(t) for t in logprobs.tokens)
        if out.new_text or logprobs is not None or out.finished:
            choice = CompletionChoice(text=out.new_text, logprobs=logprobs,
                                      finish_reason=out.finish_reason)
            yield _event(CompletionResponse(id=ctx.request_id, created=ctx.created,
                                            model=ctx.model, choices=[choice]))
    if include_usage and last is not None and last.finish_reason != "error":
        yield _event(CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                        choices=[], usage=usage_of(last)))
    yield DONE


async def chat_events(ctx: ResponseContext, stream: RequestStream,
                      include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return _event(ChatCompletionChunk(id=ctx.request_id, created=ctx.created,
                                          model=ctx.model, choices=choices, usage=usage))

    yield chunk([ChatStreamChoice(delta=DeltaMessage(role="assistant", content=""))])
    num_sent_logprobs, last = 0, None
    async for out in stream:
        last = out
        if (failure := _failed(out)) is not None:
            yield failure
            break
        logprobs = None
        if out.logprobs is not None and len(out.logprobs) > num_sent_logprobs:
            logprobs = chat_logprobs(ctx, out.logprobs[num_sent_logprobs:])
            num_sent_logprobs = len(out.logprobs)
        if out.new_text or logprobs is not None:
            yield chunk([ChatStreamChoice(delta=DeltaMessage(content=out.new_text),
                                          logprobs=logprobs)])
        if out.finished:
            yield chunk([ChatStreamChoice(delta=DeltaMessage(), finish_reason=out.finish_reason)])
    if include_usage and last is not None and last.finish_reason != "error":
        yield chunk([], usage_of(last))
    yield DONE
