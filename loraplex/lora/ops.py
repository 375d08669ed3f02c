"""Grouped LoRA shrink and expand over a batch whose tokens use different adapters.

Weights of the active adapters sit in stacked, preallocated tensors (lora/layers.py):

    a_stack: [num_slots, num_slices * max_rank, in]
             rows [i*r, (i+1)*r) hold slice i's A
    b_stack: [num_slots, out, num_slices * max_rank], block diagonal:
             rows of slice i (its output range), columns [i*r, (i+1)*r) hold B_i * scaling

where r is that slot's own rank, so an adapter of small rank reads and multiplies only its
own rows and columns. A fused projection (qkv: 3 slices, gate_up: 2) thus takes one
shrink and one expand for all its slices: on a decode step the cost is the number of
operations, not the arithmetic, and the zero blocks of B cost a few percent of bytes.

Per step the model runner groups the LoRA tokens by slot and the slots by rank
(``LoRAMapping``); every projection then runs, per rank group, one shrink and one expand:
plain matrix products when the group has one adapter (added in place when it covers the
whole batch), batched products over padded segments when it has several. Tokens without
an adapter are never touched. ``add_lora_reference`` is the per-token oracle the fast
path is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class RankGroup:
    """Tokens of the adapters of one rank, sorted by slot."""

    rank: int
    slots: list[int]
    slot_ids: torch.Tensor  # [S] long
    rows: torch.Tensor  # [n] long: token indices in the flat batch, grouped by slot
    segment_len: int  # L: longest run of one slot (padding target of the batched path)
    pad_index: torch.Tensor | None  # [n] long: position of each row in [S * L]; None if S == 1


@dataclass(slots=True)
class LoRAMapping:
    """Which slot each token of one step uses; built once, shared by every projection.

    With an adapter merged into the base weights (lora/merge.py, auto-merge), its tokens
    need nothing, and every other token must have the merged delta taken out again:
    ``unmerge_groups`` map those tokens to the merged adapter's slot, subtracted.
    """

    groups: list[RankGroup]
    unmerge_groups: list[RankGroup]

    @classmethod
    def build(cls, token_slots: list[int], slot_ranks: dict[int, int], device: torch.device,
              merged_slot: int = -1) -> "LoRAMapping | None":
        """token_slots: the slot of each token (-1 for none); slot_ranks: rank per slot;
        merged_slot: the slot of the adapter merged into the weights (-1 for none)."""
        if merged_slot < 0:
            groups, unmerge_groups = _rank_groups(token_slots, slot_ranks, device), []
        else:
            own = [-1 if s == merged_slot else s for s in token_slots]
            out = [-1 if s == merged_slot else merged_slot for s in token_slots]
            groups = _rank_groups(own, slot_ranks, device)
            unmerge_groups = _rank_groups(out, slot_ranks, device)
        if not groups and not unmerge_groups:
            return None
        return cls(groups, unmerge_groups)


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
                                torch.tensor(rows, device=device), seg_len, pad_index))
    return groups


def add_lora(out: torch.Tensor, x: torch.Tensor, groups: list[RankGroup],
             a_stack: torch.Tensor, b_stack: torch.Tensor, num_slices: int,
             alpha: float = 1.0) -> None:
    """out[t] += alpha * B_s (A_s x[t]) for every token t of ``groups`` (slot s); in place.

    out: [N, out], x: [N, in]; alpha -1 takes a merged adapter's delta out.
    """
    for g in groups:
        k = num_slices * g.rank
        if g.pad_index is None:
            slot = g.slots[0]
            a, b = a_stack[slot, :k], b_stack[slot, :, :k]  # [k, in], [out, k]
            if g.rows.numel() == x.shape[0]:  # the whole batch: no gather, no scatter
                out.addmm_(x @ a.T, b.T, alpha=alpha)
                continue
            delta = (x.index_select(0, g.rows) @ a.T) @ b.T  # [n, out]
        else:
            num, seg = len(g.slots), g.segment_len
            padded = x.new_zeros(num * seg, x.shape[1])
            padded[g.pad_index] = x.index_select(0, g.rows)
            a = a_stack.index_select(0, g.slot_ids)[:, :k]  # [S, k, in]
            b = b_stack.index_select(0, g.slot_ids)[:, :, :k]  # [S, out, k]
            h = torch.bmm(padded.view(num, seg, -1), a.transpose(1, 2))  # [S, L, k]
            delta = torch.bmm(h, b.transpose(1, 2)).flatten(0, 1)[g.pad_index]  # [n, out]
        out.index_add_(0, g.rows, delta, alpha=alpha)


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, token_slots: list[int],
                       slot_ranks: dict[int, int], a_stack: torch.Tensor,
                       b_stack: torch.Tensor, out_sizes: list[int]) -> None:
    """The oracle: one token at a time, one slice at a time, in plain torch."""
    offsets = [0]
    for size in out_sizes:
        offsets.append(offsets[-1] + size)
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        r = slot_ranks[slot]
        for i in range(len(out_sizes)):
            a = a_stack[slot, i * r:(i + 1) * r]  # [r, in]
            b = b_stack[slot, offsets[i]:offsets[i + 1], i * r:(i + 1) * r]  # [out_i, r]
            out[t, offsets[i]:offsets[i + 1]] += b @ (a @ x[t])
