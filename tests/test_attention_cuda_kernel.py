"""The CUDA attention kernels (csrc/attention/attention_cuda.cu) under the CPU emulation of CUDA,
called through the raw binding, against PyTorch's math backend in float64.

Outputs must be within 1e-5 of the reference in float32 (max |diff| / max |ref|), 1e-12 in
float64, and in float16 / bfloat16 within twice the error of PyTorch's own
scaled_dot_product_attention computed in that dtype (in float32 too where that is larger than
1e-5, as for scores in the hundreds); lse (float32) within 1e-5. The shapes reach the
tensor-core kernel (float16 / bfloat16 with len_q > 4), the CUDA-core kernel (float32 /
float64) and the split-key decoding path (len_q <= 4, every dtype) with its combine kernel.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from genkernels import _backend

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(_backend._C_emu is None,
                                reason="needs the emulated CUDA module (GENKERNELS_EMULATION=ON)")

ALL = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The least error bound: 1e-5 in float32, the unit roundoff in float16 and bfloat16 (where
# PyTorch's own result may happen to be exact).
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
NO_WINDOW = (-1, -1)


def kernel(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, kv_lens: Optional[Tensor] = None,
           scale: Optional[float] = None, window=NO_WINDOW, bottom_right: bool = False, want_lse: bool = True):
    """(out, lse) of the emulated CUDA kernels. q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev),
    each with a contiguous last dimension; mask broadcastable to (B, Hq, L, S)."""
    batch, heads_q, len_q, dim_qk = q.shape
    heads_kv, len_kv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    out = torch.full((batch, heads_q, len_q, dim_v), math.nan, dtype=q.dtype)
    lse = torch.full((batch, heads_q, len_q), math.nan) if want_lse else None
    if mask is not None:
        mask = mask.expand(batch, heads_q, len_q, len_kv)  # broadcast dimensions get stride 0
    codes = _backend.DTYPE_CODES
    _backend._C_emu.attention_forward(
        0, 0, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr() if want_lse else 0,
        [batch, heads_q, heads_kv, len_q, len_kv, dim_qk, dim_v], list(q.stride()[:3]), list(k.stride()[:3]),
        list(v.stride()[:3]), mask.data_ptr() if mask is not None else 0,
        codes[mask.dtype] if mask is not None else codes[torch.bool],
        list(mask.stride()) if mask is not None else [0, 0, 0, 0], kv_lens.data_ptr() if kv_lens is not None else 0,
        1.0 / math.sqrt(dim_qk) if scale is None else scale, window[0], window[1], bottom_right, 0.0, 0, codes[q.dtype],
    )
    return out, lse


def allowed_and_bias(shape, mask, kv_lens, window, bottom_right) -> tuple[Tensor, Tensor]:
    """Which keys each query may see under attention.h's rules, and the additive float64 bias."""
    batch, _, len_q, len_kv = shape
    kv = kv_lens.long() if kv_lens is not None else torch.full((batch,), len_kv)
    j, i = torch.arange(len_kv), torch.arange(len_q)[:, None]
    diagonal = (kv - len_q if bottom_right else torch.zeros(batch, dtype=torch.long))[:, None, None, None]
    offset = j - (i + diagonal)
    allowed = j < kv[:, None, None, None]
    if window[0] >= 0:
        allowed = allowed & (offset >= -window[0])
    if window[1] >= 0:
        allowed = allowed & (offset <= window[1])
    allowed = allowed.expand(shape)
    bias = torch.zeros(shape, dtype=torch.float64)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        bias = bias + mask.double()
    return allowed, bias


def reference(q, k, v, mask=None, kv_lens=None, scale=None, window=NO_WINDOW, bottom_right=False):
    """(out, lse, alive): out by PyTorch's math backend in float64, lse the logsumexp of the scores,
    alive whether a row has an allowed key (rows without one get out = 0 and lse = 0)."""
    batch, heads_q, len_q, dim_qk = q.shape
    heads_kv, len_kv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(dim_qk) if scale is None else scale
    allowed, bias = allowed_and_bias((batch, heads_q, len_q, len_kv), mask, kv_lens, window, bottom_right)
    attn_mask = bias.masked_fill(~allowed, -math.inf)
    group = heads_q // heads_kv if heads_kv else 1
    scores = scale * q.double() @ k.double().repeat_interleave(group, 1).mT + attn_mask
    lse = torch.logsumexp(scores, dim=-1)
    alive = ~torch.isneginf(lse)
    if q.numel() and len_kv and dim_v:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=attn_mask, scale=scale,
                                                 enable_gqa=True)
    else:
        out = torch.zeros(batch, heads_q, len_q, dim_v, dtype=torch.float64)
    return out.masked_fill(~alive[..., None], 0.0), lse.masked_fill(~alive, 0.0), alive


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def torch_error_in_dtype(q, k, v, mask, kv_lens, scale, window, bottom_right, expected, alive) -> float:
    """The error of PyTorch's own scaled_dot_product_attention in q's dtype (float32, float16 or
    bfloat16), on the rows that have an allowed key."""
    allowed, bias = allowed_and_bias((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), mask, kv_lens, window,
                                     bottom_right)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    if mask is None or mask.dtype == torch.bool:
        attn_mask = allowed
    else:
        attn_mask = bias.masked_fill(~allowed, -math.inf).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True)
    return relative_error(out[alive], expected[alive])


def check(q, k, v, mask=None, kv_lens=None, scale=None, window=NO_WINDOW, bottom_right=False, want_lse=True):
    args = (mask, kv_lens, scale, window, bottom_right)
    out, lse = kernel(q, k, v, *args, want_lse=want_lse)
    expected, expected_lse, alive = reference(q, k, v, *args)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "output left unwritten or NaN"
    assert (out[~alive] == 0).all(), "a row without allowed keys must be 0"
    if alive.any():
        # In float32 too, where large scores make 1e-5 unreachable (their rounding moves the
        # exponentials), twice PyTorch's own error is the bound.
        if q.dtype == torch.float64:
            tol = 1e-12
        else:
            tol = max(2 * torch_error_in_dtype(q, k, v, *args, expected, alive), ERROR_FLOOR[q.dtype])
        error = relative_error(out[alive], expected[alive])
        assert error <= tol, f"{q.dtype}: relative error {error:.3g} > {tol:.3g}"
    if want_lse:
        assert (lse[~alive] == 0).all(), "a row without allowed keys must have lse 0"
        torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


def inputs(batch, heads_q, heads_kv, len_q, len_kv, dim_qk, dim_v, dtype):
    """Random q, k, v in dtype, contiguous."""
    shapes = ((batch, heads_q, len_q, dim_qk), (batch, heads_kv, len_kv, dim_qk), (batch, heads_kv, len_kv, dim_v))
    return tuple(torch.randn(shape).to(dtype) for shape in shapes)


def float_mask(shape, dtype, mask_dtype) -> Tensor:
    """An additive mask, its values exact in the query dtype (as PyTorch's low-precision
    comparison run needs it in that dtype)."""
    return torch.randn(shape).to(dtype).to(mask_dtype)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("len_q", [1, 5, 16, 33, 64, 130])
@pytest.mark.parametrize("len_kv", [1, 5, 16, 33, 64, 130])
def test_lengths(len_q, len_kv):
    for dtype in ALL:
        check(*inputs(1, 2, 1, len_q, len_kv, 64, 64, dtype))


@pytest.mark.parametrize("dim_qk, dim_v", [(16, 16), (40, 40), (64, 64), (80, 80), (128, 128), (256, 256), (7, 7),
                                           (72, 72), (40, 136), (256, 24), (8, 200), (130, 130)])
def test_head_dims(dim_qk, dim_v):
    for dtype in ALL:
        for len_q in (33, 3):
            check(*inputs(1, 1, 1, len_q, 70, dim_qk, dim_v, dtype))


@pytest.mark.parametrize("batch, heads_q, heads_kv", [(0, 2, 1), (2, 0, 0), (1, 1, 1), (2, 2, 2), (2, 4, 2),
                                                      (1, 6, 3), (2, 8, 1)])
def test_batch_and_heads(batch, heads_q, heads_kv):
    for dtype in ALL:
        for len_q in (20, 3):
            check(*inputs(batch, heads_q, heads_kv, len_q, 37, 32, 32, dtype))


@pytest.mark.parametrize("len_q, len_kv", [(0, 5), (6, 0), (2, 0)])
def test_empty_lengths(len_q, len_kv):
    for dtype in ALL:
        check(*inputs(2, 2, 1, len_q, len_kv, 16, 16, dtype))


MASK_SHAPES = [(33, 70), (1, 1, 33, 70), (2, 1, 33, 70), (1, 4, 1, 70), (2, 4, 33, 70), (70,), (2, 4, 33, 1)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float32", "query"])
def test_masks(shape, kind):
    for dtype in ALL:
        for len_q in (33, 3):
            q, k, v = inputs(2, 4, 2, len_q, 70, 40, 40, dtype)
            full = (shape[:-2] + (len_q,) + shape[-1:]) if len(shape) >= 2 and shape[-2] == 33 else shape
            if kind == "bool":
                mask = torch.rand(full) < 0.7
            else:
                mask = float_mask(full, dtype, torch.float32 if kind == "float32" else dtype)
            check(q, k, v, mask=mask)


def test_non_contiguous_mask():
    for dtype in ALL:
        q, k, v = inputs(2, 2, 2, 33, 40, 16, 16, dtype)
        mask = (torch.rand(2, 2, 40, 33) < 0.8).transpose(-1, -2)
        check(q, k, v, mask=mask)
        check(q, k, v, mask=float_mask((40, 33), dtype, torch.float32).t())


@pytest.mark.parametrize("window", [(-1, 0), (3, 0), (-1, 2), (4, 4), (0, 0), (10, -1), (0, -1), (40, 7)])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_causal_and_windows(window, bottom_right):
    for dtype in ALL:
        for len_q, len_kv in ((33, 70), (70, 33), (130, 130), (3, 100), (66, 200)):
            check(*inputs(1, 2, 1, len_q, len_kv, 64, 64, dtype), window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("window, bottom_right",
                         [(NO_WINDOW, False), ((-1, 0), True), ((16, 0), True), ((5, 5), False)])
def test_kv_lens(window, bottom_right):
    for dtype in ALL:
        for len_q, len_kv in ((33, 70), (4, 150), (1, 300)):
            q, k, v = inputs(4, 4, 2, len_q, len_kv, 48, 48, dtype)
            kv_lens = torch.tensor([0, len_kv, 1, len_kv // 2 + 3], dtype=torch.int32)
            check(q, k, v, kv_lens=kv_lens, window=window, bottom_right=bottom_right)


def test_fully_masked_rows():
    for dtype in ALL:
        for len_q in (40, 3):
            q, k, v = inputs(2, 2, 1, len_q, 50, 32, 32, dtype)
            mask = torch.rand(2, 2, len_q, 50) < 0.5
            mask[:, :, 1] = False
            mask[1, 0] = False
            check(q, k, v, mask=mask)
            bias = float_mask((2, 2, len_q, 50), dtype, torch.float32)
            bias[0, 1, 2] = -math.inf
            check(q, k, v, mask=bias)
            # Bottom-right causal with len_q > len_kv: the first len_q - len_kv rows see no key.
            check(*inputs(1, 2, 1, len_q, 2, 32, 32, dtype), window=(-1, 0), bottom_right=True)
            # A top-left diagonal band, whose rows past kv_lens see no key.
            check(q, k, v, window=(0, 0), kv_lens=torch.tensor([2, 30], dtype=torch.int32))


def test_non_contiguous_inputs():
    for dtype in ALL:
        for len_q in (45, 2):
            # (B, L, H, E) storage seen as (B, H, L, E); rows of k padded to an odd stride; v one
            # element past a 16-byte boundary, so rows are copied element by element.
            q = torch.randn(2, len_q, 4, 24).to(dtype).transpose(1, 2)
            k = torch.randn(2, 2, 70, 29).to(dtype)[..., :24]
            v = torch.randn(2 * 2 * 70 * 20 + 1).to(dtype)[1:].view(2, 2, 70, 20)
            check(q, k, v)
            check(q, k, v, window=(-1, 0), bottom_right=True)
            # Strided heads and batches with 16-byte aligned rows.
            big = torch.randn(4, 4, 70, 64).to(dtype)
            check(q, big[::2, ::2, :, :24], big[1::2, 1::2, :, 32:])


@pytest.mark.parametrize("len_q", [1, 2, 3, 4])
@pytest.mark.parametrize("batch, heads_q, heads_kv", [(2, 8, 2), (1, 8, 1)])  # 1 or 2 row blocks per head
def test_decode(len_q, batch, heads_q, heads_kv):
    for dtype in ALL:
        for len_kv in (1, 63, 64, 65, 200, 300):
            q, k, v = inputs(batch, heads_q, heads_kv, len_q, len_kv, 64, 64, dtype)
            check(q, k, v)
            kv_lens = torch.randint(0, len_kv + 1, (batch,), dtype=torch.int32)
            check(q, k, v, kv_lens=kv_lens, window=(-1, 0), bottom_right=True)
            check(q, k, v, kv_lens=kv_lens, window=(50, 0), bottom_right=True, mask=torch.rand(len_kv) < 0.9)


def test_without_lse():
    for dtype in ALL:
        for len_q in (33, 2):
            check(*inputs(1, 2, 1, len_q, 100, 64, 64, dtype), want_lse=False)


def test_scale_and_large_scores():
    for dtype in ALL:
        q, k, v = inputs(1, 2, 2, 40, 90, 64, 64, dtype)
        check(q * 4, k * 4, v, scale=1.0)  # scores of several hundred: the online maximum must keep up
        check(q, k, v, scale=0.01)


def test_orders_case():
    """A few calls of each kernel, run again below in reverse and random thread order."""
    for dtype in ALL:
        q, k, v = inputs(1, 4, 2, 70, 100, 40, 40, dtype)
        check(q, k, v, window=(-1, 0), bottom_right=True, mask=torch.rand(70, 100) < 0.8)
        check(*inputs(2, 4, 2, 3, 200, 72, 72, dtype), kv_lens=torch.tensor([150, 37], dtype=torch.int32))


@pytest.mark.skipif("GK_EMU_ORDER" in os.environ, reason="GK_EMU_ORDER is set: this run already chose an order")
@pytest.mark.parametrize("order", ["reverse", "random:7"])
def test_thread_orders(order):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-k", "test_orders_case", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=dict(os.environ, GK_EMU_ORDER=order), capture_output=True, text=True,
    )
    assert result.returncode == 0, f"GK_EMU_ORDER={order}:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
