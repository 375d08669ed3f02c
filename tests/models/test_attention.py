"""models/attention.py: decode attention by the CPU kernel (kernels/decode_attention.c)
against torch's scaled_dot_product_attention over the same paged cache."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from loraplex.models import attention
from loraplex.models.attention import AttentionMetadata, paged_attention

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: torch attends")


def decode_case(lens: list[int], heads: int, kv_heads: int, head_dim: int, seed: int):
    """A bf16 cache of 512 slots, each sequence's context scattered over random slots."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(512, kv_heads, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(512, kv_heads, head_dim, generator=g).bfloat16()
    width = max(lens)
    perm = torch.randperm(512, generator=g)
    slots = perm[:len(lens) * width].view(len(lens), width).clone()
    lens_t = torch.tensor(lens)
    mask = (torch.arange(width)[None, :] < lens_t[:, None])[:, None, None, :]
    for row, n in enumerate(lens):
        slots[row, n:] = 0  # padding points at slot 0, as the runner's does
    q = torch.randn(len(lens), heads, head_dim, generator=g).bfloat16()
    return q, k_cache, v_cache, slots, mask, lens_t


def sdpa_truth(q, k_cache, v_cache, slots, mask) -> torch.Tensor:
    """float64 softmax(q K^T / sqrt(d)) V with the heads of one group sharing a kv head."""
    b, t = slots.shape
    keys = k_cache.double()[slots.flatten()].view(b, t, *k_cache.shape[1:]).transpose(1, 2)
    values = v_cache.double()[slots.flatten()].view(b, t, *v_cache.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.double().unsqueeze(2), keys, values, attn_mask=mask,
                                         enable_gqa=True)
    return out.squeeze(2)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 48), (8, 1, 20)])
@pytest.mark.parametrize("lens", [[1], [5, 130, 77], [33] * 8])
def test_decode_kernel_equals_attention(heads: int, kv_heads: int, head_dim: int,
                                        lens: list[int]) -> None:
    """The default model's heads (9 over 3), plain multi-head, one kv head for 8; head
    dims with and without a vector tail; contexts of 1 token, ragged ones, equal ones."""
    assert attention.decode_kernel() is not None
    q, k_cache, v_cache, slots, mask, lens_t = decode_case(lens, heads, kv_heads, head_dim,
                                                           seed=len(lens) + head_dim)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long),
                             num_decode_tokens=len(lens), decode_slots=slots, decode_mask=mask,
                             decode_lens=lens_t, prefills=[])
    empty = torch.empty(0, kv_heads, head_dim, dtype=torch.bfloat16)
    ours = paged_attention(q, empty, empty, k_cache, v_cache, meta)
    truth = sdpa_truth(q, k_cache, v_cache, slots, mask)
    torch.testing.assert_close(ours.double(), truth, atol=2e-2, rtol=2e-2)
    # torch's bf16 path, as served before the kernel, is no closer to the truth.
    torch_err = (F.scaled_dot_product_attention(
        q.unsqueeze(2), k_cache[slots.flatten()].view(*slots.shape, kv_heads, head_dim).transpose(1, 2),
        v_cache[slots.flatten()].view(*slots.shape, kv_heads, head_dim).transpose(1, 2),
        attn_mask=mask, enable_gqa=True).squeeze(2).double() - truth).abs().max()
    assert (ours.double() - truth).abs().max() <= torch_err + 1e-2


def test_decode_kernel_off_means_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(attention.DISABLE_ENV, "0")
    attention.decode_kernel.cache_clear()
    try:
        assert attention.decode_kernel() is None
        q, k_cache, v_cache, slots, mask, lens_t = decode_case([7, 3], 9, 3, 64, seed=1)
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long),
                                 num_decode_tokens=2, decode_slots=slots, decode_mask=mask,
                                 decode_lens=lens_t, prefills=[])
        empty = torch.empty(0, 3, 64, dtype=torch.bfloat16)
        ours = paged_attention(q, empty, empty, k_cache, v_cache, meta)
        torch.testing.assert_close(ours.double(), sdpa_truth(q, k_cache, v_cache, slots, mask),
                                   atol=2e-2, rtol=2e-2)
    finally:
        attention.decode_kernel.cache_clear()
