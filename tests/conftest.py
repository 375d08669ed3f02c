"""Shared fixtures: the real default model, tiny random models, one shared float32 engine.

Loading the real model costs seconds on a small CPU, so the tests that need it share the
session-scoped ``llm_f32`` (and ``hf_f32``, the transformers oracle on the same weights).
Tiny random models (hidden 64, 2-4 layers) carry the default model's tokenizer, so their
vocabulary is the tokenizer's 49152 tokens and text prompts and chat templates work.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracles must never reach for the hub
# OpenMP threads that spin while waiting make every small op ~30x slower as soon as
# another process shares the 2 cores; sleeping waits cost nothing when the CPU is free.
# Must be set before torch (libgomp) is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from loraplex.models.registry import resolve_model  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
VOCAB_SIZE = 49152  # the default model's tokenizer; tiny models must match it

# Everything in the default model's folder that is not the model itself.
_NOT_TOKENIZER = {"config.json", "generation_config.json"}

TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    # Larger than the usual 0.02 so attention is sharp and logits spread out: a wrong
    # mask, position or cache slot then changes the logits far beyond the tolerance.
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def make_tiny_model(root: Path, tokenizer_from: Path, model_type: str = "llama", seed: int = 0,
                    **config_overrides: Any) -> Path:
    """Write a random Hugging Face model folder (float32 safetensors + tokenizer) under ``root``."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[model_type]
    config = config_cls(**{**TINY_DEFAULTS, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    for src in tokenizer_from.iterdir():
        if src.is_file() and src.name not in _NOT_TOKENIZER and "safetensors" not in src.name:
            shutil.copy(src, root / src.name)
    return root


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory,
               default_model_path: Path) -> Callable[..., Path]:
    """``tiny_model(model_type="llama", seed=0, **config_overrides) -> folder``.

    Folders are cached per configuration for the session, so asking twice is free.
    """
    made: dict[str, Path] = {}

    def make(model_type: str = "llama", seed: int = 0, **config_overrides: Any) -> Path:
        key = json.dumps([model_type, seed, config_overrides], sort_keys=True)
        if key not in made:
            root = tmp_path_factory.mktemp(f"tiny_{model_type}")
            made[key] = make_tiny_model(root, default_model_path, model_type, seed,
                                        **config_overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def llm_f32(default_model_path: Path):
    """The real default model in float32, shared by every test that needs it.

    Tests must leave it idle (no unfinished requests) and must not depend on its prefix
    cache being cold unless they use prompts of their own.
    """
    from loraplex import LLM

    # 0.25 GiB holds 5680 tokens, plenty; the default 1 GiB costs seconds just to zero.
    llm = LLM(DEFAULT_MODEL, dtype="float32", kv_cache_gib=0.25)
    yield llm
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="session")
def hf_f32(default_model_path: Path):
    """transformers' own model on the same weights: the oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(default_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)
