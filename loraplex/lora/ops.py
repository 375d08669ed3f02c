"""Grouped LoRA shrink and expand over a batch whose tokens use different adapters.

Weights of the active adapters sit in stacked, preallocated tensors (lora/layers.py):

    a_stack:  [num_slots, num_slices * max_rank, in]   rows [i*r, (i+1)*r) = slice i's A
    b_stacks: num_slices x [num_slots, out_i, max_rank] columns [0, r) = slice i's B * scaling

where r is that slot's own rank, so an adapter of small rank reads and multiplies only its
own r rows. A fused projection (qkv: 3 slices, gate_up: 2) shrinks once for all its slices.

Per step the model runner groups the LoRA tokens by slot and the slots by rank
(``LoRAMapping``); every projection then runs, per rank group, one shrink and one expand
per slice: a plain matrix product when the group has one adapter, a batched product over
padded segments when it has several. Tokens without an adapter are never touched.
``add_lora_reference`` is the per-token oracle the fast path is tested against.
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
    """Which slot each token of one step uses; built once, shared by every projection."""

    token_slots: torch.Tensor  # [N] long, -1 = base model only
    groups: list[RankGroup]

    @classmethod
    def build(cls, token_slots: list[int], slot_ranks: dict[int, int],
              device: torch.device) -> "LoRAMapping | None":
        """token_slots: the slot of each token (-1 for none); slot_ranks: rank per slot."""
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(token_slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).append(row)
        if not by_slot:
            return None
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
        return cls(torch.tensor(token_slots, device=device), groups)


def add_lora(out: torch.Tensor, x: torch.Tensor, groups: list[RankGroup], a_stack: torch.Tensor,
             b_stacks: list[torch.Tensor]) -> None:
    """out[t] += B_s (A_s x[t]) for every token t of ``groups`` (slot s); in place.

    out: [N, sum(out_i)] (slices side by side), x: [N, in].
    """
    num_slices = len(b_stacks)
    for g in groups:
        r = g.rank
        xs = x.index_select(0, g.rows)  # [n, in]
        if g.pad_index is None:
            slot = g.slots[0]
            h = xs @ a_stack[slot, :num_slices * r].T  # [n, slices*r]
            ys = [h[:, i * r:(i + 1) * r] @ b[slot, :, :r].T for i, b in enumerate(b_stacks)]
        else:
            num = len(g.slots)
            padded = xs.new_zeros(num * g.segment_len, xs.shape[1])
            padded[g.pad_index] = xs
            a = a_stack.index_select(0, g.slot_ids)[:, :num_slices * r]  # [S, slices*r, in]
            h = torch.bmm(padded.view(num, g.segment_len, -1), a.transpose(1, 2))  # [S, L, slices*r]
            ys = []
            for i, b in enumerate(b_stacks):
                b_used = b.index_select(0, g.slot_ids)[:, :, :r]  # [S, out_i, r]
                y = torch.bmm(h[:, :, i * r:(i + 1) * r], b_used.transpose(1, 2))  # [S, L, out_i]
                ys.append(y.flatten(0, 1)[g.pad_index])
        delta = ys[0] if num_slices == 1 else torch.cat(ys, dim=-1)  # [n, out]
        out.index_add_(0, g.rows, delta)


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, token_slots: list[int],
                       slot_ranks: dict[int, int], a_stack: torch.Tensor,
                       b_stacks: list[torch.Tensor]) -> None:
    """The oracle: one token at a time, one slice at a time, in plain torch."""
    offsets = [0]
    for b in b_stacks:
        offsets.append(offsets[-1] + b.shape[1])
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        r = slot_ranks[slot]
        for i, b in enumerate(b_stacks):
            a = a_stack[slot, i * r:(i + 1) * r]  # [r, in]
            out[t, offsets[i]:offsets[i + 1]] += b[slot, :, :r] @ (a @ x[t])
