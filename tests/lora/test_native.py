"""kernels/bgmv.c and kernels/sgmv.c through lora/native.py: the CPU kernels that serve bf16
decode tokens and prefill runs, against the per-token oracle, and the torch fallback when
they cannot be built."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from loraplex import kernels
from loraplex.lora import native
from loraplex.lora.layers import LoRAStack, slot_dtype
from loraplex.lora.ops import SGMV_ROWS, LoRAMapping, add_lora_reference
from tests.lora.test_ops import (CPU, IN_FEATURES, MIXES, SLICE_OUTS, SLOT_RANKS, TOLERANCE,
                                 dense_delta, make_stack, shuffled)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: LoRA runs on torch products only")


def inputs(n: int, in_features: int, out_features: int, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, in_features, generator=g).bfloat16(),
            torch.randn(n, out_features, generator=g).bfloat16())


@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("mix", list(MIXES))
def test_kernel_equals_reference(mix: str, num_slices: int) -> None:
    """Every mix of slots and ranks (1, 4, 8, 16; runs of one slot longer and shorter than a
    tile of 4; in = 48, so the products' vector tails too): bgmv takes the slots of few
    tokens, sgmv those of SGMV_ROWS or more (ranks 1, 4 and 8, 33 to 70 tokens), and the
    sum is the oracle's within bf16 rounding."""
    seed = list(MIXES).index(mix) * 10 + num_slices
    stack, weights = make_stack(SLICE_OUTS[num_slices], torch.bfloat16, seed)
    assert stack.kernel is not None
    token_slots = shuffled(MIXES[mix], seed)
    x, base = inputs(len(token_slots), IN_FEATURES, stack.out_features, seed)
    mapping = LoRAMapping.build(token_slots, SLOT_RANKS, CPU)
    (p,) = mapping.passes
    assert native.wide_kernel() is None or not p.wide_groups
    counts = {s: token_slots.count(s) for s in set(token_slots)}
    for tokens, expected in ((p.narrow, [t for t, s in enumerate(token_slots) if s >= 0
                                         and counts[s] < SGMV_ROWS]),
                             (p.wide, [t for t, s in enumerate(token_slots) if s >= 0
                                       and counts[s] >= SGMV_ROWS])):
        if native.wide_kernel() is None:
            break  # the torch split, tested in test_ops.py
        rows = [] if tokens is None else tokens.rows.tolist()
        assert sorted(rows) == expected
        if rows:
            assert tokens.slots.tolist() == [token_slots[t] for t in rows]

    fast = base.clone()
    stack.apply(fast, x, mapping)
    reference = base.clone()
    add_lora_reference(reference, x, token_slots, SLOT_RANKS, stack.a_flat, stack.b_flat,
                       stack.out_sizes)
    torch.testing.assert_close(fast, reference, **TOLERANCE[torch.bfloat16])
    truth = base.double() + dense_delta(x, token_slots, weights, stack.out_features)
    torch.testing.assert_close(fast.double(), truth, **TOLERANCE[torch.bfloat16])
    base_only = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(fast[base_only], base[base_only])


def test_kernel_at_model_sizes_and_negative_alpha() -> None:
    """Sizes of the default model's fused qkv (576 -> 576 + 192 + 192, the vector paths
    without tails), a whole tile and a partial one, and alpha -1 (a merged adapter's
    delta taken out) undoing alpha +1 up to rounding."""
    outs, in_features, rank = [576, 192, 192], 576, 16
    g = torch.Generator().manual_seed(3)
    stack = LoRAStack(("q", "k", "v"), in_features, outs, max_loras=4, max_rank=rank,
                      dtype=torch.bfloat16, device=CPU)
    for slot in range(4):
        stack.load(slot, rank, {name: (torch.randn(rank, in_features, generator=g) / 24,
                                       torch.randn(out, rank, generator=g) / 4, 1.0)
                                for name, out in zip(stack.slice_names, outs)})
    token_slots = [2] * 6 + [0, -1, 1]
    x, base = inputs(len(token_slots), in_features, sum(outs), 4)
    rows = [t for t, s in enumerate(token_slots) if s >= 0]
    tokens = native.KernelTokens(rows, [token_slots[t] for t in rows])

    out = base.clone()
    stack.kernel.add(out, x, tokens, 1.0)
    reference = base.clone()
    add_lora_reference(reference, x, token_slots, {0: rank, 1: rank, 2: rank}, stack.a_flat,
                       stack.b_flat, outs)
    torch.testing.assert_close(out, reference, **TOLERANCE[torch.bfloat16])
    assert (out.float() - base.float()).abs().amax(dim=1)[rows].min() > 0.1

    stack.kernel.add(out, x, tokens, -1.0)
    torch.testing.assert_close(out, base, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [1, 3, 4])
def test_one_run_is_split_among_threads(num_threads: int, num_tokens: int) -> None:
    """A step whose tokens all fall in one run of one slot (batch 1) shares that run's rows
    of A and columns of B among the threads; the shares are uneven with 3 threads, and the
    slice of 200 columns ends in a tail past its last full block."""
    outs, in_features, rank = [576, 200, 192], 576, 16
    g = torch.Generator().manual_seed(7)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)  # the kernel's team size is read when slots are made
    try:
        stack = LoRAStack(("q", "k", "v"), in_features, outs, max_loras=2, max_rank=rank,
                          dtype=torch.bfloat16, device=CPU)
    finally:
        torch.set_num_threads(before)
    stack.load(1, rank, {name: (torch.randn(rank, in_features, generator=g) / 24,
                                torch.randn(out, rank, generator=g) / 4, 1.0)
                         for name, out in zip(stack.slice_names, outs)})
    token_slots = [-1] + [1] * num_tokens
    x, base = inputs(len(token_slots), in_features, sum(outs), num_tokens)
    out = base.clone()
    stack.apply(out, x, LoRAMapping.build(token_slots, {1: rank}, CPU))
    reference = base.clone()
    add_lora_reference(reference, x, token_slots, {1: rank}, stack.a_flat, stack.b_flat, outs)
    torch.testing.assert_close(out, reference, **TOLERANCE[torch.bfloat16])
    assert torch.equal(out[0], base[0])
    assert (out.float() - base.float()).abs().amax(dim=1)[1:].min() > 0.1


def test_kernel_skips_slots_that_do_not_target_the_projection() -> None:
    g = torch.Generator().manual_seed(5)
    stack = LoRAStack(("o_proj",), 32, [64], max_loras=2, max_rank=4, dtype=torch.bfloat16,
                      device=CPU)
    stack.load(0, 4, {"o_proj": (torch.randn(4, 32, generator=g),
                                 torch.randn(64, 4, generator=g), 1.0)})
    stack.load(1, 4, {})  # an adapter for other projections
    assert stack.slot_ranks.tolist() == [4, 0]
    x, base = inputs(4, 32, 64, 6)
    out = base.clone()
    stack.apply(out, x, LoRAMapping.build([1, 0, 1, -1], {0: 4, 1: 4}, CPU))
    assert torch.equal(out[[0, 2, 3]], base[[0, 2, 3]])
    assert not torch.equal(out[1], base[1])



def test_a_projection_no_adapter_of_the_step_targets_gets_no_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters for other projections only (PEFT's default q_proj, v_proj seen from o_proj):
    the step's output is left alone without a kernel call; one targeting adapter in the
    step brings the call back, for its tokens only."""
    g = torch.Generator().manual_seed(8)
    stack = LoRAStack(("o_proj",), 32, [64], max_loras=3, max_rank=4, dtype=torch.bfloat16,
                      device=CPU)
    stack.load(0, 4, {"o_proj": (torch.randn(4, 32, generator=g),
                                 torch.randn(64, 4, generator=g), 1.0)})
    stack.load(1, 4, {})
    stack.load(2, 4, {})
    calls = []
    real_add = stack.kernel.add
    monkeypatch.setattr(stack.kernel, "add", lambda *a, **k: (calls.append(a), real_add(*a, **k)))
    ranks = {0: 4, 1: 4, 2: 4}
    x, base = inputs(4, 32, 64, 9)
    out = base.clone()
    stack.apply(out, x, LoRAMapping.build([1, 2, -1, 1], ranks, CPU))
    assert calls == [] and torch.equal(out, base)
    stack.apply(out, x, LoRAMapping.build([1, 0, -1, 2], ranks, CPU))
    assert len(calls) == 1
    assert torch.equal(out[[0, 2, 3]], base[[0, 2, 3]]) and not torch.equal(out[1], base[1])

def test_slots_of_many_tokens_go_to_the_wide_kernel() -> None:
    token_slots = [0] * SGMV_ROWS + [1] * (SGMV_ROWS - 1) + [2, -1]
    (p,) = LoRAMapping.build(token_slots, {0: 4, 1: 4, 2: 8}, CPU).passes
    if native.wide_kernel() is None:  # without AVX512-BF16: the torch split
        assert p.wide is None and p.narrow.rows.tolist() == list(range(2 * SGMV_ROWS))
        return
    assert p.wide.rows.tolist() == list(range(SGMV_ROWS)) and set(p.wide.slots.tolist()) == {0}
    assert p.narrow.rows.tolist() == list(range(SGMV_ROWS, 2 * SGMV_ROWS))
    assert p.narrow.slots.tolist() == [1] * (SGMV_ROWS - 1) + [2]
    assert p.wide_groups == []


WIDE_SHAPES = {  # in, slice outputs, rank
    "default_model_qkv": (576, [576, 200, 192], 16),  # 200: a 16-column tail in a slice
    "odd_everything": (97, [50, 7], 3),  # an input column without a partner, an odd rank
    "default_model_down": (1536, [576], 16),
}


@pytest.mark.parametrize("num_threads", [1, 3])
@pytest.mark.parametrize("shape", list(WIDE_SHAPES))
def test_wide_kernel_on_prefill_runs(shape: str, num_threads: int) -> None:
    """Two prefill runs of different slots, their rows interleaved with base rows (a
    gather, and a last block of fewer than 8 rows), on 1 or 3 threads (uneven shares):
    sgmv's sums are the oracle's within bf16 rounding, base rows are untouched, and
    alpha -1 (a merged adapter's delta taken out) undoes alpha +1 up to rounding."""
    if native.wide_kernel() is None:
        pytest.skip("no AVX512-BF16: prefill runs use torch products (tested in test_ops.py)")
    in_features, outs, rank = WIDE_SHAPES[shape]
    g = torch.Generator().manual_seed(11)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)  # the kernel's team size is read when slots are made
    try:
        stack = LoRAStack(tuple(f"s{i}" for i in range(len(outs))), in_features, outs,
                          max_loras=3, max_rank=rank, dtype=torch.bfloat16, device=CPU)
    finally:
        torch.set_num_threads(before)
    for slot in (1, 2):
        stack.load(slot, rank, {name: (torch.randn(rank, in_features, generator=g) / in_features ** 0.5,
                                       torch.randn(out, rank, generator=g) / 4, 1.0)
                                for name, out in zip(stack.slice_names, outs)})
    token_slots = shuffled({-1: 9, 1: 70, 2: SGMV_ROWS + 3}, in_features)
    x, base = inputs(len(token_slots), in_features, sum(outs), rank)
    mapping = LoRAMapping.build(token_slots, {1: rank, 2: rank}, CPU)
    (p,) = mapping.passes
    assert p.narrow is None and p.wide is not None
    out = base.clone()
    stack.apply(out, x, mapping)
    reference = base.clone()
    add_lora_reference(reference, x, token_slots, {1: rank, 2: rank}, stack.a_flat,
                       stack.b_flat, outs)
    torch.testing.assert_close(out, reference, **TOLERANCE[torch.bfloat16])
    rows = [t for t, s in enumerate(token_slots) if s >= 0]
    base_rows = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[base_rows], base[base_rows])
    assert (out.float() - base.float()).abs().amax(dim=1)[rows].min() > 0.05

    stack.kernel.add(out, x, p.wide, -1.0, wide=True)
    torch.testing.assert_close(out, base, atol=0.1, rtol=0.02)


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """kernel() built anew under a scratch LORAPLEX_HOME; the cached one restored after."""
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    native.kernel.cache_clear()
    native.wide_kernel.cache_clear()
    yield tmp_path
    native.kernel.cache_clear()
    native.wide_kernel.cache_clear()


def test_kernel_is_built_once_into_loraplex_home(fresh_kernel) -> None:
    assert native.kernel() is not None
    assert slot_dtype(torch.bfloat16, CPU) == torch.bfloat16
    assert slot_dtype(torch.float32, CPU) == torch.float32
    (built,) = (fresh_kernel / "native").iterdir()
    assert built.name.startswith("bgmv-") and built.suffix == ".so"
    native.kernel.cache_clear()
    mtime = built.stat().st_mtime_ns
    assert native.kernel() is not None
    assert built.stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_portable_build_equals_reference(fresh_kernel, monkeypatch) -> None:
    """The kernels built without AVX512-BF16, as on CPUs without it: bgmv runs plain vector
    code, sgmv says it is not supported, and prefill runs go to torch products."""
    if "avx512_bf16" not in kernels.cpu_features():
        pytest.skip("this CPU runs the portable path already (the tests above)")
    monkeypatch.setattr(kernels, "FLAGS", [*kernels.FLAGS, "-mno-avx512bf16"])
    assert native.kernel() is not None and native.wide_kernel() is None
    test_kernel_equals_reference("all_of_it", 3)
    test_kernel_at_model_sizes_and_negative_alpha()


@pytest.mark.parametrize("how", ["disabled", "compiler fails"])
def test_without_the_kernel_lora_falls_back_to_torch(fresh_kernel, monkeypatch, caplog, how) -> None:
    if how == "disabled":
        monkeypatch.setenv(native.DISABLE_ENV, "0")
    else:
        monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    with caplog.at_level(logging.WARNING, logger="loraplex.kernels"):
        assert native.kernel() is None and native.wide_kernel() is None
    assert not native.can_use(torch.bfloat16, CPU)
    assert slot_dtype(torch.bfloat16, CPU) == torch.float32  # the fast torch path's dtype
    if how == "compiler fails":
        assert "could not build the bgmv kernel" in caplog.text
        assert not any((fresh_kernel / "native").iterdir())  # no half-written library left
    stack, weights = make_stack(SLICE_OUTS[3], torch.float32, 0)
    assert stack.kernel is None
    token_slots = shuffled(MIXES["every_slot_decodes"], 0)
    x, base = inputs(len(token_slots), IN_FEATURES, stack.out_features, 0)
    out = base.clone()
    stack.apply(out, x, LoRAMapping.build(token_slots, SLOT_RANKS, CPU))
    truth = base.double() + dense_delta(x, token_slots, weights, stack.out_features)
    torch.testing.assert_close(out.double(), truth, **TOLERANCE[torch.bfloat16])
