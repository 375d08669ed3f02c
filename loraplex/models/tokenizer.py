"""Tokenizer, chat template and incremental detokenization."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer  # heavy import, only when a model loads

        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.eos_token_ids = frozenset(_eos_token_ids(folder, self.hf.eos_token_id))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("messages: this model's tokenizer has no chat template")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}]: expected {{'role', 'content'}}, got {message!r}")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already writes any special tokens it wants.
        return self.hf.encode(text, add_special_tokens=False)

    def detokenize_incrementally(self, ids: list[int], prefix_offset: int, read_offset: int,
                                 skip_special_tokens: bool = True) -> tuple[str, int, int]:
        """Text that the newest of ``ids`` add; returns (new_text, prefix_offset, read_offset).

        Decodes a short window of recent tokens: the text of ids[prefix:] minus the text
        of ids[prefix:read] is what the tokens after ``read`` add. Text ending in U+FFFD is
        a UTF-8 character cut in the middle, so it waits for the next token.
        """
        prefix_text = self.decode(ids[prefix_offset:read_offset], skip_special_tokens)
        full_text = self.decode(ids[prefix_offset:], skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return "", prefix_offset, read_offset
        return full_text[len(prefix_text):], read_offset, len(ids)

def _eos_token_ids(folder: Path, tokenizer_eos: int | None) -> set[int]:
    """Generation stops at any of: generation_config's eos ids, config's, the tokenizer's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids
