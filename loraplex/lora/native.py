"""The CPU LoRA kernels of kernels/bgmv.c (a few tokens per slot: decodes) and
kernels/sgmv.c (long runs of one slot: prefills), seen from Python.

``kernel()`` and ``wide_kernel()`` are the modules' ``add``, built at first use
(loraplex/kernels); without a compiler, or with ``LORAPLEX_NATIVE_LORA=0``, they are None
and LoRA runs on torch products instead (lora/ops.py); so does a prefill where the CPU lacks
AVX512-BF16, which sgmv.c needs. The result is the same within rounding. The slot
descriptions both kernels read are ctypes structures, built once; only their addresses
cross each call.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache

import torch

from loraplex import kernels

DISABLE_ENV = "LORAPLEX_NATIVE_LORA"

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _LoRASlots(ctypes.Structure):
    """kernels/lora_slots.h's ``struct lora_slots`` (fields set below: one of them points to its kind)."""


_LoRASlots._fields_ = [("n_in", _i64), ("num_slices", _i64), ("out_offsets", _ptr),
                       ("slot_ranks", _ptr), ("a_flat", _ptr), ("a_slot_stride", _i64),
                       ("b_flat", _ptr), ("b_slot_stride", _i64), ("max_k", _i64),
                       ("next", ctypes.POINTER(_LoRASlots)), ("num_threads", _i64)]


@cache
def kernel() -> Callable[..., None] | None:
    """bgmv.c's ``add``, or None where it cannot be built (logged once)."""
    module = kernels.load("bgmv", "_loraplex_bgmv", DISABLE_ENV)
    # The call keeps the GIL: it lasts microseconds, less than a release and re-take.
    return None if module is None else module.add


@cache
def wide_kernel() -> Callable[..., None] | None:
    """sgmv.c's ``add``, or None where it cannot be built or the CPU lacks AVX512-BF16."""
    if kernel() is None:  # off, or no compiler: logged there
        return None
    module = kernels.load("sgmv", "_loraplex_sgmv", DISABLE_ENV)
    return None if module is None or not module.SUPPORTED else module.add


def can_use(x_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether bf16 activations on ``device`` can use the kernel (CPU only)."""
    return device.type == "cpu" and x_dtype == torch.bfloat16 and kernel() is not None


class KernelSlots:
    """One projection's slot buffers as the kernel reads them. The buffers are allocated
    once and never move, so their addresses are taken once too, into one structure whose
    address is all a call passes."""

    def __init__(self, a_flat: torch.Tensor, b_flat: torch.Tensor, slot_ranks: torch.Tensor,
                 out_offsets: torch.Tensor, n_in: int, max_k: int) -> None:
        """a_flat, b_flat: bf16 slots (layout in lora/ops.py); slot_ranks: [slots] int32,
        0 where a slot's adapter does not target this projection; out_offsets:
        [slices + 1] int64; max_k: slices * the largest rank."""
        assert a_flat.dtype == b_flat.dtype == torch.bfloat16
        assert slot_ranks.dtype == torch.int32 and out_offsets.dtype == torch.int64
        self._buffers = (a_flat, b_flat, slot_ranks, out_offsets)  # keep them alive
        self._struct = _LoRASlots(n_in, out_offsets.shape[0] - 1, out_offsets.data_ptr(),
                                  slot_ranks.data_ptr(), a_flat.data_ptr(), a_flat.stride(0),
                                  b_flat.data_ptr(), b_flat.stride(0), max_k, None,
                                  torch.get_num_threads())
        self._address = ctypes.addressof(self._struct)
        self._fn = kernel()
        self._wide_fn = wide_kernel()
        self._next: KernelSlots | None = None

    def run_before(self, other: "KernelSlots") -> None:
        """``other`` is the projection the model runs after this one: each call prefetches
        the weights of its slots there."""
        self._next = other
        self._struct.next = ctypes.pointer(other._struct)

    def add(self, out: torch.Tensor, x: torch.Tensor, tokens: "KernelTokens", alpha: float,
            wide: bool = False) -> None:
        """out[t] += alpha * B_s (A_s x[t]) for the tokens t of ``tokens`` and their slots s;
        in place, by bgmv.c, or with ``wide`` by sgmv.c (long runs of one slot: prefill
        chunks; only where ``wide_kernel()`` is not None). out: [N, out] bf16, contiguous (a
        fresh projection output); x: [N, in] bf16. Kept to a few tensor calls: on a decode
        step each Python-level operation costs several times its usual time, as the base
        products between them evict the caches. Raises MemoryError if the kernel's scratch
        memory cannot grow."""
        if not x.is_contiguous():
            x = x.contiguous()
        if not out.is_contiguous():
            raise ValueError("LoRA kernel: the output must be contiguous (it is added in place)")
        (self._wide_fn if wide else self._fn)(
            self._address, tokens.count, tokens.rows_ptr, tokens.slots_ptr, x.data_ptr(),
            x.shape[1], out.data_ptr(), out.shape[1], alpha)


class KernelTokens:
    """The tokens one step sends to the kernel: rows and their slots, equal slots adjacent."""

    def __init__(self, rows: list[int], slots: list[int]) -> None:
        self.rows = torch.tensor(rows, dtype=torch.int32)  # [n]
        self.slots = torch.tensor(slots, dtype=torch.int32)  # [n]
        self.count, self.rows_ptr, self.slots_ptr = len(rows), self.rows.data_ptr(), self.slots.data_ptr()
