"""lora/ops.py and lora/layers.py: the grouped fast path against the per-token oracle and
against plain ``x @ A.T @ B.T`` on the adapters' own matrices."""
from __future__ import annotations

import random

import pytest
import torch

from loraplex.lora.layers import LoRAStack
from loraplex.lora.ops import LoRAMapping, add_lora, add_lora_reference

CPU = torch.device("cpu")
IN_FEATURES = 48
MAX_RANK = 16
SLOT_RANKS = {0: 4, 1: 4, 2: 4, 3: 8, 4: 1, 5: 1, 6: 1, 7: 1, 8: 16, 9: 16}
SLICE_OUTS = {1: [64], 3: [64, 32, 32]}  # one projection; a qkv-like fused one
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.15, rtol=0.05)}


def make_stack(out_sizes: list[int], dtype: torch.dtype, seed: int
               ) -> tuple[LoRAStack, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """A stack with one adapter of rank ``SLOT_RANKS[s]`` per slot s, loaded over noise:
    a load that leaves noise in what the slot uses, or a kernel that reads past its
    slot's rank, picks the noise up and fails. Returns the stack and, per slot, each
    slice's (A [r, in], scaling * B [out_i, r]) in float64 as stored (rounded to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    names = tuple(f"slice{i}" for i in range(len(out_sizes)))
    stack = LoRAStack(names, IN_FEATURES, out_sizes, max_loras=len(SLOT_RANKS),
                      max_rank=MAX_RANK, dtype=dtype, device=CPU)
    for t in (stack.a_flat, stack.b_flat):
        t.copy_(torch.randn(t.shape, generator=g) * 100)
    weights = {}
    for slot, r in SLOT_RANKS.items():
        modules = {name: (torch.randn(r, IN_FEATURES, generator=g) / IN_FEATURES ** 0.5,
                          torch.randn(out, r, generator=g), 1.5)
                   for name, out in zip(names, out_sizes)}
        stack.load(slot, r, modules)
        weights[slot] = [(a.to(dtype).double(), (b * s).to(dtype).double())
                         for a, b, s in modules.values()]
    return stack, weights


def dense_delta(x: torch.Tensor, token_slots: list[int],
                weights: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
                out_features: int) -> torch.Tensor:
    """[N, out] float64: x @ A.T @ B.T per token and slice, zero for base-only tokens."""
    delta = torch.zeros(len(token_slots), out_features, dtype=torch.float64)
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            xt = x[t:t + 1].double()
            delta[t] = torch.cat([xt @ a.T @ b.T for a, b in weights[slot]], dim=1)[0]
    return delta


def shuffled(counts: dict[int, int], seed: int) -> list[int]:
    """Token slots with ``counts[slot]`` tokens each (-1 = base only), interleaved at random."""
    slots = [s for s, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(slots)
    return slots


# slot -> number of tokens. Ranks: slots 0-2 -> 4, 3 -> 8, 4-7 -> 1, 8-9 -> 16.
MIXES: dict[str, dict[int, int]] = {
    # rank 4: three slots of similar length -> one padded batched group; rank 8 alone.
    "padded_and_single": {-1: 5, 0: 3, 1: 2, 2: 3, 3: 4},
    # rank 1: a 40-token prefill beside three decodes -> split into single-slot groups;
    # rank 16: two equal segments stay one padded group.
    "long_beside_short": {-1: 3, 4: 40, 5: 1, 6: 1, 7: 1, 8: 6, 9: 6},
    "every_slot_decodes": {-1: 4, **{s: 1 for s in SLOT_RANKS}},
    # rank 4: slots 0 and 2 but not 1 -> their weights are gathered, not a slot range.
    "gapped_slots": {-1: 2, 0: 3, 2: 3, 8: 2},
    # groups of WIDE_ROWS or more (prefills) compute in the activations' dtype: rank 1 alone
    # (70 rows), rank 4 batched (80 rows), beside a narrow rank-16 decode.
    "wide_groups": {-1: 2, 4: 70, 0: 40, 1: 40, 8: 1},
    # one adapter for the whole batch (no gather or scatter needed): a decode batch, and a
    # prefill (computed in the activations' dtype, slice by slice)
    "one_slot_whole_batch": {3: 7},
    "one_slot_wide_whole_batch": {3: 70},
    "all_of_it": {-1: 9, 0: 7, 1: 1, 2: 2, 3: 11, 4: 33, 5: 2, 6: 1, 8: 1, 9: 5},
}


def check_groups(mapping: LoRAMapping, token_slots: list[int]) -> None:
    """The mapping's own invariants: every adapter token exactly once, in its slot's group,
    groups of one rank, padding positions inside their slot's segment."""
    assert mapping.unmerge_groups == []
    seen: list[int] = []
    for g in mapping.groups:
        assert {SLOT_RANKS[s] for s in g.slots} == {g.rank}
        assert g.slot_ids.tolist() == g.slots
        rows = g.rows.tolist()
        seen += rows
        assert [token_slots[r] for r in rows] == sorted(token_slots[r] for r in rows)
        assert {token_slots[r] for r in rows} == set(g.slots)
        lengths = [sum(1 for r in rows if token_slots[r] == s) for s in g.slots]
        assert g.segment_len == max(lengths)
        if len(g.slots) == 1:
            assert g.pad_index is None
        else:
            pad = g.pad_index.tolist()
            assert len(pad) == len(rows) == len(set(pad))
            for row, p in zip(rows, pad):
                assert g.slots[p // g.segment_len] == token_slots[row]
    assert sorted(seen) == [t for t, s in enumerate(token_slots) if s >= 0]


def test_mapping_groups_by_rank_and_splits_long_segments() -> None:
    slots = shuffled(MIXES["padded_and_single"], seed=0)
    mapping = LoRAMapping.build(slots, SLOT_RANKS, CPU)
    check_groups(mapping, slots)
    assert [(g.rank, g.slots) for g in mapping.groups] == [(4, [0, 1, 2]), (8, [3])]
    assert mapping.groups[0].pad_index is not None

    slots = shuffled(MIXES["long_beside_short"], seed=1)
    mapping = LoRAMapping.build(slots, SLOT_RANKS, CPU)
    check_groups(mapping, slots)
    # Padding 3 decodes to 40 would compute 160 rows for 43 tokens: each slot goes alone.
    assert [(g.rank, g.slots) for g in mapping.groups] == [
        (1, [4]), (1, [5]), (1, [6]), (1, [7]), (16, [8, 9])]
    assert mapping.groups[-1].pad_index is not None

    assert LoRAMapping.build([-1, -1, -1], SLOT_RANKS, CPU) is None
    assert [g.is_slot_range for g in LoRAMapping.build([0, 2, 0, 1, 2], SLOT_RANKS, CPU).groups] == [True]
    assert [g.is_slot_range for g in LoRAMapping.build([0, 2, 0, 2], SLOT_RANKS, CPU).groups] == [False]


# (activations, slot weights): float32; bf16 (CUDA); bf16 tokens on float32 slots (CPU).
DTYPES = {"f32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16_on_f32": (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("mix", list(MIXES))
def test_add_lora_equals_reference(mix: str, num_slices: int, dtypes: str) -> None:
    dtype, stack_dtype = DTYPES[dtypes]
    seed = list(MIXES).index(mix) * 10 + num_slices
    token_slots = shuffled(MIXES[mix], seed)
    out_sizes = SLICE_OUTS[num_slices]
    stack, weights = make_stack(out_sizes, stack_dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n, out_features = len(token_slots), sum(SLICE_OUTS[num_slices])
    x = torch.randn(n, IN_FEATURES, generator=g).to(dtype)
    base = torch.randn(n, out_features, generator=g).to(dtype)

    mapping = LoRAMapping.build(token_slots, SLOT_RANKS, CPU)
    check_groups(mapping, token_slots)
    fast = base.clone()
    add_lora(fast, x, mapping.groups, stack.a_flat, stack.b_flat, out_sizes)
    assert fast.dtype == dtype
    reference = base.clone()
    add_lora_reference(reference, x, token_slots, SLOT_RANKS, stack.a_flat, stack.b_flat,
                       out_sizes)

    torch.testing.assert_close(fast, reference, **TOLERANCE[dtype])
    truth = base.double() + dense_delta(x, token_slots, weights, out_features)
    torch.testing.assert_close(fast.double(), truth, **TOLERANCE[dtype])
    torch.testing.assert_close(reference.double(), truth, **TOLERANCE[dtype])
    # The deltas are far above the tolerance: a dropped or misrouted token would show.
    adapted = [t for t, s in enumerate(token_slots) if s >= 0]
    assert (fast[adapted].double() - base[adapted].double()).abs().amax(dim=1).min() > 1e-3
    base_only = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(fast[base_only], base[base_only])  # bit for bit
    assert torch.equal(reference[base_only], base[base_only])


# ---- LoRAStack: load then apply ---------------------------------------------------------

QKV = ("q_proj", "k_proj", "v_proj")
QKV_OUTS = [64, 32, 32]
STACK_IN = 32


def module(r: int, out: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scaling), the scaling drawn too: the slot must hold B times it."""
    scaling = 0.25 + torch.rand(1, generator=g).item()
    a = torch.randn(r, STACK_IN, generator=g) / STACK_IN ** 0.5
    return a, torch.randn(out, r, generator=g), scaling


def stack_delta(x: torch.Tensor,
                modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """What an adapter adds to a qkv output: scaling * x @ A.T @ B.T per targeted slice,
    else zero."""
    parts = []
    for name, out in zip(QKV, QKV_OUTS):
        if name in modules:
            a, b, scaling = modules[name]
            parts.append(scaling * (x.double() @ a.double().T @ b.double().T))
        else:
            parts.append(torch.zeros(x.shape[0], out, dtype=torch.float64))
    return torch.cat(parts, dim=1)


def test_lora_stack_load_then_apply_equals_direct_products() -> None:
    g = torch.Generator().manual_seed(0)
    stack = LoRAStack(QKV, STACK_IN, QKV_OUTS, max_loras=4, max_rank=8,
                      dtype=torch.float32, device=CPU)
    # First occupants: rank 8 on every slice of every slot.
    for slot in range(4):
        stack.load(slot, 8, {name: module(8, out, g) for name, out in zip(QKV, QKV_OUTS)})
    adapters = {
        # rank 8 with k_proj at rank 2 (rank_pattern): the slot's rank is the largest.
        0: (8, {"q_proj": module(8, 64, g), "k_proj": module(2, 32, g), "v_proj": module(8, 32, g)}),
        # rank 4 without k_proj: the previous occupant's k weights must not leak.
        1: (4, {"q_proj": module(4, 64, g), "v_proj": module(4, 32, g)}),
        # targets other projections only: contributes nothing here (same rank as slot 1).
        2: (4, {}),
        # alone in its rank group and without weights here: its group is skipped.
        3: (6, {}),
    }
    for slot, (rank, modules) in adapters.items():
        stack.load(slot, rank, modules)
    assert stack.weighted_slots == {0, 1}

    token_slots = shuffled({-1: 4, 0: 5, 1: 3, 2: 4, 3: 2}, seed=3)
    x = torch.randn(len(token_slots), STACK_IN, generator=g)
    base = torch.randn(len(token_slots), sum(QKV_OUTS), generator=g)
    mapping = LoRAMapping.build(token_slots, {s: r for s, (r, _) in adapters.items()}, CPU)
    out = base.clone()
    stack.apply(out, x, mapping)

    expected = base.double().clone()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            expected[t] += stack_delta(x[t:t + 1], adapters[slot][1])[0]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for t, slot in enumerate(token_slots):
        if slot < 0 or slot >= 2:
            assert torch.equal(out[t], base[t]), (t, slot)


def test_lora_stack_apply_skips_when_no_slot_targets_it() -> None:
    g = torch.Generator().manual_seed(1)
    stack = LoRAStack(("o_proj",), STACK_IN, [48], max_loras=2, max_rank=4,
                      dtype=torch.float32, device=CPU)
    stack.load(0, 4, {"o_proj": (torch.randn(4, STACK_IN, generator=g),
                                 torch.randn(48, 4, generator=g), 1.0)})
    stack.load(0, 4, {})  # a new occupant that does not target o_proj
    x, base = torch.randn(6, STACK_IN, generator=g), torch.randn(6, 48, generator=g)
    out = base.clone()
    stack.apply(out, x, LoRAMapping.build([0, -1, 0, 0, -1, 0], {0: 4}, CPU))
    assert torch.equal(out, base)
