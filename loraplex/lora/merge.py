"""Merging LoRA adapters into the base weights, exactly, and reversibly in a running engine.

Every use shares one computation. Per base projection the adapters' deltas are summed with
their weights and scalings, ``dW = sum_i w_i * s_i * (B_i @ A_i)`` (PEFT's order), added in
float32 to the base weight as the checkpoint holds it, and rounded once to the target dtype:

- ``merge_to_folder``: a standalone Hugging Face folder (``loraplex merge``);
- ``LiveMerge``: adapters merged into the serving model's weights. It keeps the tensors it
  replaced, so ``unmerge`` puts the base back bit for bit; a dedicated deployment merges
  at load and simply drops them.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loraplex.lora.adapter import LoRAAdapter, load_adapter
from loraplex.lora.layers import PROJECTION_SLICES
from loraplex.models.linear import Linear
from loraplex.models.llama import LlamaModel
from loraplex.models.loader import (CheckpointReader, hf_weight_name, read_arch,
                                    safetensors_files)

MAX_SHARD_BYTES = 4 * 2**30
_INDEX_FILE = "model.safetensors.index.json"
_PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def module_delta(adapters: Sequence[LoRAAdapter], weights: Sequence[float],
                 key: tuple[int, str]) -> torch.Tensor | None:
    """The weighted delta [out, in] float32 of one (layer, HF projection); None if no
    adapter targets it. Computed on demand: all deltas at once would outgrow the base."""
    delta = None
    for adapter, weight in zip(adapters, weights):
        module = adapter.modules.get(key)
        if module is None:
            continue
        if delta is None:
            delta = module.b @ module.a
            delta.mul_(weight * module.scaling)
        else:
            delta.addmm_(module.b, module.a, alpha=weight * module.scaling)
    return delta


def merged_weight(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype,
                  what: str) -> torch.Tensor:
    """round_to_dtype(base + delta), summed in float32 (in ``delta``'s buffer); refuses a
    non-finite result."""
    return check_finite(delta.add_(base.to(delta.device, torch.float32)).to(dtype), what)


def check_finite(weight: torch.Tensor, what: str) -> torch.Tensor:
    # One float32 sum is finite whenever every element is (short of sums near 3e38, which
    # then take the exact check): much cheaper than an elementwise test on bf16.
    if not torch.isfinite(weight.sum(dtype=torch.float32)) and not torch.isfinite(weight).all():
        raise ValueError(f"merge: {what} holds NaN or Inf once the adapters' delta is added "
                         f"(in {weight.dtype}); nothing was merged")
    return weight


class LiveMerge:
    """Adapters merged into ``model``'s projections in place of their base weights.

    Base values come from the checkpoint (the weights in the model may be prepacked and
    opaque); the replaced parameters are kept, so ``unmerge`` restores them exactly.
    """

    def __init__(self, model: LlamaModel, checkpoint: CheckpointReader,
                 adapters: Sequence[LoRAAdapter], weights: Sequence[float] | None = None) -> None:
        self.adapters = list(adapters)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.adapters)
        self._replaced: list[tuple[Linear, nn.Parameter, bool]] = []
        dtype = model.embed_tokens.dtype
        try:
            with torch.no_grad():
                for layer, projections in enumerate(model.projections()):
                    for fused, linear in projections.items():
                        self._merge_one(linear, checkpoint, layer, PROJECTION_SLICES[fused], dtype)
        except BaseException:
            self.unmerge()  # all or nothing
            raise

    def _merge_one(self, linear: Linear, checkpoint: CheckpointReader, layer: int,
                   slices: tuple[str, ...], dtype: torch.dtype) -> None:
        deltas = [module_delta(self.adapters, self.weights, (layer, m)) for m in slices]
        if all(d is None for d in deltas):
            return
        bases = [checkpoint.get(hf_weight_name(layer, m)) for m in slices]
        # The fused weight is the slices stacked by rows: [sum(out_i), in], float32.
        fused = torch.cat(bases).to(linear.weight.device, torch.float32)
        row = 0
        for base, delta in zip(bases, deltas):
            if delta is not None:
                fused[row:row + base.shape[0]] += delta.to(fused.device)
            row += base.shape[0]
        merged = check_finite(fused.to(dtype), f"layer {layer} {'+'.join(slices)}")
        was_packed = linear.is_packed
        self._replaced.append((linear, *linear.swap_weight(nn.Parameter(merged, requires_grad=False),
                                                            is_packed=False)))
        if was_packed:
            linear.pack()

    def unmerge(self) -> None:
        """Put back the very tensors the merge replaced."""
        while self._replaced:
            linear, weight, is_packed = self._replaced.pop()
            linear.swap_weight(weight, is_packed)


def merge_to_folder(base: Path, adapter_paths: Sequence[str | Path], out: Path,
                    weights: Sequence[float] | None = None, dtype: torch.dtype = torch.bfloat16,
                    show_progress: bool = True) -> Path:
    """Write ``base`` with the adapters merged as a standalone HF folder at ``out``.

    Written into a temporary sibling folder and renamed at the end: an interrupted or
    refused merge leaves no folder behind.
    """
    from tqdm import tqdm

    out = Path(out)
    weights = list(weights) if weights is not None else [1.0] * len(adapter_paths)
    if not adapter_paths:
        raise ValueError("adapter: give at least one adapter to merge")
    if len(weights) != len(adapter_paths):
        raise ValueError(f"weights: {len(weights)} given for {len(adapter_paths)} adapters")
    if out.exists():
        raise ValueError(f"out: {str(out)!r} exists; merge writes a new folder")
    arch = read_arch(base)
    # Offline there are no slots, so no rank limit.
    adapters = [load_adapter(p, arch, max_lora_rank=1 << 20) for p in adapter_paths]
    targeted = {hf_weight_name(layer, m): (layer, m)
                for a in adapters for layer, m in a.modules}
    checkpoint = CheckpointReader(base)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        shards = _ShardWriter(tmp)
        for name in tqdm(checkpoint.names(), desc="merge", unit="tensor", disable=not show_progress):
            tensor = checkpoint.get(name)
            if name in targeted:
                tensor = merged_weight(tensor, module_delta(adapters, weights, targeted[name]),
                                       dtype, name)
            elif tensor.is_floating_point():
                tensor = tensor.to(dtype)
            shards.add(name, tensor)
        shards.close()
        _copy_side_files(base, tmp, dtype)
        info = {"base": str(base), "dtype": str(dtype).removeprefix("torch."),
                "adapters": [{"path": str(a.path), "content_hash": a.content_hash, "weight": w}
                             for a, w in zip(adapters, weights)]}
        (tmp / "loraplex_merge.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out


class _ShardWriter:
    """safetensors shards of at most MAX_SHARD_BYTES, named and indexed as HF does."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > MAX_SHARD_BYTES:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.weight_map[name] = len(self.files)

    def _flush(self) -> None:
        file = self.folder / f"shard-{len(self.files)}.safetensors"
        save_file(self._pending, str(file), metadata={"format": "pt"})
        self.files.append(file)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.files) == 1:
            self.files[0].rename(self.folder / "model.safetensors")
            return
        n = len(self.files)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for file, name in zip(self.files, names):
            file.rename(self.folder / name)
        index = {"metadata": {}, "weight_map": {k: names[i] for k, i in self.weight_map.items()}}
        (self.folder / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(base: Path, out: Path, dtype: torch.dtype) -> None:
    """config (with the new dtype), tokenizer, generation config; not the base weights."""
    weight_files = {f.name for f in safetensors_files(base)} | {_INDEX_FILE}
    for src in base.iterdir():
        if (src.is_file() and src.name not in weight_files and src.name != "config.json"
                and not src.name.endswith(_PICKLED_WEIGHTS)):
            shutil.copy2(src, out / src.name)
    config = json.loads((base / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
