"""Load a Hugging Face safetensors folder into ``LlamaModel``.

Weights are copied straight from the (memory-mapped) safetensors files into the fused
parameters, cast to the serving dtype on the way; nothing else is materialised.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.models.llama import LlamaModel, ModelArch

# HF projection name -> (fused parameter, index of its slice). PEFT target names map
# through the same table (lora/ targets q_proj as slice 0 of qkv_proj).
PACKED_MODULES_MAPPING: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "o_proj": ("o_proj", 0), "down_proj": ("down_proj", 0),
}
# HF projection name -> the block that holds it (model.layers.{i}.{block}.{name}).
MODULE_BLOCKS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm"}


def read_arch(folder: Path) -> ModelArch:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"model: {str(folder)!r} has no config.json; not a Hugging Face model folder")
    return ModelArch.from_hf_config(json.loads(path.read_text()))


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: {str(folder)!r} has no *.safetensors weights")
    return files


class CheckpointReader:
    """Tensors of a safetensors folder (sharded or not) by Hugging Face name, read lazily
    from the memory-mapped files."""

    def __init__(self, folder: Path) -> None:
        self.files = safetensors_files(folder)
        self._handles = [safe_open(str(f), framework="pt") for f in self.files]
        self.file_of = {name: i for i, h in enumerate(self._handles) for name in h.keys()}

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.file_of[name]].get_tensor(name)


def hf_weight_name(layer: int, module: str) -> str:
    """``model.layers.{layer}.{self_attn|mlp}.{module}.weight`` for an HF projection name."""
    return f"model.layers.{layer}.{MODULE_BLOCKS[module]}.{module}.weight"


def slice_rows(arch: ModelArch, fused: str, index: int) -> tuple[int, int]:
    """Row range of sub-projection ``index`` inside a fused parameter."""
    assert fused in ("qkv_proj", "gate_up_proj"), fused
    if fused == "qkv_proj":
        sizes = (arch.q_size, arch.kv_size, arch.kv_size)
    else:
        sizes = (arch.intermediate_size, arch.intermediate_size)
    start = sum(sizes[:index])
    return start, start + sizes[index]


def load_model(folder: Path, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    arch = read_arch(folder)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the serving dtype directly
    try:
        with torch.device(device):
            model = LlamaModel(arch)
    finally:
        torch.set_default_dtype(default_dtype)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                target = _target(name, arch)
                if target is None:
                    continue
                param_name, rows = target
                if param_name not in params:
                    raise ValueError(f"model: weight {name!r} in {file.name} does not fit this "
                                     f"{arch.model_type} model")
                param, tensor = params[param_name], f.get_tensor(name)
                dest = param.data if rows is None else param.data[rows[0]:rows[1]]
                if dest.shape != tensor.shape:
                    raise ValueError(f"model: weight {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(dest.shape)}")
                dest.copy_(tensor)
                filled.add(f"{param_name}:{rows}")
    expected = {f"{n}:{r}" for n, r in _expected_slices(model, arch)}
    missing = expected - filled
    if missing:
        raise ValueError(f"model: {len(missing)} weights missing from {str(folder)!r}, "
                         f"e.g. {sorted(missing)[0]}")
    if arch.tie_word_embeddings:
        model.lm_head.weight.data = model.embed_tokens.data
    return model.eval()


def _target(name: str, arch: ModelArch) -> tuple[str, tuple[int, int] | None] | None:
    """Our parameter name and row slice for an HF weight name; None for buffers we derive."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return "embed_tokens", None
    if name == "model.norm.weight":
        return "norm", None
    if name == "lm_head.weight":
        return None if arch.tie_word_embeddings else ("lm_head.weight", None)
    m = _LAYER_RE.match(name)
    if m is None:
        norm = re.match(r"^model\.layers\.(\d+)\.(\w+)\.weight$", name)
        if norm and norm.group(2) in _NORMS:
            return f"layers.{norm.group(1)}.{_NORMS[norm.group(2)]}", None
        return f"unknown:{name}", None
    layer, _, proj, kind = m.groups()
    if proj not in PACKED_MODULES_MAPPING:
        return f"unknown:{name}", None
    fused, index = PACKED_MODULES_MAPPING[proj]
    param = f"layers.{layer}.{fused}.{kind}"
    rows = slice_rows(arch, fused, index) if fused in ("qkv_proj", "gate_up_proj") else None
    return param, rows


def _expected_slices(model: LlamaModel, arch: ModelArch):
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        fused = name.split(".")[-2] if "." in name else name
        if fused in ("qkv_proj", "gate_up_proj"):
            for index in range(3 if fused == "qkv_proj" else 2):
                yield name, slice_rows(arch, fused, index)
        else:
            yield name, None
