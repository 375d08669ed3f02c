"""Read and validate a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

The result is float32 ``a`` [r, in] and ``b`` [out, r] per (layer, HF projection name), as
the file holds them, and the module's ``scaling``: ``(b @ a) * scaling`` is PEFT's
``get_delta_weight``. Which modules are targeted and how they are scaled follows PEFT's own
rules (``check_target_module_exists``, ``get_pattern_key``); everything this engine cannot
serve is refused here, at load, with the path, the field and the value.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import mmap
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from blake3 import blake3

from loraplex.models.llama import ModelArch
from loraplex.models.loader import MODULE_BLOCKS as _BLOCK

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_NOT_LORA_TARGETS = ("model.embed_tokens", "lm_head")
# Config fields that, when set, change what the adapter computes in ways we do not implement.
_UNSUPPORTED_FIELDS = ("use_dora", "modules_to_save", "lora_bias", "target_parameters",
                       "trainable_token_indices", "layer_replication", "alora_invocation_tokens",
                       "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
                       "velora_config", "monteclora_config", "megatron_config")
# PEFT's save_pretrained strips the adapter name: ...q_proj.lora_A.weight, never .default.
_TENSOR_RE = re.compile(
    r"^base_model\.model\.(model\.layers\.(\d+)\.(\w+)\.(\w+))\.lora_([AB])\.weight$")


# A weights file is read, then hashed, on _READER, while the loading thread parses and
# validates its header and then checks the values are finite. The read and the hash are
# one call each and let the GIL go for their whole length: a thread that needs the GIL
# back waits up to the switch interval (5 ms) for whichever thread holds it, so passing
# 4 MB chunks from a reading thread to a hashing one cost more than the overlap saved.
_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-read")
# Bytes read for the safetensors header before its length is known: an all-linear adapter
# of a 30-layer model has a ~40 KB header; a second read (a disk's latency) fetches the rest.
_HEADER_GUESS = 128 << 10
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # for mincore


class AdapterError(ValueError):
    """An adapter folder this engine refuses to load; the message names path, field and value."""


Fail = Callable[[str, Any, str], AdapterError]


@dataclass(frozen=True)
class LoRAModuleWeights:
    a: torch.Tensor  # [r, in_features] float32, from lora_A
    b: torch.Tensor  # [out_features, r] float32, from lora_B (the delta is scaling * b @ a)
    rank: int
    scaling: float  # lora_alpha / r (or / sqrt(r) with rsLoRA), after rank/alpha_pattern


@dataclass(frozen=True)
class LoRAAdapter:
    name: str  # a label only; caches key on content_hash
    path: Path
    content_hash: str  # BLAKE3 over the config bytes and the weights bytes
    max_rank: int
    modules: dict[tuple[int, str], LoRAModuleWeights]  # (layer index, HF projection name)
    num_bytes: int  # bytes of all a and b tensors

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.modules)


def module_features(arch: ModelArch, module: str) -> tuple[int, int]:
    """(in_features, out_features) of an HF projection of ``arch``."""
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_size, arch.kv_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]


def pattern_key(patterns: dict[str, Any], key: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``key`` at a dot."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", key)), None)


def load_adapter(path: str | Path, arch: ModelArch, max_lora_rank: int,
                 name: str | None = None,
                 buffer_for: Callable[[int], bytearray | memoryview] = bytearray) -> LoRAAdapter:
    """Read, validate and hash a PEFT folder. The weights file is read once into a private
    buffer, ``buffer_for(file size rounded up to 4 KiB)``, that the returned tensors view
    (float32 files: no copy; the scaling is applied where the weights are used, never to
    the buffer). Only the values wait for the read to finish: names, shapes and ranks are
    checked while it runs."""
    folder = Path(path)

    def fail(field: str, value: Any, why: str) -> AdapterError:
        return AdapterError(f"adapter {str(folder)!r}: {field}: {value!r} {why}")

    config_bytes, config = _read_config(folder, fail)
    _check_fields(config, fail)
    weights_bytes, reading, hashing = _start_reading(folder, config_bytes, buffer_for, fail)
    base_keys = {f"model.layers.{i}.{block}.{m}": (i, m)
                 for i in range(arch.num_layers) for m, block in _BLOCK.items()}
    targeted = _targeted_keys(config, base_keys, arch, fail)
    tensors, float32_data = _parse_safetensors(weights_bytes, fail)
    pairs = _pair_tensors(tensors, arch, fail)
    untargeted, missing = sorted(set(pairs) - targeted), sorted(targeted - set(pairs))
    if untargeted:
        raise fail("target_modules", config.get("target_modules"),
                   f"does not target {untargeted[0]}, but {WEIGHTS_FILE} has tensors for it")
    if missing:
        raise fail(WEIGHTS_FILE, missing[0], f"is targeted by {CONFIG_FILE} but has no tensors")

    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern", {}), config.get("alpha_pattern", {})
    validated: list[tuple[tuple[int, str], torch.Tensor, torch.Tensor, int, float]] = []
    for key, (a, b) in sorted(pairs.items(), key=lambda item: base_keys[item[0]]):
        layer, module = base_keys[key]
        r_key, alpha_key = pattern_key(rank_pattern, key), pattern_key(alpha_pattern, key)
        r_field = "r" if r_key is None else f"rank_pattern[{r_key!r}]"
        alpha_field = "lora_alpha" if alpha_key is None else f"alpha_pattern[{alpha_key!r}]"
        r = config.get("r", 8) if r_key is None else rank_pattern[r_key]  # PEFT's defaults
        alpha = config.get("lora_alpha", 8) if alpha_key is None else alpha_pattern[alpha_key]
        if type(r) is not int or r <= 0 or type(alpha) not in (int, float):  # bool is no number
            raise fail(f"{r_field}, {alpha_field}", (r, alpha), "must be a positive int, a number")
        if r > max_lora_rank:
            raise fail(r_field, r, f"is above max_lora_rank {max_lora_rank} (module {key})")
        in_f, out_f = module_features(arch, module)
        # PEFT stores [r, in] / [out, r] even with fan_in_fan_out (which it resets for
        # nn.Linear, i.e. all of Llama), so a transposed file is malformed, not a variant.
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise fail(f"{key} shapes", (tuple(a.shape), tuple(b.shape)), f"do not fit the "
                       f"base: expected lora_A [r, {in_f}] and lora_B [{out_f}, r]")
        if a.shape[0] != b.shape[1]:
            raise fail(f"{key} rank", (a.shape[0], b.shape[1]), "differs in lora_A and lora_B")
        if a.shape[0] != r:
            raise fail(r_field, r, f"disagrees with the rank {a.shape[0]} of the {key} tensors")
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        validated.append(((layer, module), a, b, r, scaling))

    reading.result()  # every byte is in
    _check_finite(tensors, float32_data, fail)
    f32 = torch.float32  # a float32 tensor stays a view into the buffer
    modules = {key: LoRAModuleWeights(a=a.to(f32), b=b.to(f32), rank=r, scaling=scaling)
               for key, a, b, r, scaling in validated}
    digest = hashing.result()
    num_bytes = sum(t.numel() * t.element_size() for w in modules.values() for t in (w.a, w.b))
    return LoRAAdapter(name or folder.name, folder, digest,
                       max(w.rank for w in modules.values()), modules, num_bytes)


def _read_config(folder: Path, fail: Fail) -> tuple[bytes, dict[str, Any]]:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise fail(CONFIG_FILE, str(file), "is missing; not a PEFT adapter folder")
    data = file.read_bytes()
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(CONFIG_FILE, str(file), f"is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise fail(CONFIG_FILE, type(config).__name__, "must hold a JSON object")
    return data, config


def _start_reading(folder: Path, config_bytes: bytes,
                   buffer_for: Callable[[int], bytearray | memoryview], fail: Fail
                   ) -> tuple[memoryview, Future[None], Future[str]]:
    """The weights file's bytes (a view of ``buffer_for``'s buffer), with its safetensors
    header read already; the read of the rest, running on ``_READER``; and the content hash
    over the config and the file, queued there after it (one read serves both the hash and
    the tensors)."""
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        if (folder / PICKLE_FILE).is_file():  # never unpickled: a pickle can run arbitrary code
            raise fail(PICKLE_FILE, str(folder / PICKLE_FILE), "is a pickle and is not loaded; "
                       f"safetensors is required: save the adapter as {WEIGHTS_FILE}")
        raise fail(WEIGHTS_FILE, str(file), "is missing")
    reader = _FileReader(file, buffer_for, fail)
    try:
        view = reader.data
        reader.read_to(min(len(view), _HEADER_GUESS))  # one read, most often
        reader.read_to(min(len(view), 8 + int.from_bytes(view[:8], "little")))  # the header
    except BaseException:
        reader.close()
        raise

    in_read = threading.Event()

    def read_rest() -> None:
        in_read.set()
        try:
            reader.read_to(len(view))
        finally:
            reader.close()

    def content_hash() -> str:  # after read_rest (one worker); if it failed, unused
        # Cryptographic (tenants must not forge another's identity), ~3x sha256; its own
        # threads share a large input (19.6 MB: 4 ms on one core, 2 on two).
        digest = blake3(max_threads=blake3.AUTO)
        # Length-prefixed parts: the boundary between config and weights is unambiguous.
        digest.update(len(config_bytes).to_bytes(8, "little") + config_bytes
                      + len(view).to_bytes(8, "little"))
        digest.update(view)
        return digest.hexdigest()

    reading, hashing = _READER.submit(read_rest), _READER.submit(content_hash)
    # Wait (the GIL let go) until the reader is in its read: had this thread gone on with
    # the header's Python work, the reader would have waited for the GIL up to the switch
    # interval (5 ms; measured: its read started 4-10 ms after it was handed over).
    in_read.wait()
    return view, reading, hashing


class _FileReader:
    """Reads a file front to back into a buffer from ``buffer_for``: what the page cache
    holds by copying it, the rest bypassing the page cache (O_DIRECT) where the system
    allows it.

    Why: on this project's VMs, a buffered read of a 19.6 MB file the page cache had
    dropped took 7 ms at times and 22-32 ms at others (once the process had a model
    loaded), where O_DIRECT into the already faulted-in buffer took 4.5-7 ms throughout:
    the page cache's fresh pages cost what the buffer's did not. But a file still in the
    page cache (just written or read) is copied from it: a direct read would write its
    dirty pages back first, then read the disk again. Direct reads need the buffer's
    address, the file offset and the length in whole blocks; the buffer gets room for the
    last block, and anything that refuses (a filesystem without O_DIRECT, an unaligned
    buffer such as a bytearray) reads through the page cache instead.
    """

    BLOCK = 4096  # a multiple of any disk's logical block size

    def __init__(self, file: Path, buffer_for: Callable[[int], bytearray | memoryview],
                 fail: Fail) -> None:
        self.file, self._fail, self._done, self._direct = file, fail, 0, False
        self._fd = os.open(file, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            self._buffer = memoryview(buffer_for(self._whole_blocks(size)))
            self.data = self._buffer[:size]
            if size:
                self.read_to(_cached_prefix(self._fd, size))
                if self._done < size and _address(self._buffer) % self.BLOCK == 0:
                    self._reopen_direct()
        except BaseException:
            self.close()
            raise

    def _reopen_direct(self) -> None:
        direct = getattr(os, "O_DIRECT", 0)
        if not direct:
            return
        try:
            fd = os.open(self.file, os.O_RDONLY | direct)
        except OSError:
            return
        os.close(self._fd)
        self._fd, self._direct = fd, True  # from _done: the cached prefix ends on a page

    def read_to(self, end: int) -> None:
        """Have the file's bytes [0, end) in the buffer (one call per system read, which
        lets the GIL go)."""
        while self._done < end:
            stop = self._whole_blocks(end) if self._direct else end
            try:
                got = os.preadv(self._fd, [self._buffer[self._done:stop]], self._done)
            except OSError:
                if not self._direct:
                    raise
                self._direct = False  # refused after all (EINVAL): through the page cache
                os.close(self._fd)
                self._fd = os.open(self.file, os.O_RDONLY)
                continue
            if not got:
                raise self._fail(WEIGHTS_FILE, str(self.file), "changed while it was read")
            self._done = min(self._done + got, len(self.data))

    @classmethod
    def _whole_blocks(cls, size: int) -> int:
        return -(-size // cls.BLOCK) * cls.BLOCK

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _cached_prefix(fd: int, size: int) -> int:
    """How many of the file's first bytes the page cache holds, in whole pages (0 where
    it cannot tell). mincore on a mapping of the file asks without reading: a read that
    must not wait (RWF_NOWAIT) still starts the kernel's readahead of the rest."""
    try:
        with mmap.mmap(fd, size, access=mmap.ACCESS_COPY) as mapping:  # private: writable view, no I/O
            start = ctypes.c_char.from_buffer(mapping)
            resident = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
            failed = _LIBC.mincore(ctypes.byref(start), ctypes.c_size_t(size), resident)
            del start  # the mapping closes only without exports
    except (OSError, ValueError, AttributeError):
        return 0
    if failed:
        return 0
    missing = np.flatnonzero((np.frombuffer(resident, dtype=np.uint8) & 1) == 0)  # low bit: resident
    return size if missing.size == 0 else int(missing[0]) * mmap.PAGESIZE


def _address(buffer: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _parse_safetensors(data: bytearray | memoryview, fail: Fail
                       ) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    """Tensors of a safetensors file as views into ``data`` (no copy), and the whole data
    section as one float32 view when every tensor is float32 and they tile it exactly
    (what PEFT writes), else None.

    The format: an 8-byte little-endian header length, a JSON header naming each tensor's
    dtype, shape and [begin, end) byte range after the header, then the bytes. Every range
    is checked against the file before a view is made, and no two may overlap (the format
    lays tensors one after another, as the safetensors library checks too).
    """
    def bad(why: str) -> AdapterError:
        return fail(WEIGHTS_FILE, f"{len(data)} bytes", f"is not a valid safetensors file: {why}")

    if len(data) < 8:
        raise bad("shorter than its header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise bad(f"header of {header_len} bytes runs past the end (truncated?)")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    start, size = 8 + header_len, len(data) - 8 - header_len
    tensors, ranges = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(shape)
            valid = (all(type(d) is int and d >= 0 for d in shape)
                     and type(begin) is int and type(end) is int and 0 <= begin <= end <= size)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry {info!r}") from None
        if not valid:
            raise bad(f"tensor {name!r} has byte range {[begin, end]} outside the file's "
                      f"{size} data bytes (truncated?)")
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise fail("tensor", name, f"must be a 2-D float tensor, got {dtype_name} {tuple(shape)}")
        if end - begin != numel * dtype.itemsize:
            raise bad(f"tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype_name}")
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin)
                         .view(shape) if numel else torch.empty(shape, dtype=dtype))
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise bad(f"tensors {first!r} and {second!r} share bytes")
    float32_data = None
    if (ranges and start % 4 == 0 and all(t.dtype == torch.float32 for t in tensors.values())
            and ranges[0][0] == 0 and ranges[-1][1] == size
            and all(e == b for (_, e, _), (b, _, _) in zip(ranges, ranges[1:]))):
        float32_data = np.frombuffer(data, dtype=np.float32, count=size // 4, offset=start)
    return tensors, float32_data


def _matcher(field: str, spec: Any, fail: Fail) -> Callable[[str], bool]:
    """PEFT's module-name rule: a string is a regex for the full name; a list holds names
    that equal the full name or end it after a dot."""
    if isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as e:
            raise fail(field, spec, f"is not a valid regex: {e}") from e
        return lambda key: regex.fullmatch(key) is not None
    if not isinstance(spec, list) or not all(isinstance(n, str) for n in spec):
        raise fail(field, spec, "must be a list of module names, a regex or 'all-linear'")
    return lambda key: any(key == n or key.endswith(f".{n}") for n in spec)


def _check_fields(config: dict[str, Any], fail: Fail) -> None:
    peft_type = config.get("peft_type", "LORA")  # PEFT always writes it; hand-made files may not
    if peft_type != "LORA":
        raise fail("peft_type", peft_type, "is not supported; only LORA adapters are")
    for field in _UNSUPPORTED_FIELDS:
        if config.get(field):
            raise fail(field, config[field],
                       "is not supported" + (" (DoRA)" if field == "use_dora" else ""))
    if config.get("bias", "none") != "none":
        raise fail("bias", config["bias"], 'is not supported; only "none" is')
    for field in ("rank_pattern", "alpha_pattern"):
        config[field] = config.get(field) or {}
        if not isinstance(config[field], dict):
            raise fail(field, config[field], "must be a JSON object")
        for pattern in config[field]:
            _matcher(field, pattern, fail)  # compiles it: a bad regex fails here, not later


def _targeted_keys(config: dict[str, Any], base_keys: dict[str, tuple[int, str]],
                   arch: ModelArch, fail: Fail) -> set[str]:
    """The base modules PEFT would adapt (its ``check_target_module_exists``)."""
    targets = config.get("target_modules")
    if targets is None:
        targets = ["q_proj", "v_proj"]  # PEFT's default for llama, mistral and qwen2
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(_BLOCK)  # every linear layer but the output head
    is_target = _matcher("target_modules", targets, fail)
    if any(is_target(k) for k in _NOT_LORA_TARGETS):
        raise fail("target_modules", targets, "is not supported (embedding or lm_head target)")
    for name in targets if isinstance(targets, list) else []:
        if not any(k == name or k.endswith(f".{name}") for k in base_keys):
            raise fail("target_modules", name, f"names no module of this {arch.model_type} base "
                       f"(projections: {', '.join(_BLOCK)}; {arch.num_layers} layers)")
    exclude = config.get("exclude_modules")
    is_excluded = _matcher("exclude_modules", exclude, fail) if exclude else lambda key: False
    layers, layers_pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    layers = [layers] if isinstance(layers, int) else layers
    if layers:
        if isinstance(targets, str):  # PEFT's LoraConfig refuses this combination too
            raise fail("layers_to_transform", layers, "cannot be used with a regex target_modules")
        for i in layers:
            if not isinstance(i, int) or not 0 <= i < arch.num_layers:
                raise fail("layers_to_transform", i,
                           f"is not a layer of this base (num_layers {arch.num_layers})")
        # PEFT reads the index after `layers_pattern` (any name when unset); ours is `layers`.
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
        if patterns and "layers" not in patterns:
            raise fail("layers_pattern", layers_pattern, "matches no layer list of this base")
    chosen = {k for k, (i, _) in base_keys.items()
              if is_target(k) and not is_excluded(k) and (not layers or i in layers)}
    if not chosen:
        raise fail("target_modules", targets, "selects no module of the base")
    return chosen


def _check_finite(tensors: dict[str, torch.Tensor], float32_data: np.ndarray | None,
                  fail: Fail) -> None:
    """One float32 sum over all the weights (``float32_data``, or one per tensor): finite
    whenever every element is (the exact test runs only when a sum is not, and names the
    tensor). numpy sums the whole file on this thread: a torch op that large would start
    an OpenMP team for the loading thread beside the engine's."""
    if not tensors:
        return
    if float32_data is not None:
        with np.errstate(over="ignore"):
            if np.isfinite(float32_data.sum()):
                return
    elif torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()])).all():
        return
    for tensor_name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise fail("tensor", tensor_name, "has NaN or Inf values")


def _pair_tensors(tensors: dict[str, torch.Tensor], arch: ModelArch,
                  fail: Fail) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full module name -> (lora_A, lora_B), as stored; checks names, dimensions and dtypes
    only (the values may still be arriving)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in tensors.items():
        m = _TENSOR_RE.match(tensor_name)
        if m is None:
            why = "is not a lora_A/lora_B weight of a decoder projection"
            if "embed_tokens" in tensor_name or "lm_head" in tensor_name:
                why = "is not supported (embedding or lm_head target)"
            elif "lora_magnitude_vector" in tensor_name:
                why = "is not supported (DoRA)"
            raise fail("tensor", tensor_name, why)
        key, layer, block, module, side = m.groups()
        if _BLOCK.get(module) != block or int(layer) >= arch.num_layers:
            raise fail("tensor", tensor_name, f"names a module the base does not have ("
                       f"num_layers {arch.num_layers}; projections: {', '.join(_BLOCK)})")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise fail("tensor", tensor_name, f"must be a 2-D float tensor, got {tensor.dtype} "
                       f"{tuple(tensor.shape)}")
        found.setdefault(key, {})[side] = tensor
    for key, sides in found.items():
        if len(sides) != 2:
            raise fail("tensor", f"{key}.lora_{'B' if 'A' in sides else 'A'}.weight", "is missing")
    return {key: (sides["A"], sides["B"]) for key, sides in found.items()}
