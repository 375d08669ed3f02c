"""A linear layer whose weight can be prepacked for the CPU's matrix kernels.

On CPU, ``F.linear`` with bf16 weights reorders the weight into oneDNN's blocked layout
on every call; for a decode step that reorder costs about as much as the product itself.
Packing once at load removes it (measured here: 1.5x faster weight products at batch 1,
1.2x at 32, identical results). The packed tensor is opaque, so it replaces the plain
weight only for serving; code that needs the values (merging, tests) reads them before
packing or from the checkpoint.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from loraplex.lora.layers import LoRAStack
    from loraplex.lora.ops import LoRAMapping

_PACK_HINT_BATCH = 32  # the layout oneDNN picks for this batch works well for 1..512 rows


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        # Uninitialised: the loader overwrites every parameter.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features), requires_grad=False)
                     if bias else None)
        self.is_packed = False
        self.lora: LoRAStack | None = None  # adapter slots, when LoRA serving is on

    def pack(self) -> None:
        """Swap the weight for its prepacked form where the hardware path has one."""
        if self.is_packed or not can_pack(self.weight):
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, _PACK_HINT_BATCH)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.is_packed = True

    def swap_weight(self, weight: nn.Parameter, is_packed: bool) -> tuple[nn.Parameter, bool]:
        """Serve ``weight`` from now on (packed or plain as told); returns what it replaced,
        so a merge can later put the very same tensor back."""
        previous = (self.weight, self.is_packed)
        self.weight, self.is_packed = weight, is_packed
        return previous

    def forward(self, x: torch.Tensor, lora: LoRAMapping | None = None) -> torch.Tensor:
        """x: [N, in] -> [N, out]; ``lora`` maps tokens to adapter slots for this step."""
        if self.is_packed:
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            out = F.linear(x, self.weight, self.bias)
        if lora is not None and self.lora is not None:
            self.lora.apply(out, x, lora)
        return out
