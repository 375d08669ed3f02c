"""Request state: one ``Sequence`` per request, and what the engine returns for it."""
from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.request import LoRARequest
from loraplex.sampling import SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # eos, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context limit
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # its adapter failed to load; ``Sequence.error`` says why

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def queue_s(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def decode_s(self) -> float | None:
        """First generated token to the last."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        return self.finished_time - self.first_token_time


@dataclass(slots=True, eq=False)
class Sequence:
    """One request's tokens and book-keeping. Touched by the scheduler (plain Python)
    and the engine; tensors only appear in the model runner."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    block_hash_chain: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    # LoRA: the request, its load, the validated adapter once loaded, its slot while running.
    lora: LoRARequest | None = None
    lora_load: Future[LoRAAdapter] | None = None
    adapter: LoRAAdapter | None = None
    lora_slot: int = -1
    num_lora_skips: int = 0  # steps passed over for want of an adapter slot
    cache_salt: bytes = b""  # joins prefix-cache keys: the adapter's content hash
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Speculative decoding (spec/): this step's proposed tokens, verified by the target in
    # the same forward pass as the last sampled token; draft_probs [k, vocab] is the draft
    # model's distribution for each (None: a deterministic proposal, e.g. n-gram lookup).
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    # Incremental detokenization state (models/tokenizer.py).
    output_text: str = ""
    num_streamed_chars: int = 0  # of output_text, already returned as new_text
    prefix_offset: int = 0
    read_offset: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.all_token_ids[start:end]


@dataclass(slots=True)
class RequestOutput:
    """The state of one request after a step; ``finished`` once it is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated ids
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[TokenLogprob] | None
    metrics: RequestMetrics
    new_text: str = ""  # text added by this step (for streaming)
    lora_name: str | None = None
    error: str | None = None  # why the request failed (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
