"""Measurement primitives for ``loraplex explain``: one timed batch through an in-process
engine, and the adapter copies the scenarios need.

Copies of the user's adapter have their lora_B scaled by a factor near 1, so each has its
own content hash (the engine's identity for an adapter) and the same shapes and cost.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from loraplex.lora.request import LoRARequest
from loraplex.sampling import SamplingParams

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def run_batch(llm: Any, prompts: list[str], max_tokens: int,
              loras: list[LoRARequest | None] | None = None,
              measured: list[bool] | None = None) -> dict[str, float]:
    """Submit every prompt at once (concurrency = len(prompts)) through the server's path,
    ``engine.add_request`` (an adapter not yet loaded starts loading at arrival, inside
    the request's TTFT), and step until all are done. Greedy with ``ignore_eos``, so every
    request makes exactly ``max_tokens`` tokens (checked).

    Returns output tok/s over the batch's wall time, mean TTFT, mean TPOT (first token to
    last, per token), mean E2EL, in seconds; over the requests ``measured`` marks (default
    all: e.g. one tenant's requests among others' traffic)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    loras = loras or [None] * len(prompts)
    start = time.perf_counter()
    seqs = [engine.add_request(p, params, lora=lora) for p, lora in zip(prompts, loras)]
    try:
        while engine.has_unfinished_requests():
            engine.step()
    except BaseException:
        for seq in seqs:
            engine.abort_request(seq.request_id)
        raise
    wall = time.perf_counter() - start
    for seq in seqs:
        if seq.error is not None or len(seq.output_token_ids) != max_tokens:
            raise RuntimeError(f"explain: a request failed ({seq.error or len(seq.output_token_ids)} "
                               f"tokens, expected {max_tokens})")
    seqs = [s for s, keep in zip(seqs, measured or [True] * len(seqs)) if keep]
    ttft = [s.metrics.ttft_s for s in seqs]
    e2el = [s.metrics.finished_time - s.metrics.arrival_time for s in seqs]
    tpot = [s.metrics.decode_s / (max_tokens - 1) for s in seqs] if max_tokens > 1 else []
    return {"tok_s": len(seqs) * max_tokens / wall, "ttft_s": statistics.fmean(ttft),
            "tpot_s": statistics.fmean(tpot) if tpot else float("nan"),
            "e2el_s": statistics.fmean(e2el), "wall_s": wall}


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the folder's files, so the next read comes from disk."""
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def copy_adapter(src: Path, dst: Path, index: int, cold: bool = False) -> Path:
    """The user's adapter with every lora_B scaled by 1 + index / 1000: new content, same cost."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(src / CONFIG_FILE, dst / CONFIG_FILE)
    tensors = load_file(src / WEIGHTS_FILE)
    scale = 1 + index / 1000
    save_file({k: t * scale if "lora_B" in k else t for k, t in tensors.items()},
              dst / WEIGHTS_FILE, metadata={"format": "pt"})
    if cold:
        drop_from_page_cache(dst)
    return dst


def small_adapter(src: Path, dst: Path, index: int) -> Path:
    """A rank-1 adapter on one projection, cut from the user's adapter: a cheap stand-in for
    the many other adapters a deployment has registered but this traffic does not use."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / CONFIG_FILE).read_text())
    tensors = load_file(src / WEIGHTS_FILE)
    module = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})[0]
    keep = {}
    for key, t in tensors.items():
        if key.split(".lora_")[0].endswith("." + module):
            keep[key] = t[:1].contiguous() if ".lora_A" in key else (t[:, :1] * (1 + index / 1000)).contiguous()
    config.update(r=1, lora_alpha=1, target_modules=[module], rank_pattern={}, alpha_pattern={},
                  use_rslora=False)
    dst.mkdir(parents=True, exist_ok=False)
    (dst / CONFIG_FILE).write_text(json.dumps(config))
    save_file(keep, dst / WEIGHTS_FILE, metadata={"format": "pt"})
    return dst
