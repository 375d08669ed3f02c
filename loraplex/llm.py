"""Offline facade: ``LLM(model=...).generate(prompts, params)``."""
from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq
from typing import Any

from loraplex.config import EngineConfig
from loraplex.engine.engine import LLMEngine
from loraplex.engine.sequence import RequestOutput
from loraplex.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs the engine in-process. Options are the fields of the config dataclasses
    (``dtype``, ``max_model_len``, ``block_size``, ``kv_cache_gib``, ``max_num_seqs``, ...)."""

    def __init__(self, model: str = "smollm2-135m", **options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_flat(model=model, **options))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. Every prompt is validated before any runs."""
        prompts = _as_prompt_list(prompts)
        params_list = _as_params_list(params, len(prompts))
        engine = self.engine
        seqs = [engine.make_sequence(p, sp) for p, sp in zip(prompts, params_list)]
        for seq in seqs:
            engine.add_sequence(seq)
        while engine.has_unfinished_requests():
            engine.step()
        return [engine.output_of(seq) for seq in seqs]

    def chat(self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """``conversations``: one list of {"role", "content"} messages, or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated."""
        engine = self.engine
        seq = engine.add_request(prompt, params or SamplingParams())
        try:
            while not seq.status.is_finished:
                for out in engine.step():
                    if out.request_id == seq.request_id and out.new_text:
                        yield out.new_text
        finally:
            engine.abort_request(seq.request_id)


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts


def _as_params_list(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params: got {len(params)} SamplingParams for {n} prompts")
    return params
