"""OpenAI request bodies -> what the engine takes: prompt token ids and ``SamplingParams``.

Unsupported options are refused by name rather than silently ignored; value ranges are
``SamplingParams``' to check, so its message (``field: expected ..., got ...``) becomes the
400's message and ``param``.
"""
from __future__ import annotations

from typing import Any

from loraplex.models.tokenizer import Tokenizer
from loraplex.sampling import SamplingParams
from loraplex.server.errors import APIError, bad_request
from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _refuse_unsupported(req: SamplingFields) -> None:
    if req.n not in (None, 1):
        raise bad_request(f"n: only 1 choice per request is supported, got {req.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"{name}: is not supported (only 0), got {getattr(req, name)}")
    if req.logit_bias:
        raise bad_request("logit_bias: is not supported", param="logit_bias")


def completion_prompt(req: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    _refuse_unsupported(req)
    if req.echo:
        raise bad_request("echo: is not supported", param="echo")
    if req.suffix:
        raise bad_request("suffix: is not supported", param="suffix")
    if req.best_of not in (None, 1):
        raise bad_request(f"best_of: only 1 is supported, got {req.best_of}", param="best_of")
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"prompt: one prompt per request is supported, got {len(prompt)}; "
                              "send one request per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return list(prompt)  # token ids; the engine checks they are in the vocabulary


def chat_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    _refuse_unsupported(req)
    if req.tools:
        raise bad_request("tools: tool calling is not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("response_format: only {'type': 'text'} is supported",
                          param="response_format")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages.{i}.content.{j}: only text parts are "
                                      f"supported, got type {part.type!r}")
                texts.append(part.text)
            content = "\n".join(texts)
        messages.append({"role": message.role, "content": content or ""})
    try:
        return tokenizer.apply_chat_template(messages)
    except ValueError as e:
        raise bad_request(e, param="messages") from None
    except Exception as e:  # a template that raises on this conversation (role order, ...)
        raise bad_request(f"messages: the chat template refused them: {e}",
                          param="messages") from None


def sampling_params(req: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int,
                    max_model_len: int) -> SamplingParams:
    """The request's SamplingParams; 400 when its tokens cannot fit the context."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise bad_request(f"prompt: {num_prompt_tokens} tokens leave no room to generate "
                          f"within the model's context of {max_model_len} tokens",
                          param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                          code="context_length_exceeded")
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs: needs logprobs set to true", param="top_logprobs")
        default = room
    else:
        max_tokens, field, logprobs = req.max_tokens, "max_tokens", req.logprobs
        default = min(COMPLETION_DEFAULT_MAX_TOKENS, room)
    if max_tokens is not None and isinstance(max_tokens, int) and max_tokens > room:
        raise APIError(400, f"{field}: this model's context is {max_model_len} tokens; the "
                       f"prompt takes {num_prompt_tokens}, so at most {room} can be generated, "
                       f"but {max_tokens} were asked for", param=field,
                       code="context_length_exceeded")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return SamplingParams(
            max_tokens=default if max_tokens is None else max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k in (None, 0) else req.top_k,
            seed=req.seed, stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ValueError as e:
        message = str(e)
        if field != "max_tokens" and message.startswith("max_tokens:"):
            message = field + message[len("max_tokens"):]
        if isinstance(req, ChatCompletionRequest) and message.startswith("logprobs:"):
            message = "top_logprobs" + message[len("logprobs"):]
        raise bad_request(message) from None
