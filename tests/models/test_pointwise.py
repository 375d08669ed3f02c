"""models/pointwise.py: the residual add + RMSNorm and the SiLU-gated product by the CPU
kernel (kernels/pointwise.c) against torch's bf16 operations, which they replace."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from loraplex.models import pointwise
from loraplex.models.pointwise import add_rms_norm, silu_mul

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: torch computes them")


def bf16(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps separate a and b, element by element (same signs here)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("rows, d", [(1, 576), (8, 576), (70, 576), (3, 37)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_equals_torch(rows: int, d: int, with_residual: bool) -> None:
    """A decode step's rows, enough rows for the threads to share them (70), a width with a
    vector tail (37); the first layer has no residual yet."""
    assert pointwise.kernel() is not None
    x, residual, weight = bf16(rows, d, seed=1, scale=3.0), bf16(rows, d, seed=2), bf16(d, seed=3)
    want_sum = x + residual if with_residual else x.clone()
    want = F.rms_norm(want_sum, (d,), weight, 1e-5)
    got, got_sum = add_rms_norm(x.clone(), residual if with_residual else None, weight, 1e-5)
    assert torch.equal(got_sum, want_sum)  # the running sum is rounded exactly as torch does
    # The same float32 arithmetic summed in another order: at most one bf16 step apart,
    # and almost never apart at all.
    assert ulps_apart(got, want).max() <= 1
    assert (got != want).float().mean() < 1e-3


def test_add_rms_norm_writes_the_sum_into_x() -> None:
    x, residual, weight = bf16(4, 64, seed=4), bf16(4, 64, seed=5), bf16(64, seed=6)
    want = x + residual
    _, got_sum = add_rms_norm(x, residual, weight, 1e-6)
    assert got_sum.data_ptr() == x.data_ptr() and torch.equal(x, want)


@pytest.mark.parametrize("rows, n", [(1, 1536), (8, 1536), (70, 1536), (3, 37)])
def test_silu_mul_equals_torch(rows: int, n: int) -> None:
    assert pointwise.kernel() is not None
    gate_up = bf16(rows, 2 * n, seed=rows + n, scale=4.0)
    gate_up[0, :5] = torch.tensor([-100.0, 100.0, 0.0, -3.0, 90.0])  # exp's clamped range
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = silu_mul(gate_up)
    # Differences only where silu is so small that bf16 cannot tell the two exps apart.
    differ = got != want
    assert (want[differ].float().abs() < 1e-30).all(), (got[differ], want[differ])


def test_other_dtypes_and_layouts_run_torch() -> None:
    """float32, and a non-contiguous input, take torch's path (same results by definition)."""
    x, residual, weight = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    got, got_sum = add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x + residual, (32,), weight, 1e-5), rtol=0, atol=0)
    wide = bf16(4, 80, seed=7)
    gate_up = wide[:, :64]  # rows of 64 inside rows of 80: not contiguous
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_mul(gate_up), F.silu(gate) * up)


def test_kernel_off_means_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pointwise.DISABLE_ENV, "0")
    pointwise.kernel.cache_clear()
    try:
        assert pointwise.kernel() is None
        x, residual, weight = bf16(2, 16, seed=8), bf16(2, 16, seed=9), bf16(16, seed=10)
        got, got_sum = add_rms_norm(x, residual, weight, 1e-5)
        assert got_sum.data_ptr() != x.data_ptr()  # torch made a new sum
        assert torch.equal(got, F.rms_norm(x + residual, (16,), weight, 1e-5))
    finally:
        monkeypatch.undo()
        pointwise.kernel.cache_clear()
