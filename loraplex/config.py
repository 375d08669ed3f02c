"""Engine configuration: layered frozen dataclasses, validated on creation.

The CLI builds its flags from these fields (``metadata["help"]``), so a field's help text
is the one place that documents it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); else bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ModelConfig:
    model: str = _help("Embedded model name (smollm2-135m) or a local Hugging Face folder.",
                       default="smollm2-135m")
    dtype: str = _help("auto | bfloat16 | float32 | float16; auto is bfloat16 where the "
                       "hardware has it, else float32.", default="auto")
    device: str = _help("auto | cpu | cuda", default="auto")
    max_model_len: int | None = _help("Longest prompt + output in tokens; default the "
                                      "model's own context.", default=None)
    num_threads: int | None = _help("CPU threads; default the cores this process may use.",
                                    default=None)
    merge: str | None = _help("A PEFT adapter folder merged into the weights at load: a "
                              "dedicated deployment of that adapter at base speed.", default=None)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1, got {self.num_threads}")

    def resolved_device(self) -> torch.device:
        return torch.device(default_device() if self.device == "auto" else self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.resolved_device().type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32

    def resolved_num_threads(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _help("Tokens per KV-cache block.", default=16)
    kv_cache_gib: float = _help("Memory for the paged KV cache, in GiB.", default=1.0)
    enable_prefix_caching: bool = _help("Reuse the KV blocks of a shared prompt prefix.",
                                        default=True)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a power of two, got {self.block_size}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib: must be > 0, got {self.kv_cache_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _help("Most sequences in one step (the batch size).", default=64)
    max_num_batched_tokens: int = _help("Token budget of one step; longer prompts are "
                                        "prefilled in chunks.", default=512)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens: must be >= 1, got "
                             f"{self.max_num_batched_tokens}")


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = _help("Adapter slots: most distinct adapters in one step (0 = no LoRA).",
                           default=8)
    max_lora_rank: int = _help("Largest adapter rank accepted; slots are sized for it.",
                               default=16)
    max_cpu_loras: int = _help("Adapters kept loaded in host memory (LRU).", default=64)
    max_lora_wait_steps: int = _help("Steps a request may be passed over for want of an "
                                     "adapter slot before admissions wait for it.", default=64)
    auto_merge: bool = _help("Merge an adapter into the weights while it dominates the recent "
                             "traffic, and unmerge when the mix changes; other requests stay "
                             "exact (the merged delta is taken out for them).", default=False)
    auto_merge_share: float = _help("Share of the recent tokens one adapter must have to be "
                                    "merged; it is unmerged when its share falls below 0.5, "
                                    "where taking its delta out for the others costs more "
                                    "than it saves.", default=0.7)
    auto_merge_window: int = _help("Steps of traffic the auto-merge decision looks back on.",
                                   default=64)

    def __post_init__(self) -> None:
        if self.max_loras < 0:
            raise ValueError(f"max_loras: must be >= 0, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank: must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras < max(1, self.max_loras):
            raise ValueError(f"max_cpu_loras: must be >= max_loras ({self.max_loras}), "
                             f"got {self.max_cpu_loras}")
        if self.max_lora_wait_steps < 1:
            raise ValueError(f"max_lora_wait_steps: must be >= 1, got {self.max_lora_wait_steps}")
        if not 0.5 < self.auto_merge_share <= 1:
            raise ValueError(f"auto_merge_share: must be in (0.5, 1], got {self.auto_merge_share}")
        if self.auto_merge_window < 1:
            raise ValueError(f"auto_merge_window: must be >= 1, got {self.auto_merge_window}")
        if self.auto_merge and not self.max_loras:
            raise ValueError("auto_merge: needs LoRA serving on (max_loras >= 1)")


SPEC_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding (loraplex/spec/). Off unless ``method`` is set.

    ``metadata["flag"]`` names a field's CLI flag where the field name alone would be
    unclear among the other engine flags (``--spec``, not ``--method``).
    """

    method: str | None = field(default=None, metadata={
        "help": "Speculative decoding: ngram (prompt lookup, no model) or draft (a small "
                "model with the same tokenizer); default off.", "flag": "spec"})
    draft_model: str | None = field(default=None, metadata={
        "help": "Draft model (HF folder) shared by all requests, for --spec draft.",
        "flag": "draft"})
    draft_for: tuple[tuple[str, str], ...] = field(default=(), metadata={
        "help": "ADAPTER=PATH: a draft model for the requests of that adapter (repeatable); "
                "it takes precedence over --draft.", "flag": "draft-for", "repeat": True})
    num_tokens: int | None = field(default=None, metadata={
        "help": "Draft tokens per step; default: chosen per adapter from the measured "
                "acceptance rate and draft cost.", "flag": "spec-tokens"})
    max_spec_tokens: int = field(default=6, metadata={
        "help": "Most draft tokens per step when they are chosen automatically.",
        "flag": "spec-max-tokens"})
    max_spec_seqs: int = field(default=4, metadata={
        "help": "Speculation is off in steps where more sequences run than this (verifying "
                "drafts costs compute a large batch no longer has to spare).",
        "flag": "spec-max-seqs"})
    ngram_max: int = field(default=4, metadata={
        "help": "Longest suffix n-gram that prompt lookup matches.", "flag": "ngram-max"})
    ngram_min: int = field(default=1, metadata={
        "help": "Shortest suffix n-gram that prompt lookup matches.", "flag": "ngram-min"})

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in SPEC_METHODS:
            raise ValueError(f"method: expected one of {SPEC_METHODS} or None, got {self.method!r}")
        object.__setattr__(self, "draft_for", _adapter_paths(self.draft_for))
        if self.method == "draft" and not self.draft_model and not self.draft_for:
            raise ValueError("draft_model: method 'draft' needs a draft model (draft_model or "
                             "draft_for), got none")
        if self.method != "draft" and (self.draft_model or self.draft_for):
            raise ValueError(f"draft_model: given, but method is {self.method!r}, not 'draft'")
        if self.num_tokens is not None and not 1 <= self.num_tokens <= 32:
            raise ValueError(f"num_tokens: expected None (auto) or 1-32, got {self.num_tokens}")
        if not 1 <= self.max_spec_tokens <= 32:
            raise ValueError(f"max_spec_tokens: expected 1-32, got {self.max_spec_tokens}")
        if self.max_spec_seqs < 1:
            raise ValueError(f"max_spec_seqs: must be >= 1, got {self.max_spec_seqs}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_min: expected 1 <= ngram_min <= ngram_max "
                             f"({self.ngram_max}), got {self.ngram_min}")

    @property
    def is_enabled(self) -> bool:
        return self.method is not None


def _adapter_paths(value: Any) -> tuple[tuple[str, str], ...]:
    """draft_for as a mapping, ("NAME=PATH", ...) from the CLI, or (name, path) pairs."""
    items = value.items() if isinstance(value, dict) else value or ()
    pairs: dict[str, str] = {}
    for item in items:
        if isinstance(item, str):
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"draft_for: expected ADAPTER=PATH, got {item!r}")
        else:
            name, path = item
        if name in pairs:
            raise ValueError(f"draft_for: adapter {name!r} is given twice")
        pairs[str(name)] = str(path)
    return tuple(pairs.items())


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)

    @classmethod
    def from_flat(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat keyword arguments (``LLM(model=..., block_size=...)``, CLI flags).

        An unknown name is an error, never silently dropped.
        """
        parts = {}
        for name, part in CONFIG_PARTS.items():
            names = {f.name for f in dataclasses.fields(part)}
            parts[name] = part(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise TypeError(f"unknown engine option(s): {sorted(kwargs)}")
        return cls(**parts)


CONFIG_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                "lora": LoRAConfig, "spec": SpecConfig}


SERVER_MODES = ("shared", "dedicated")


@dataclass(frozen=True)
class ServerConfig:
    """The OpenAI-compatible server (``loraplex serve``); not part of ``EngineConfig``."""

    host: str = _help("Address to listen on.", default="127.0.0.1")
    port: int = _help("Port to listen on.", default=8000)
    served_model_name: str | None = _help("The base model's id in the API; default the "
                                          "--model value.", default=None)
    api_keys: str | None = _help("JSON file of API keys and their tenants (see README); "
                                 "without it the server is open and every caller is an "
                                 "admin.", default=None)
    adapter_root: str | None = _help("Folder under which /v1/load_lora_adapter may load "
                                     "adapters by path; without it, loading by path is off.",
                                     default=None)
    state_dir: str | None = _help("Where the adapter registry and uploaded adapters live; "
                                  "default $LORAPLEX_HOME/server.", default=None)
    max_queue: int = _help("Most requests waiting for the batch; past it, 429 with "
                           "Retry-After.", default=256)
    max_upload_mib: int = _help("Largest adapter upload (the archive, and its unpacked "
                                "files), in MiB; past it, 413.", default=256)
    drain_seconds: float = _help("On SIGTERM, how long in-flight requests may finish before "
                                 "they are aborted.", default=30.0)
    mode: str = _help("shared: many unmerged adapters on one base. dedicated: the --merge "
                      "adapter merged into the weights, served at base speed under its "
                      "folder's name (or --served-model-name), and nothing else.",
                      default="shared")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0-65535, got {self.port}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue: must be >= 1, got {self.max_queue}")
        if self.max_upload_mib < 1:
            raise ValueError(f"max_upload_mib: must be >= 1, got {self.max_upload_mib}")
        if self.drain_seconds < 0:
            raise ValueError(f"drain_seconds: must be >= 0, got {self.drain_seconds}")
        if self.mode not in SERVER_MODES:
            raise ValueError(f"mode: expected one of {SERVER_MODES}, got {self.mode!r}")
