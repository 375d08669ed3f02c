"""Tokenizer wrapper: incremental detokenization, EOS ids, chat template."""
from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.models.tokenizer import Tokenizer

TEXTS = [
    " Paris is the capital of France.",
    " 你好，世界！这是一个测试。",
    " Emoji 🙂🚀 and accents: café, naïve, Ærøskøbing.",
    "\n\n  code:\tdef f(x):\n        return x  # done",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    pieces, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):
        new, prefix, read = tokenizer.detokenize_incrementally(ids[:n], prefix, read,
                                                              skip_special_tokens)
        pieces.append(new)
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # a split character waits for its bytes


def test_multibyte_characters_span_tokens(tokenizer: Tokenizer) -> None:
    # Byte-level BPE splits some characters over several tokens: the first ones yield nothing.
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    pieces = stream(tokenizer, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🙂"


def test_special_tokens_skipped_or_shown(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Yes.") + [2] + tokenizer.encode(" more")
    assert "".join(stream(tokenizer, ids)) == "Yes. more"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)) == "Yes.<|im_end|> more"


def test_eos_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token_ids == frozenset({2})
    assert tokenizer.vocab_size == 49152


def test_chat_template(tokenizer: Tokenizer) -> None:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == ids.count(2) + 1  # every turn opened; the last left open
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tokenizer.apply_chat_template(["hi"])  # type: ignore[list-item]
