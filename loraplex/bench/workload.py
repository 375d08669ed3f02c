"""What a benchmark sends: prompts, which model each request names, and when it is sent.

Random prompts are real words from the tokenizer's own vocabulary (tokens that are a space
plus a lowercase word), joined and checked to encode to exactly ``input_len`` tokens, so
prefill work is fixed and no prompt is all one token (BENCHMARKS.md). A JSONL dataset gives
one request per line: ``{"prompt": "..."}`` or ``{"messages": [...]}``, optionally with
``"max_tokens"``.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SELECTIONS = ("random", "round-robin", "zipf")
ENDPOINTS = ("completions", "chat")
_WORD = re.compile(r"[a-z]{3,12}")
_SPACE_MARKS = ("\u0120", "\u2581")  # byte-level BPE's "Ġ" and sentencepiece's "▁"


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of the workload. ``prompt`` is text (completions) or messages (chat);
    ``num_prompt_tokens`` is the count the server should report (the same tokenizer)."""

    index: int
    model: str
    prompt: str | list[dict[str, str]]
    num_prompt_tokens: int | None
    max_tokens: int


def word_token_ids(tokenizer: Any) -> list[int]:
    """Ids of vocabulary entries that are one space + a plain lowercase word."""
    hf = tokenizer.hf
    special = set(hf.all_special_ids)
    ids = []
    for piece, token_id in hf.get_vocab().items():
        if token_id in special or not piece or piece[0] not in _SPACE_MARKS:
            continue
        if _WORD.fullmatch(piece[1:]):
            ids.append(token_id)
    if len(ids) < 64:
        raise ValueError(f"tokenizer: only {len(ids)} plain-word tokens in its vocabulary; "
                         "use --dataset FILE.jsonl for this model")
    return sorted(ids)


def random_word_prompts(tokenizer: Any, count: int, input_len: int, seed: int,
                        words: list[int] | None = None) -> list[str]:
    """``count`` texts of real words that each encode to exactly ``input_len`` tokens
    (``words``: ``word_token_ids(tokenizer)``, when the caller keeps it)."""
    if input_len < 1:
        raise ValueError(f"input_len: must be >= 1, got {input_len}")
    words = words or word_token_ids(tokenizer)
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        ids = [rng.choice(words) for _ in range(input_len)]
        text = tokenizer.decode(ids).strip()
        # Words split on spaces encode one token each, but a tokenizer may add a BOS or merge
        # differently at the start: trim or extend until the count is exact.
        for _ in range(4 * input_len + 8):
            n = len(tokenizer.encode(text))
            if n == input_len:
                break
            if n > input_len:
                text = text.rsplit(" ", 1)[0] if " " in text else text[:-1]
            else:
                text = f"{text} {tokenizer.decode([rng.choice(words)]).strip()}"
        else:
            raise ValueError(f"input_len: could not build a prompt of exactly {input_len} "
                             "tokens with this tokenizer")
        if len(set(tokenizer.encode(text))) < min(2, input_len):
            raise AssertionError("a random prompt came out as one repeated token")
        prompts.append(text)
    return prompts


def read_dataset(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file: each ``{"prompt": str}`` or ``{"messages": [...]}``, optional
    ``"max_tokens"``. A bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset: no such file {str(path)!r}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset: {path}:{number}: not JSON ({e.msg})") from None
        ok_prompt = isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"]
        ok_messages = isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]
        if not (ok_prompt or ok_messages):
            raise ValueError(f"dataset: {path}:{number}: expected a non-empty \"prompt\" "
                             f"string or \"messages\" list, got {line[:80]!r}")
        if "max_tokens" in row and (not isinstance(row["max_tokens"], int) or row["max_tokens"] < 1):
            raise ValueError(f"dataset: {path}:{number}: max_tokens must be a positive "
                             f"integer, got {row['max_tokens']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"dataset: {path} has no requests")
    return rows


def select_models(models: list[str], count: int, selection: str, seed: int,
                  zipf_exponent: float = 1.0) -> list[str]:
    """Which model each of ``count`` requests names. zipf: the k-th model (1-based) is
    chosen with probability proportional to 1 / k**exponent (popular adapters first)."""
    if not models:
        raise ValueError("models: give at least one model name")
    if selection not in SELECTIONS:
        raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
    if selection == "round-robin":
        return [models[i % len(models)] for i in range(count)]
    rng = random.Random(seed)
    if selection == "random":
        return [rng.choice(models) for _ in range(count)]
    weights = [1.0 / (k ** zipf_exponent) for k in range(1, len(models) + 1)]
    return rng.choices(models, weights=weights, k=count)


def build_requests(tokenizer: Any, models: list[str], num_prompts: int, selection: str,
                   dataset: str, input_len: int, output_len: int, endpoint: str,
                   seed: int, zipf_exponent: float = 1.0) -> list[BenchRequest]:
    if num_prompts < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num_prompts}")
    if output_len < 1:
        raise ValueError(f"output_len: must be >= 1, got {output_len}")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint: expected one of {ENDPOINTS}, got {endpoint!r}")
    chosen = select_models(models, num_prompts, selection, seed, zipf_exponent)
    if dataset == "random":
        rows: list[dict[str, Any]] = [{"prompt": p} for p in
                                      random_word_prompts(tokenizer, num_prompts, input_len, seed)]
    else:
        all_rows = read_dataset(dataset)
        rows = [all_rows[i % len(all_rows)] for i in range(num_prompts)]  # in order, cycled
    requests = []
    for i, (model, row) in enumerate(zip(chosen, rows)):
        if endpoint == "chat":
            prompt: str | list[dict[str, str]] = row.get("messages") or [
                {"role": "user", "content": row["prompt"]}]
            num_tokens = len(tokenizer.apply_chat_template(prompt))
        else:
            if "prompt" not in row:
                raise ValueError(f"dataset: request {i} has only messages; use --endpoint chat")
            prompt = row["prompt"]
            num_tokens = len(tokenizer.encode(prompt))
        requests.append(BenchRequest(i, model, prompt, num_tokens,
                                     int(row.get("max_tokens", output_len))))
    return requests


def arrival_gaps(count: int, request_rate: float, seed: int) -> Iterator[float]:
    """Seconds to wait before each request: a Poisson process of ``request_rate`` requests
    per second (exponential gaps), or all at once for ``inf``."""
    if not request_rate > 0:
        raise ValueError(f"request_rate: must be > 0 (or inf), got {request_rate}")
    rng = random.Random(seed + 1)
    for _ in range(count):
        yield 0.0 if math.isinf(request_rate) else rng.expovariate(request_rate)
