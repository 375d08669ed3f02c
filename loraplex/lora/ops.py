"""Grouped LoRA shrink and expand over a batch whose tokens use different adapters.

Weights of the active adapters sit in preallocated buffers, one row per slot
(lora/layers.py). A slot holding an adapter of rank r uses the first in * k and k * out
elements of its rows, k = num_slices * r, viewed as

    A:   a_flat[slot, :k * in] as [k, in]; rows [i*r, (i+1)*r) hold slice i's A (the
         products use its transposed view A^T [in, k])
    B^T: b_flat[slot, :k * out] as [k, out], block diagonal: rows [i*r, (i+1)*r) and the
         columns of slice i's output range hold (B_i * scaling)^T

so the views are contiguous whatever the rank, an adapter of small rank reads only its own
weights, and slots that sit next to each other form a batch of matrices without a copy.

Per step the model runner groups the LoRA tokens by slot and the slots by rank
(``LoRAMapping``). Three paths compute the deltas:

- On CPU with bf16 activations, kernels/bgmv.c (lora/native.py) takes the slots with few
  tokens (decodes, speculative verification): one call per projection for all of them,
  whatever their mix of slots and ranks, reading each slot's bf16 weights once per tile of
  tokens and skipping B's zero blocks.
- Where the CPU has AVX512-BF16, kernels/sgmv.c takes the slots with ``SGMV_ROWS`` tokens
  or more (prefill chunks, one adapter's many decodes): per slot, two thin matrix products
  per block of rows, the delta added in place.
- Everything else (other devices and dtypes; on CPU without sgmv, the groups of
  ``WIDE_ROWS`` rows or more) runs on torch products, per rank group, one shrink and one
  expand: plain matrix products when the group has one adapter (added in place when it
  covers the whole batch), batched products over padded segments when it has several. A
  fused projection (qkv: 3 slices, gate_up: 2) takes one shrink and one expand for all its
  slices; only a prefill of one adapter (``WIDE_ROWS`` rows or more), bound by arithmetic,
  expands each slice on its own block. Without the kernels the CPU slots are float32
  (lora/layers.py says why): tokens are cast to it, deltas back to the output's dtype.

Tokens without an adapter are never touched. ``add_lora_reference`` is the per-token oracle
all paths are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.lora.native import KernelTokens, wide_kernel


@dataclass(slots=True)
class RankGroup:
    """Tokens of the adapters of one rank, sorted by slot."""

    rank: int
    slots: list[int]
    slot_ids: torch.Tensor  # [S] long
    rows: torch.Tensor  # [n] long: token indices in the flat batch, grouped by slot
    num_rows: int  # n
    is_whole_batch: bool  # one slot, every token of the step: no gather, no scatter
    segment_len: int  # L: longest run of one slot (padding target of the batched path)
    pad_index: torch.Tensor | None  # [n] long: position of each row in [S * L]; None if S == 1
    is_slot_range: bool  # slots are consecutive: their weights batch without a copy


@dataclass(slots=True)
class LoRAPass:
    """Deltas to add with one sign: the adapters' own (+1), or a merged one's taken out
    (-1), split between the kernel and torch products as the module docstring says."""

    groups: list[RankGroup]  # all of them: the torch path
    alpha: float
    narrow: KernelTokens | None  # bgmv's tokens, by slot
    wide: KernelTokens | None  # sgmv's tokens, by slot
    wide_groups: list[RankGroup]  # what is left for torch beside the kernels
    slots: frozenset[int]  # every slot of the pass: a projection none of them targets skips it


@dataclass(slots=True)
class LoRAMapping:
    """Which slot each token of one step uses; built once, shared by every projection.

    With an adapter merged into the base weights (lora/merge.py, auto-merge), its tokens
    need nothing, and every other token must have the merged delta taken out again:
    ``unmerge_groups`` map those tokens to the merged adapter's slot, subtracted.
    """

    groups: list[RankGroup]
    unmerge_groups: list[RankGroup]
    passes: list[LoRAPass]

    @classmethod
    def build(cls, token_slots: list[int], slot_ranks: dict[int, int], device: torch.device,
              merged_slot: int = -1) -> "LoRAMapping | None":
        """token_slots: the slot of each token (-1 for none); slot_ranks: rank per slot;
        merged_slot: the slot of the adapter merged into the weights (-1 for none)."""
        own, out = token_slots, []
        if merged_slot < 0:
            groups, unmerge_groups = _rank_groups(token_slots, slot_ranks, device), []
        else:
            own = [-1 if s == merged_slot else s for s in token_slots]
            out = [-1 if s == merged_slot else merged_slot for s in token_slots]
            groups = _rank_groups(own, slot_ranks, device)
            unmerge_groups = _rank_groups(out, slot_ranks, device)
        if not groups and not unmerge_groups:
            return None
        passes = [_split_pass(groups, 1.0, own, device)]
        if unmerge_groups:
            passes.append(_split_pass(unmerge_groups, -1.0, out, device))
        return cls(groups, unmerge_groups, passes)


def _split_pass(groups: list[RankGroup], alpha: float, token_slots: list[int],
                device: torch.device) -> LoRAPass:
    """token_slots: the slots ``groups`` were built from."""
    slots = frozenset(s for g in groups for s in g.slots)
    if device.type != "cpu":  # the kernels are CPU only
        return LoRAPass(groups, alpha, None, None, groups, slots)

    def tokens(rows: list[int]) -> KernelTokens | None:
        return KernelTokens(rows, [token_slots[row] for row in rows]) if rows else None

    group_rows = [g.rows.tolist() for g in groups]
    if wide_kernel() is not None:  # by slot: each slot's rows are adjacent in its group
        short, long = [], []
        for rows in group_rows:
            i = 0
            while i < len(rows):
                j = i
                while j < len(rows) and token_slots[rows[j]] == token_slots[rows[i]]:
                    j += 1
                (long if j - i >= SGMV_ROWS else short).extend(rows[i:j])
                i = j
        return LoRAPass(groups, alpha, tokens(short), tokens(long), [], slots)
    narrow = [row for g, rows in zip(groups, group_rows) if g.num_rows < WIDE_ROWS for row in rows]
    return LoRAPass(groups, alpha, tokens(narrow), None,
                    [g for g in groups if g.num_rows >= WIDE_ROWS], slots)


def _rank_groups(token_slots: list[int], slot_ranks: dict[int, int],
                 device: torch.device) -> list[RankGroup]:
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(row)
    by_rank: dict[int, list[int]] = {}
    for slot in sorted(by_slot):
        by_rank.setdefault(slot_ranks[slot], []).append(slot)
    parts = []
    for rank, slots in sorted(by_rank.items()):
        # Padding every segment to the longest must not cost more than the tokens
        # themselves (one long prefill beside decodes): then each slot goes alone.
        longest = max(len(by_slot[s]) for s in slots)
        if longest * len(slots) > 2 * sum(len(by_slot[s]) for s in slots):
            parts += [(rank, [s]) for s in slots]
        else:
            parts.append((rank, slots))
    groups = []
    for rank, slots in parts:
        rows = [r for s in slots for r in by_slot[s]]
        seg_len = max(len(by_slot[s]) for s in slots)
        pad_index = None
        if len(slots) > 1:
            pad_index = torch.tensor([i * seg_len + j for i, s in enumerate(slots)
                                      for j in range(len(by_slot[s]))], device=device)
        groups.append(RankGroup(rank, slots, torch.tensor(slots, device=device),
                                torch.tensor(rows, device=device), len(rows),
                                len(slots) == 1 and len(rows) == len(token_slots), seg_len,
                                pad_index, slots == list(range(slots[0], slots[0] + len(slots)))))
    return groups


# From this many tokens of one slot on, sgmv beats bgmv (measured on the default model's
# projections: 58 vs 80 us per layer at 32 tokens, 44 vs 45 at 16).
SGMV_ROWS = 32

# From this many rows on, a group's products run in the activations' dtype (slot weights
# cast on the fly, a few hundred KB): on CPU, float32 wins for the thin decode products, but
# for a prefill the float32 copies of x and of the delta cost more than bf16 saves.
WIDE_ROWS = 64


def add_lora(out: torch.Tensor, x: torch.Tensor, groups: list[RankGroup],
             a_flat: torch.Tensor, b_flat: torch.Tensor, out_sizes: list[int],
             alpha: float = 1.0,
             views: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """out[t] += alpha * B_s (A_s x[t]) for every token t of ``groups`` (slot s); in place.

    out: [N, out], x: [N, in]; a_flat, b_flat: [slots, *] (layout above); out_sizes: the
    output size of each slice (sum = out); alpha -1 takes a merged adapter's delta out.
    ``views``: slot -> its (A^T, B^T) views at its rank, made once at load by the caller
    (on a decode step, slicing them here again costs about as much as the products); slots
    not in it are sliced here.
    """
    n_in, n_out, num_slices = x.shape[1], out.shape[1], len(out_sizes)
    x_in_slot_dtype = None  # x cast to the slots' dtype, made once when a group needs it
    for g in groups:
        dtype = x.dtype if g.num_rows >= WIDE_ROWS else a_flat.dtype
        if dtype == x.dtype:
            xs = x
        else:
            if x_in_slot_dtype is None:
                x_in_slot_dtype = x.to(dtype)
            xs = x_in_slot_dtype
        if g.pad_index is None:
            slot = g.slots[0]
            a, b = views[slot] if views is not None and slot in views else slot_views(
                a_flat, b_flat, slot, g.rank, num_slices, n_in, n_out)
            if (g.is_whole_batch and g.num_rows >= WIDE_ROWS and dtype == out.dtype
                    and num_slices > 1):
                # A wide batch (a prefill) is bound by arithmetic: expand each slice on its
                # own diagonal block, into its columns of out, skipping B's zero blocks
                # (measured: a third less LoRA time for qkv and gate_up at 512 rows).
                h = torch.mm(xs, a.to(dtype))  # [N, k]
                r, start = g.rank, 0
                for i, size in enumerate(out_sizes):
                    block = b[i * r:(i + 1) * r, start:start + size].to(dtype)  # [r, size]
                    out[:, start:start + size].addmm_(h[:, i * r:(i + 1) * r], block, alpha=alpha)
                    start += size
                continue
            if dtype != a.dtype:
                a, b = a.to(dtype), b.to(dtype)
            if g.is_whole_batch:  # no gather, no scatter
                if dtype == out.dtype:
                    out.addmm_(torch.mm(xs, a), b, alpha=alpha)
                else:
                    out.add_(torch.mm(torch.mm(xs, a), b), alpha=alpha)
                continue
            delta = torch.mm(torch.mm(xs.index_select(0, g.rows), a), b)  # [n, out]
        else:
            k = num_slices * g.rank
            num, seg = len(g.slots), g.segment_len
            padded = xs.new_zeros(num * seg, n_in)
            padded[g.pad_index] = xs.index_select(0, g.rows)
            a = _slot_batch(a_flat, g, k * n_in).view(num, k, n_in).transpose(1, 2).to(dtype)
            b = _slot_batch(b_flat, g, k * n_out).view(num, k, n_out).to(dtype)
            h = torch.bmm(padded.view(num, seg, n_in), a)  # [S, L, k]
            delta = torch.bmm(h, b).flatten(0, 1)[g.pad_index]  # [n, out]
        out.index_add_(0, g.rows, delta.to(out.dtype), alpha=alpha)


def _slot_batch(flat: torch.Tensor, g: RankGroup, size: int) -> torch.Tensor:
    """[S, size]: the first ``size`` elements of each of the group's slots; a view when
    the slots are consecutive, else a gathered copy of just those elements."""
    if g.is_slot_range:
        return flat[g.slots[0]:g.slots[0] + len(g.slots), :size]
    return flat[:, :size].index_select(0, g.slot_ids)


def slot_views(a_flat: torch.Tensor, b_flat: torch.Tensor, slot: int, rank: int,
               num_slices: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T [in, k] (a transposed view of the slot's A [k, in]) and B^T [k, out] of one slot
    (views; k = num_slices * rank)."""
    k = num_slices * rank
    return a_flat[slot, :k * n_in].view(k, n_in).t(), b_flat[slot, :k * n_out].view(k, n_out)


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, token_slots: list[int],
                       slot_ranks: dict[int, int], a_flat: torch.Tensor,
                       b_flat: torch.Tensor, out_sizes: list[int]) -> None:
    """The oracle: one token at a time, one slice at a time, in plain torch."""
    offsets = [0]
    for size in out_sizes:
        offsets.append(offsets[-1] + size)
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        r = slot_ranks[slot]
        a_t, b_t = slot_views(a_flat, b_flat, slot, r, len(out_sizes), x.shape[1], offsets[-1])
        xt = x[t].to(a_flat.dtype)
        for i in range(len(out_sizes)):
            a = a_t[:, i * r:(i + 1) * r]  # [in, r]
            b = b_t[i * r:(i + 1) * r, offsets[i]:offsets[i + 1]]  # [r, out_i]
            out[t, offsets[i]:offsets[i + 1]] += ((xt @ a) @ b).to(out.dtype)
