"""Tiny random Llama + real PEFT adapters saved with ``save_pretrained``, for the LoRA tests.

The base here has its own 256-token vocabulary: adapter tests never tokenize, so they do
not need the default model's tokenizer (or the default model) at all.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex.models.llama import ModelArch
from loraplex.models.loader import read_arch
from peft_adapters import make_adapter  # noqa: F401  (the tests import it from here)

TINY_LLAMA: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(torch.float32).eval()


@pytest.fixture(scope="session")
def new_tiny_llama() -> Callable[..., Any]:
    """``new_tiny_llama(seed=0)``: a fresh model; test modules cannot import conftest."""
    return tiny_llama


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> ModelArch:
    folder = tmp_path_factory.mktemp("tiny_llama_config")
    tiny_llama().config.save_pretrained(folder)  # transformers 5 writes rope_parameters
    return read_arch(folder)


def save_peft_adapter(folder: Path, seed: int = 0, **lora_kwargs: Any) -> Any:
    """Wrap a fresh tiny Llama with ``LoraConfig(**lora_kwargs)``, make every lora_B random
    (PEFT starts it at zero, which would hide any scaling error), save it; return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(seed), LoraConfig(**lora_kwargs))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param))
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.fixture
def make_peft_adapter(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
    """``make_peft_adapter(subdir="adapter", seed=0, **lora_kwargs) -> (folder, peft_model)``."""
    def make(subdir: str = "adapter", seed: int = 0, **lora_kwargs: Any) -> tuple[Path, Any]:
        folder = tmp_path / subdir
        return folder, save_peft_adapter(folder, seed, **lora_kwargs)

    return make


@pytest.fixture(scope="session")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid rank-4 adapter on all seven projections; tests copy it before breaking it."""
    folder = tmp_path_factory.mktemp("good_adapter")
    save_peft_adapter(folder, r=4, lora_alpha=8,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"])
    return folder


def hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


