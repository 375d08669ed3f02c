"""The Llama family (Llama, Mistral, Qwen2, SmolLM) as one PyTorch model.

Differences from the Hugging Face code, all for speed on a flat token batch:
q/k/v are one fused ``qkv_proj`` and gate/up one ``gate_up_proj``; the batch is a flat
list of tokens ``[num_tokens, hidden]`` with explicit positions, not ``[batch, seq]``;
keys and values live in a paged cache (models/attention.py); logits are computed only
for the rows that sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.models.attention import AttentionMetadata, paged_attention
from loraplex.models.linear import Linear
from loraplex.models.pointwise import add_rms_norm, silu_mul

if TYPE_CHECKING:
    from loraplex.lora.ops import LoRAMapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArch:
    """The shape of a model, read from its Hugging Face ``config.json``."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool  # Llama's attention_bias covers o_proj too; Qwen2's bias is q/k/v only
    sliding_window: int | None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: {model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: only silu is supported, got {cfg['hidden_act']!r}")
        if cfg.get("mlp_bias"):
            raise ValueError(f"mlp_bias: MLP biases are not supported, got {cfg['mlp_bias']!r}")
        # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = rope or cfg.get("rope_scaling") or None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"rope_scaling: type {kind!r} is not supported (default, llama3)")
        num_heads = cfg["num_attention_heads"]
        use_window = cfg.get("use_sliding_window", model_type == "mistral")
        return cls(
            model_type=model_type,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            sliding_window=cfg.get("sliding_window") if use_window else None,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:  # [head_dim / 2] float32
    dim = arch.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / torch.tensor(arch.rope_theta, dtype=torch.float32) ** exponents
    s = arch.rope_scaling
    if s is None:
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1 technical report).
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (HF layout): x * cos + [-x2, x1] * sin.

    x: [N, heads, d]; cos, signed_sin: [N, 1, d] (each half's angles repeated twice, the
    sine negated in the first half), so the rotation is a roll: three ops instead of
    seven, which is what a decode step pays for.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def _param(*shape: int) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the loader.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LlamaLayer(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        h, i = arch.hidden_size, arch.intermediate_size
        self.input_norm = _param(h)
        self.qkv_proj = Linear(h, arch.q_size + 2 * arch.kv_size, bias=arch.qkv_bias)
        self.o_proj = Linear(arch.q_size, h, bias=arch.o_bias)
        self.post_attention_norm = _param(h)
        self.gate_up_proj = Linear(h, 2 * i)
        self.down_proj = Linear(i, h)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                signed_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, lora: LoRAMapping | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, hidden], the previous layer's output (overwritten: it becomes the running
        sum); residual: the running sum (None before the first layer)."""
        a, eps = self.arch, self.arch.rms_norm_eps
        h, residual = add_rms_norm(x, residual, self.input_norm, eps)
        qkv = self.qkv_proj(h, lora)
        # Rotate q and k heads in one go: [N, heads + kv_heads, d].
        qk = apply_rope(qkv[:, :a.q_size + a.kv_size].view(-1, a.num_heads + a.num_kv_heads,
                                                            a.head_dim), cos, signed_sin)
        q, k = qk[:, :a.num_heads], qk[:, a.num_heads:]
        v = qkv[:, a.q_size + a.kv_size:].view(-1, a.num_kv_heads, a.head_dim)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta)
        h, residual = add_rms_norm(self.o_proj(attn.flatten(1), lora), residual,
                                   self.post_attention_norm, eps)
        return self.down_proj(silu_mul(self.gate_up_proj(h, lora)), lora), residual


class LlamaModel(nn.Module):
    """Decoder stack and head. ``forward`` takes a flat token batch, returns hidden states."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = _param(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(arch) for _ in range(arch.num_layers))
        self.norm = _param(arch.hidden_size)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see ``apply_rope``) for each token, [N, 1, head_dim], in
        the model's dtype."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [N, d/2]
        dtype = self.embed_tokens.dtype
        cos, sin = angles.cos(), angles.sin()
        return (torch.cat((cos, cos), dim=-1)[:, None, :].to(dtype),
                torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: torch.Tensor, meta: AttentionMetadata,
                lora: LoRAMapping | None = None) -> torch.Tensor:
        """input_ids, positions: [N]; kv_caches: [layers, 2, slots, kv_heads, head_dim];
        meta and lora: this step's attention and adapter mappings (built by the runner).

        Returns the final-normed hidden states [N, hidden].
        """
        cos, signed_sin = self.rope_tables(positions)
        x = F.embedding(input_ids, self.embed_tokens)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, signed_sin, kv[0], kv[1], meta, lora)
        return add_rms_norm(x, residual, self.norm, self.arch.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [M, hidden] -> logits [M, vocab] in float32."""
        return self.lm_head(hidden).float()

    def projections(self) -> list[dict[str, Linear]]:
        """Per layer, the LoRA-capable projections by fused name."""
        return [{"qkv_proj": l.qkv_proj, "o_proj": l.o_proj, "gate_up_proj": l.gate_up_proj,
                 "down_proj": l.down_proj} for l in self.layers]

    def pack_weights(self) -> None:
        """Prepack every projection for the hardware's matrix kernels (see models/linear.py).

        With tied embeddings the head gets its own packed copy; the lookup keeps the plain one.
        """
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
