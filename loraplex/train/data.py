"""Fine-tuning data: JSONL files of chat or prompt/completion records -> token ids and labels.

Two record shapes, one JSON object a line (blank lines are skipped):

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``:
  rendered with the model's chat template; the loss is on the assistant turns only (each
  turn's text and the template's end-of-turn tokens), never on the prompt.
- ``{"prompt": str, "completion": str}``: plain text, no template; the loss is on the
  completion and the end-of-sequence token appended after it.

Labels are the input ids with ``IGNORE_INDEX`` wherever there is no loss. An example longer
than ``max_seq_len`` tokens is refused, not truncated: cutting it would silently drop the
end of the answer, the very tokens the adapter is trained on.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100  # torch's cross_entropy default ignore_index
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where there is no loss
    line_number: int  # 1-based line in the source file

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def load_examples(path: str | Path, tokenizer: Any, max_seq_len: int,
                  field: str = "data") -> list[Example]:
    """Parse, validate and tokenize every record of the JSONL file ``path``.

    ``tokenizer`` is a Hugging Face tokenizer; ``field`` names the flag in error messages.
    Every bad line raises ValueError naming the file, the line number and the field.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{field}: {str(file)!r} is not a file")
    examples: list[Example] = []
    with file.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{field}: {file.name} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            input_ids, labels = tokenize_record(record, tokenizer, where)
            if len(input_ids) > max_seq_len:
                raise ValueError(f"{where}: {len(input_ids)} tokens, longer than max_seq_len "
                                 f"{max_seq_len}; examples are refused, not truncated (that would "
                                 f"cut the answer): raise --max-seq-len or shorten the example")
            examples.append(Example(tuple(input_ids), tuple(labels), line_number))
    if not examples:
        raise ValueError(f"{field}: {str(file)!r} has no examples (the file is empty)")
    return examples


def tokenize_record(record: Any, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one parsed JSONL record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _tokenize_chat(record["messages"], tokenizer, where)
    if "prompt" in record or "completion" in record:
        return _tokenize_completion(record, tokenizer, where)
    raise ValueError(f"{where}: expected a 'messages' field or 'prompt' and 'completion' "
                     f"fields, got keys {sorted(record)}")


def _tokenize_completion(record: dict[str, Any], tokenizer: Any,
                         where: str) -> tuple[list[int], list[int]]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r}")
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key}: expected a string, got {record[key]!r}")
    if not record["completion"]:
        raise ValueError(f"{where}: completion: is empty, so there is nothing to learn")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{where}: the model's tokenizer has no eos token to end a completion")
    # Tokenized apart, as a completions request tokenizes the prompt alone and generates the rest.
    prompt_ids = tokenizer.encode(record["prompt"]) if record["prompt"] else []
    completion_ids = tokenizer.encode(record["completion"], add_special_tokens=False)
    completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _tokenize_chat(messages: Any, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages: expected a non-empty list, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{i}]: expected an object with 'role' and "
                             f"'content', got {message!r}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where}: messages[{i}]: missing field {key!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{i}].role: expected one of {', '.join(ROLES)}, "
                             f"got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: messages[{i}].content: expected a string, "
                             f"got {message['content']!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: messages: no assistant message, so there is nothing to learn")
    if not tokenizer.chat_template:
        raise ValueError(f"{where}: messages: this model's tokenizer has no chat template; "
                         f"use prompt/completion records")

    def render(upto: int, add_generation_prompt: bool) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    # Cut the rendered text at turn boundaries: everything up to an assistant turn's
    # generation prompt is context; the turn the template writes after it is learned.
    # Pieces are tokenized apart so a boundary never falls inside a token.
    full = render(len(messages), False)
    input_ids: list[int] = []
    labels: list[int] = []
    done = 0  # characters of `full` already tokenized
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(i, True), render(i + 1, False)
        if not (full.startswith(start) and full.startswith(end) and done <= len(start) <= len(end)):
            raise ValueError(f"{where}: messages: this model's chat template renders a "
                             f"conversation differently from its beginning, so the assistant "
                             f"turns cannot be located; use prompt/completion records")
        context = tokenizer.encode(full[done:len(start)], add_special_tokens=False)
        answer = tokenizer.encode(full[len(start):len(end)], add_special_tokens=False)
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = len(end)
    rest = tokenizer.encode(full[done:], add_special_tokens=False) if done < len(full) else []
    return input_ids + rest, labels + [IGNORE_INDEX] * len(rest)


def make_batches(examples: list[Example], batch_size: int, seed: int,
                 epoch: int) -> list[list[Example]]:
    """One epoch's batches, reproducible from (seed, epoch). Examples of similar length go
    together (less padding): shuffle, sort within windows of 16 batches, shuffle the batches."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(examples)
    rng.shuffle(order)
    window = batch_size * 16
    batches: list[list[Example]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda e: len(e.input_ids))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, labels, attention_mask, each [B, T_max]."""
    max_len = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), max_len), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), max_len), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
