"""The CPU LoRA kernel of lora/bgmv.c: built at first use as a CPython extension module.

The module is compiled once per machine with the system's C compiler (``-O3
-march=native``, against this Python's headers) into ``$LORAPLEX_HOME/native/`` under a
name that hashes the source, the flags, the Python ABI and the CPU's features, written
atomically, so concurrent first starts and a changed kernel never load a stale or
half-written library. Without a compiler or Python's headers, or with
``LORAPLEX_NATIVE_LORA=0``, ``kernel()`` returns None and LoRA runs on torch products
instead (lora/ops.py); the result is the same within rounding. The slot descriptions the
kernel reads are ctypes structures, built once; only their addresses cross each call.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from loraplex.models.registry import loraplex_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bgmv.c")
# -fopenmp: the kernel shares a step's tokens among the OpenMP threads torch already runs
# (libgomp.so.1, loaded by torch first, so one runtime and one thread pool serve both).
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fPIC", "-shared", "-fno-math-errno",
         "-fopenmp"]
DISABLE_ENV = "LORAPLEX_NATIVE_LORA"

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _LoRASlots(ctypes.Structure):
    """bgmv.c's ``struct lora_slots`` (fields set below: one of them points to its kind)."""


_LoRASlots._fields_ = [("n_in", _i64), ("num_slices", _i64), ("out_offsets", _ptr),
                       ("slot_ranks", _ptr), ("a_flat", _ptr), ("a_slot_stride", _i64),
                       ("b_flat", _ptr), ("b_slot_stride", _i64), ("max_k", _i64),
                       ("next", ctypes.POINTER(_LoRASlots)), ("num_threads", _i64)]

MODULE_NAME = "_loraplex_bgmv"  # bgmv.c's PyInit__loraplex_bgmv


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        include = sysconfig.get_paths()["include"]
        subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def kernel() -> Callable[..., int] | None:
    """bgmv.c's ``add``, or None where it cannot be built (logged once)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() == "Windows":
        log.warning("no C compiler found: LoRA runs on torch products (slower at decode)")
        return None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, " ".join(FLAGS),
                                    sysconfig.get_config_var("EXT_SUFFIX") or "", sys.version,
                                    platform.machine(), _cpu_features()]).encode()).hexdigest()
    target = loraplex_home() / "native" / f"bgmv-{key[:16]}.so"
    try:
        if not target.is_file():
            _build(compiler, target)
        spec = importlib.util.spec_from_file_location(MODULE_NAME, target)
        if spec is None or spec.loader is None:
            raise OSError(f"{target} is not loadable as an extension module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, ImportError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("could not build the LoRA kernel (%s): LoRA runs on torch products", detail)
        return None
    # The call keeps the GIL: it lasts microseconds, less than a release and re-take.
    return module.add


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
        self._next: KernelSlots | None = None

    def run_before(self, other: "KernelSlots") -> None:
        """``other`` is the projection the model runs after this one: each call prefetches
        the weights of its slots there."""
        self._next = other
        self._struct.next = ctypes.pointer(other._struct)

    def add(self, out: torch.Tensor, x: torch.Tensor, tokens: "KernelTokens", alpha: float) -> None:
        """out[t] += alpha * B_s (A_s x[t]) for the tokens t of ``tokens`` and their slots s;
        in place. out: [N, out] bf16, contiguous (a fresh projection output); x: [N, in] bf16.
        Kept to a few tensor calls: on a decode step each Python-level operation costs
        several times its usual time, as the base products between them evict the caches.
        Raises MemoryError if the kernel's scratch memory cannot grow."""
        if not x.is_contiguous():
            x = x.contiguous()
        if not out.is_contiguous():
            raise ValueError("LoRA kernel: the output must be contiguous (it is added in place)")
        self._fn(self._address, tokens.count, tokens.rows_ptr, tokens.slots_ptr, x.data_ptr(),
                 x.shape[1], out.data_ptr(), out.shape[1], alpha)


class KernelTokens:
    """The tokens one step sends to the kernel: rows and their slots, equal slots adjacent."""

    def __init__(self, rows: list[int], slots: list[int]) -> None:
        self.rows = torch.tensor(rows, dtype=torch.int32)  # [n]
        self.slots = torch.tensor(slots, dtype=torch.int32)  # [n]
        self.count, self.rows_ptr, self.slots_ptr = len(rows), self.rows.data_ptr(), self.slots.data_ptr()
