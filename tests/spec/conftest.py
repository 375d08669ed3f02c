"""Tiny target and draft models (the default model's tokenizer) and PEFT adapters for them."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_adapters import make_adapter as make_peft_adapter


@pytest.fixture(scope="session")
def tiny_target(tiny_model: Callable[..., Path]) -> Path:
    """Logits a little less spread than the default tiny model's: its greedy output
    repeats itself now and then, which gives the n-gram lookup something to find."""
    return tiny_model(initializer_range=0.08)


@pytest.fixture(scope="session")
def tinier_draft(tiny_model: Callable[..., Path]) -> Path:
    """Half the width, one layer, another seed: a draft that is often wrong."""
    return tiny_model(seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)


def make_adapter(base: Path, folder: Path, seed: int, b_std: float = 0.2) -> Path:
    """A real PEFT adapter (r 4, attention and MLP) whose lora_B is random."""
    return make_peft_adapter(base, folder, seed, b_std, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="session")
def tiny_adapters(tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec_adapters")
    return {name: make_adapter(tiny_target, root / name, seed=i)
            for i, name in enumerate(["a", "b"])}


def spy_steps(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[Any, int, int]]]:
    """Per executed step: (adapter name or None, tokens scheduled, draft tokens) per sequence.
    The real runner still runs."""
    steps: list[list[tuple[Any, int, int]]] = []
    execute = engine.runner.execute

    def spy(batch: Any) -> Any:
        steps.append([(s.lora.name if s.lora else None, n, len(s.draft_token_ids))
                      for s, n in zip(batch.seqs, batch.num_new_tokens)])
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", spy)
    return steps


def noisy_copy(src: Path, dst: Path, std: float, seed: int = 0) -> Path:
    """A copy of the HF model folder ``src`` with Gaussian noise on its output head: a
    draft that agrees with its target often, but not always (noise on every weight makes
    a random model's predictions unrelated)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"] += std * torch.randn(tensors["lm_head.weight"].shape, generator=g)
    save_file(tensors,
              dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def small_vocab_pair(tiny_model: Callable[..., Path],
                     tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny target whose model knows only the first 256 token ids (the tokenizer files
    are the default model's; ids below 256 detokenize fine), and a noisy copy as draft."""
    target = tiny_model(vocab_size=256)
    return target, noisy_copy(target, tmp_path_factory.mktemp("noisy") / "draft", std=0.05)
