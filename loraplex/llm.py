"""Offline facade: ``LLM(model=...).generate(prompts, params)``."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence as Seq
from typing import Any

from loraplex.config import EngineConfig, SpecConfig
from loraplex.engine.engine import LLMEngine
from loraplex.engine.sequence import RequestOutput
from loraplex.lora.request import LoRARequest
from loraplex.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs the engine in-process. Options are the fields of the config dataclasses
    (``dtype``, ``max_model_len``, ``block_size``, ``kv_cache_gib``, ``max_num_seqs``, ...)."""

    def __init__(self, model: str = "smollm2-135m", speculative: SpecConfig | str | None = None,
                 **options: Any) -> None:
        """``speculative``: a SpecConfig, or just its method ("ngram"); default off."""
        config = EngineConfig.from_flat(model=model, **options)
        if isinstance(speculative, str):
            speculative = SpecConfig(method=speculative)
        if speculative is not None:
            if not isinstance(speculative, SpecConfig):
                raise TypeError(f"speculative: expected SpecConfig, a method name or None, "
                                f"got {type(speculative).__name__}")
            config = dataclasses.replace(config, spec=speculative)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 lora: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. ``lora``: one adapter for all prompts, or one
        entry (None = base model) per prompt. Every prompt and adapter is validated before
        any request runs."""
        prompts = _as_prompt_list(prompts)
        params_list = _per_prompt(params, len(prompts), "params") or [SamplingParams()] * len(prompts)
        loras = _per_prompt(lora, len(prompts), "lora") or [None] * len(prompts)
        engine = self.engine
        for request in {r for r in loras if r is not None}:
            if engine.adapters is None:
                raise ValueError("lora: this LLM runs with max_loras=0 (LoRA off)")
            engine.adapters.load_now(request)
        seqs = [engine.make_sequence(p, sp, lora=r) for p, sp, r in zip(prompts, params_list, loras)]
        try:
            for seq in seqs:
                engine.add_sequence(seq)
            while any(not seq.status.is_finished for seq in seqs):
                engine.step()
        except BaseException:  # Ctrl-C or an internal error: leave nothing behind
            for seq in seqs:
                engine.abort_request(seq.request_id)
            raise
        return [engine.output_of(seq) for seq in seqs]

    def merge(self, lora: LoRARequest) -> None:
        """Merge ``lora`` into the live weights until ``unmerge()``: its requests run at base
        speed; requests for the base or other adapters stay exact."""
        self.engine.merge_lora(lora)

    def unmerge(self) -> None:
        """Put the base weights back, bit for bit."""
        self.engine.unmerge_lora()

    def chat(self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """``conversations``: one list of {"role", "content"} messages, or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               lora: LoRARequest | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated."""
        engine = self.engine
        if lora is not None and engine.adapters is not None:
            engine.adapters.load_now(lora)  # a refused adapter raises here, not mid-stream
        seq = engine.add_request(prompt, params or SamplingParams(), lora=lora)
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


def _per_prompt(value: Any, n: int, field: str) -> list[Any] | None:
    """One value for every prompt, a list with one per prompt, or None."""
    if value is None:
        return None
    if isinstance(value, (SamplingParams, LoRARequest)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{field}: got {len(values)} entries for {n} prompts")
    return values
