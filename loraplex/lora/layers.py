"""Preallocated adapter slots of one fused projection (the layout lora/ops.py reads).

Each LoRA-capable projection of the model (qkv_proj, o_proj, gate_up_proj, down_proj of
every layer) owns one ``LoRAStack``. Loading an adapter into slot s copies its A and its B
times the module's scaling, transposed, into the blocks sized by its own rank; everything
else in the slot's used region is zeroed, so slices it does not target contribute nothing.
"""
from __future__ import annotations

from itertools import accumulate

import torch

from loraplex.lora import native
from loraplex.lora.adapter import LoRAAdapter
from loraplex.lora.ops import LoRAMapping, add_lora, slot_views
from loraplex.models.llama import LlamaModel

# Fused projection -> the HF module names of its slices, in output order.
PROJECTION_SLICES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LoRAStack:
    def __init__(self, slice_names: tuple[str, ...], in_features: int, out_sizes: list[int],
                 max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.slice_names = slice_names
        self.in_features = in_features
        self.out_sizes = out_sizes
        self.out_features = sum(out_sizes)
        k = len(slice_names) * max_rank
        # Per slot, A and block-diagonal B^T packed by the slot's own rank (lora/ops.py).
        self.a_flat = torch.zeros(max_loras, in_features * k, dtype=dtype, device=device)
        self.b_flat = torch.zeros(max_loras, k * self.out_features, dtype=dtype, device=device)
        self.weighted_slots: set[int] = set()  # slots whose adapter targets this projection
        # For the CPU kernel: [slots] int32, each slot's rank, 0 where it targets nothing here.
        self.slot_ranks = torch.zeros(max_loras, dtype=torch.int32)
        self.out_offsets = torch.tensor([0, *accumulate(out_sizes)])
        self.kernel = (native.KernelSlots(self.a_flat, self.b_flat, self.slot_ranks,
                                          self.out_offsets, in_features, k)
                       if native.can_use(dtype, device) else None)
        # slot -> its (A^T [in, k], B^T [k, out]) views at the loaded rank (lora/ops.py)
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self, slot: int, rank: int,
             modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """rank: the slot's rank (the adapter's largest); modules: HF slice name ->
        (A [r, in], B [out, r], scaling) for this layer, r <= rank (rank_pattern); B is
        multiplied by its scaling as it is copied in (one pass, as fast as a plain copy)."""
        a_t, b_t = slot_views(self.a_flat, self.b_flat, slot, rank, len(self.slice_names),
                              self.in_features, self.out_features)
        a_t.zero_()
        b_t.zero_()
        offset = 0
        for i, (name, size) in enumerate(zip(self.slice_names, self.out_sizes)):
            if name in modules:
                a, b, scaling = modules[name]  # [r_i, in], [size, r_i]
                a_t[:, i * rank:i * rank + a.shape[0]].copy_(a.T)
                b_slice = b_t[i * rank:i * rank + b.shape[1], offset:offset + size]
                torch.mul(b.T, scaling, out=b_slice)
            offset += size
        if modules:
            self.weighted_slots.add(slot)
        else:
            self.weighted_slots.discard(slot)
        self.slot_ranks[slot] = rank if modules else 0
        self.views[slot] = (a_t, b_t)

    def apply(self, out: torch.Tensor, x: torch.Tensor, mapping: LoRAMapping) -> None:
        """out: [N, out] base result, x: [N, in]; adds each token's adapter delta in place."""
        for p in mapping.passes:
            if self.weighted_slots.isdisjoint(p.slots):
                # None of the step's adapters targets this projection (PEFT's default q_proj
                # and v_proj leave o, gate_up and down alone): no call at all, 3 of 4 per
                # layer for such adapters.
                continue
            groups = p.groups
            if self.kernel is not None:
                if p.narrow is not None:
                    self.kernel.add(out, x, p.narrow, p.alpha)
                if p.wide is not None:
                    self.kernel.add(out, x, p.wide, p.alpha, wide=True)
                if not p.wide_groups:  # nothing left for torch, nothing to build
                    continue
                groups = p.wide_groups
            # Skip the groups whose adapters do not target this projection at all.
            groups = [g for g in groups if not self.weighted_slots.isdisjoint(g.slots)]
            if groups:
                add_lora(out, x, groups, self.a_flat, self.b_flat, self.out_sizes, p.alpha,
                         self.views)


def slot_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the adapter slots for a model served in ``model_dtype``."""
    if device.type == "cpu" and not native.can_use(model_dtype, device):
        # Without the kernel, LoRA's thin products (k = 4..48 columns) run several times
        # faster in float32 than in bf16 on CPU (measured without AMX: [1, 576] @ [576, 48]
        # @ [48, 960] takes ~11 us in float32, ~80 us in bf16, as long as the base's whole
        # packed [576, 960] product).
        return torch.float32
    return model_dtype


def attach_lora_stacks(model: LlamaModel, max_loras: int, max_rank: int) -> list[dict[str, LoRAStack]]:
    """Give every LoRA-capable projection of ``model`` its slots; returns them per layer."""
    arch = model.arch
    out_sizes = {"qkv_proj": [arch.q_size, arch.kv_size, arch.kv_size], "o_proj": [arch.hidden_size],
                 "gate_up_proj": [arch.intermediate_size] * 2, "down_proj": [arch.hidden_size]}
    in_sizes = {"qkv_proj": arch.hidden_size, "o_proj": arch.q_size,
                "gate_up_proj": arch.hidden_size, "down_proj": arch.intermediate_size}
    dtype, device = model.embed_tokens.dtype, model.embed_tokens.device
    dtype = slot_dtype(dtype, device)
    stacks = []
    for projections in model.projections():
        layer_stacks = {}
        for name, linear in projections.items():
            linear.lora = LoRAStack(PROJECTION_SLICES[name], in_sizes[name], out_sizes[name],
                                    max_loras, max_rank, dtype, device)
            layer_stacks[name] = linear.lora
        stacks.append(layer_stacks)
    kernels = [s.kernel for layer in stacks for s in layer.values() if s.kernel is not None]
    for first, then in zip(kernels, kernels[1:]):  # model order: qkv, o, gate_up, down, ...
        first.run_before(then)
    return stacks


def load_into_slot(stacks: list[dict[str, LoRAStack]], slot: int, adapter: LoRAAdapter) -> None:
    """Copy ``adapter``'s weights into ``slot`` of every projection (cast to the slot dtype)."""
    by_layer: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = [{} for _ in stacks]
    for (layer, module), weights in adapter.modules.items():
        by_layer[layer][module] = (weights.a, weights.b, weights.scaling)
    for layer_stacks, modules in zip(stacks, by_layer):
        for stack in layer_stacks.values():
            stack.load(slot, adapter.max_rank,
                       {name: modules[name] for name in stack.slice_names if name in modules})
