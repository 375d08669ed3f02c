"""A decoder layer's per-token ops: the residual add with its RMSNorm, and the SiLU-gated
product. On CPU in bf16 each is one call of kernels/pointwise.c (a decode step's few rows
make torch's eight or two operations cost dispatch, not arithmetic); elsewhere, and with
``LORAPLEX_NATIVE_POINTWISE=0``, torch computes them with the same roundings.
"""
from __future__ import annotations

from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F

from loraplex import kernels

DISABLE_ENV = "LORAPLEX_NATIVE_POINTWISE"


@cache
def kernel() -> ModuleType | None:
    """The built kernels/pointwise.c, or None (no compiler, or switched off)."""
    return kernels.load("pointwise", "_loraplex_pointwise", DISABLE_ENV)


def _native(*tensors: torch.Tensor) -> ModuleType | None:
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous()
               and not t.requires_grad for t in tensors):
        return None
    return kernel()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual); x, residual: [N, d], weight: [d].

    x must be a fresh result the caller no longer needs: the kernel writes the sum into it
    and returns it as the new residual. ``residual=None``: x itself is the residual.
    """
    rows, d = x.shape
    fn = _native(x, weight) if residual is None else _native(x, residual, weight)
    if fn is None:
        residual = x if residual is None else x + residual
        return F.rms_norm(residual, (d,), weight, eps), residual
    out = torch.empty_like(x)
    fn.add_rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                    out.data_ptr(), rows, d, eps, torch.get_num_threads())
    return out, x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up]: [N, 2n] -> [N, n]."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    fn = _native(gate_up)
    if fn is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = gate_up.new_empty(rows, n)
    fn.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, n, torch.get_num_threads())
    return out
