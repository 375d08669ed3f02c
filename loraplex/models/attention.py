"""Attention over the paged KV cache.

One step's batch is a flat list of tokens: first the decode tokens (one query per
sequence), then the prefill chunks (many queries per sequence). Decodes are attended in
one call: on CPU in bf16 the kernel of kernels/decode_attention.c reads their contexts
straight from the cache; elsewhere one batched torch call over their gathered, padded
contexts. Each prefill chunk takes a torch call of its own. The metadata is built once per
step by the model runner and shared by all layers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from loraplex import kernels

DISABLE_ENV = "LORAPLEX_NATIVE_ATTENTION"


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's prefill chunk: queries ``[start, end)`` of the flat batch."""

    start: int
    end: int
    context_slots: torch.Tensor  # [num_context] long: KV slots of positions 0..last query
    causal_mask: torch.Tensor | None  # [num_queries, num_context] bool; None = plain causal


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: KV slot that each new token writes
    num_decode_tokens: int
    decode_slots: torch.Tensor | None  # [num_decodes, max_context] long, padded with slot 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context] bool, True = attend
    decode_lens: torch.Tensor | None  # [num_decodes] long: context length of each decode
    prefills: list[PrefillChunk]


@cache
def decode_kernel() -> Callable[..., None] | None:
    """kernels/decode_attention.c's ``decode``, or None (no compiler, or
    ``LORAPLEX_NATIVE_ATTENTION=0``): then torch attends."""
    module = kernels.load("decode_attention", "_loraplex_decode_attention", DISABLE_ENV)
    return None if module is None else module.decode


def _decode_with_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, out: torch.Tensor) -> bool:
    """out[:B] = attention of the B decode queries, by the CPU kernel; False (nothing done)
    where it does not apply: not bf16 on CPU, or a layout it does not read."""
    fn = decode_kernel() if q.device.type == "cpu" and q.dtype == torch.bfloat16 else None
    slots, lens = meta.decode_slots, meta.decode_lens
    if fn is None or lens is None or not (
            k_cache.is_contiguous() and v_cache.is_contiguous() and slots.is_contiguous()
            and k_cache.dtype == v_cache.dtype == torch.bfloat16
            and slots.dtype == lens.dtype == torch.int64):
        return False
    num_decodes, heads, head_dim = meta.num_decode_tokens, q.shape[1], q.shape[2]
    queries = q[:num_decodes].contiguous()  # [B, heads, d]
    result = out[:num_decodes] if out.is_contiguous() else torch.empty_like(queries)
    fn(queries.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), slots.shape[1],
       lens.data_ptr(), result.data_ptr(), num_decodes, heads, k_cache.shape[1], head_dim,
       torch.get_num_threads(), head_dim ** -0.5)
    if result.data_ptr() != out.data_ptr():
        out[:num_decodes] = result
    return True


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    meta: AttentionMetadata,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    num_decodes = meta.num_decode_tokens
    if num_decodes and not _decode_with_kernel(q, k_cache, v_cache, meta, out):
        # index_select on flat slots is far faster than advanced indexing with a 2-D index.
        shape = (*meta.decode_slots.shape, *k_cache.shape[1:])  # [B, T, kv, d]
        flat_slots = meta.decode_slots.flatten()
        # [B, kv, T, d]; the query is [B, heads, 1, d].
        keys = k_cache.index_select(0, flat_slots).view(shape).transpose(1, 2)
        values = v_cache.index_select(0, flat_slots).view(shape).transpose(1, 2)
        out[:num_decodes] = F.scaled_dot_product_attention(
            q[:num_decodes].unsqueeze(2), keys, values, attn_mask=meta.decode_mask,
            enable_gqa=True).squeeze(2)
    for chunk in meta.prefills:
        # A leading batch dim of 1: CPU's flash kernel takes only 4-D inputs; 3-D ones fall
        # back to the math kernel, 3x slower on a 512-token prefill (measured here).
        queries = q[chunk.start:chunk.end].transpose(0, 1)[None]  # [1, heads, Q, d]
        if chunk.causal_mask is None:
            # Nothing cached before this chunk: its own keys are the whole context.
            keys = k[chunk.start:chunk.end].transpose(0, 1)[None]
            values = v[chunk.start:chunk.end].transpose(0, 1)[None]
        else:
            keys = k_cache.index_select(0, chunk.context_slots).transpose(0, 1)[None]  # [1, kv, T, d]
            values = v_cache.index_select(0, chunk.context_slots).transpose(0, 1)[None]
        out[chunk.start:chunk.end] = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=chunk.causal_mask,
            is_causal=chunk.causal_mask is None, enable_gqa=True)[0].transpose(0, 1)
    return out
