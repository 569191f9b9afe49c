"""The CPU attention kernel through the raw binding, against PyTorch's math backend in float64.

Covers both paths of the kernel (prefill tiles and the decode path for len_q <= 4, with its
split over keys), every masking feature (bool and float masks of broadcast shapes, causal
bands aligned top-left and bottom-right, windows, per-batch key counts, fully masked rows),
grouped-query heads, strided inputs, the three dtypes and the three instruction-set builds.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from genkernels import _C
from genkernels._backend import DTYPE_CODES

BOOL_CODE = 6
needs_amx = pytest.mark.skipif(_C.cpu_isa() != "amx", reason="this CPU has no AMX tiles")


def kernel(q, k, v, mask=None, kv_lens=None, scale=None, window=(-1, -1), bottom_right=False, threads=None):
    """Runs _C.attention_forward on q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev), possibly
    strided; mask broadcastable to (B, Hq, L, S). Returns out and lse."""
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_kv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(batch, heads_q, len_q, dim_v, dtype=q.dtype)
    lse = torch.empty(batch, heads_q, len_q, dtype=torch.float32)
    mask_ptr, mask_code, mask_strides = 0, DTYPE_CODES[q.dtype], [0, 0, 0, 0]
    if mask is not None:
        mask = mask.expand(batch, heads_q, len_q, len_kv)
        mask_ptr, mask_strides = mask.data_ptr(), list(mask.stride())
        mask_code = BOOL_CODE if mask.dtype == torch.bool else DTYPE_CODES[mask.dtype]
    _C.attention_forward(
        threads or torch.get_num_threads(), 0, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        lse.data_ptr(), [batch, heads_q, heads_kv, len_q, len_kv, dim, dim_v], list(q.stride()[:3]),
        list(k.stride()[:3]), list(v.stride()[:3]), mask_ptr, mask_code, mask_strides,
        kv_lens.data_ptr() if kv_lens is not None else 0, dim**-0.5 if scale is None else scale,
        window[0], window[1], bottom_right, 0.0, 0, DTYPE_CODES[q.dtype])
    return out, lse


def reference(q, k, v, mask=None, kv_lens=None, scale=None, window=(-1, -1), bottom_right=False):
    """float64 out and lse from torch's math backend; the band, the key counts and the mask
    become one additive mask. Queries with no allowed key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_kv = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    lens = kv_lens.tolist() if kv_lens is not None else [len_kv] * batch
    i = torch.arange(len_q)[:, None]
    j = torch.arange(len_kv)[None, :]
    allowed = []
    for n in lens:
        diagonal = n - len_q if bottom_right else 0
        ok = j < n
        if window[0] >= 0:
            ok = ok & (j >= i + diagonal - window[0])
        if window[1] >= 0:
            ok = ok & (j <= i + diagonal + window[1])
        allowed.append(ok)
    allowed = torch.stack(allowed or [j < 0])[:batch, None].expand(batch, heads_q, len_q, len_kv)
    bias = torch.zeros(batch, heads_q, len_q, len_kv, dtype=torch.float64)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        bias = bias + mask.double()
    bias = bias.masked_fill(~allowed, -math.inf)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=heads_q != heads_kv)
    group = heads_q // max(heads_kv, 1)
    scores = scale * q @ k.repeat_interleave(group, 1).transpose(-1, -2) + bias
    lse = torch.logsumexp(scores, -1)
    dead = torch.isinf(lse)
    return out.masked_fill(dead[..., None], 0), lse.masked_fill(dead, 0)


def relative_error(x, ref):
    """max |x - ref| / max |ref| (absolute when ref is all zero)."""
    if ref.numel() == 0:
        return 0.0
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1)).item()


def check(q, k, v, tol=None, threads=None, **kwargs):
    out, lse = kernel(q, k, v, threads=threads, **kwargs)
    ref_out, ref_lse = reference(q, k, v, **kwargs)
    tol = tol or {torch.float32: 1e-5, torch.float64: 1e-12}[q.dtype]
    assert relative_error(out, ref_out) <= tol
    assert relative_error(lse, ref_lse) <= max(tol, 2e-7)  # lse is float32
    return out, lse


def qkv(batch, heads_q, heads_kv, len_q, len_kv, dim, dim_v=None, dtype=torch.float32):
    dim_v = dim if dim_v is None else dim_v
    return (torch.randn(batch, heads_q, len_q, dim, dtype=dtype), torch.randn(batch, heads_kv, len_kv, dim, dtype=dtype),
            torch.randn(batch, heads_kv, len_kv, dim_v, dtype=dtype))


LENGTHS = [1, 3, 17, 64, 65, 130, 300]


@pytest.mark.parametrize("len_q", LENGTHS)
@pytest.mark.parametrize("len_kv", LENGTHS)
def test_lengths(len_q, len_kv):
    check(*qkv(2, 2, 2, len_q, len_kv, 40))


@pytest.mark.parametrize("dim, dim_v", [(16, 16), (40, 40), (64, 64), (80, 80), (128, 128), (256, 256), (7, 7),
                                        (64, 24), (7, 33), (1, 1)])
@pytest.mark.parametrize("len_q", [2, 70])
def test_head_dims(dim, dim_v, len_q):
    check(*qkv(1, 2, 2, len_q, 97, dim, dim_v), scale=0.3)


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 7), (2, 0, 0, 5, 7), (1, 2, 2, 0, 7), (1, 2, 2, 3, 0), (1, 2, 2, 20, 0)])
def test_empty_sizes(shape):
    out, lse = check(*qkv(*shape, 16))
    assert out.shape == (shape[0], shape[1], shape[3], 16)


@pytest.mark.parametrize("heads_q, heads_kv", [(4, 2), (6, 1), (8, 8)])
@pytest.mark.parametrize("len_q", [1, 3, 100])
def test_grouped_query_heads(heads_q, heads_kv, len_q):
    check(*qkv(2, heads_q, heads_kv, len_q, 150, 32))


@pytest.mark.parametrize("mask_shape", ["LS", "11LS", "B11S", "BHLS"])
@pytest.mark.parametrize("kind", ["bool", "float32", "query"])
@pytest.mark.parametrize("len_q", [4, 77])
def test_masks(mask_shape, kind, len_q):
    batch, heads, len_kv = 2, 3, 140
    shape = {"LS": (len_q, len_kv), "11LS": (1, 1, len_q, len_kv), "B11S": (batch, 1, 1, len_kv),
             "BHLS": (batch, heads, len_q, len_kv)}[mask_shape]
    dtype = torch.float64 if kind == "query" else torch.float32
    if kind == "bool":
        mask = torch.rand(shape) < 0.7
    else:
        mask = torch.randn(shape, dtype=torch.float32 if kind == "float32" else dtype)
        mask = mask.masked_fill(torch.rand(shape) < 0.2, -math.inf)
    check(*qkv(batch, heads, heads, len_q, len_kv, 24, dtype=dtype), mask=mask)


@pytest.mark.parametrize("len_q, len_kv", [(100, 300), (300, 100), (130, 130), (3, 200), (7, 5)])
@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("window", [(-1, 0), (3, 2), (0, -1), (70, 0), (-1, 5), (0, 0)])
def test_bands(len_q, len_kv, bottom_right, window):
    check(*qkv(2, 2, 1, len_q, len_kv, 32), window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("len_q", [1, 4, 90])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_kv_lens(len_q, bottom_right):
    kv_lens = torch.tensor([0, 1, 77, 200, 130], dtype=torch.int32)
    check(*qkv(5, 4, 2, len_q, 200, 48), kv_lens=kv_lens, window=(-1, 0), bottom_right=bottom_right)
    check(*qkv(5, 4, 2, len_q, 200, 48), kv_lens=kv_lens, mask=torch.rand(5, 1, 1, 200) < 0.5)


@pytest.mark.parametrize("len_q", [3, 80])
def test_fully_masked_rows_give_zeros(len_q):
    q, k, v = qkv(2, 2, 2, len_q, 100, 16)
    mask = torch.rand(2, 2, len_q, 100) < 0.5
    mask[0, 1, 1] = False
    mask[1, :, -1] = False
    out, lse = check(q, k, v, mask=mask)
    assert torch.all(out[0, 1, 1] == 0) and lse[0, 1, 1] == 0
    assert torch.all(out[1, :, -1] == 0) and torch.all(lse[1, :, -1] == 0)
    bias = torch.zeros(2, 2, len_q, 100).masked_fill(~mask, -math.inf)
    assert torch.equal(kernel(q, k, v, mask=bias)[0], out)


@pytest.mark.parametrize("len_q", [2, 70])
def test_strided_inputs(len_q):
    # (B, L, H, E) tensors seen as (B, H, L, E), and a value tensor sliced out of a wider one.
    q = torch.randn(2, len_q, 4, 40).transpose(1, 2)
    k = torch.randn(2, 150, 2, 40).transpose(1, 2)
    v = torch.randn(2, 2, 150, 50)[..., 3:43]
    check(q, k, v)


@pytest.mark.parametrize("len_q", [1, 5, 99])
def test_float64(len_q):
    q, k, v = qkv(2, 4, 2, len_q, 170, 36, 20, dtype=torch.float64)
    check(q, k, v, mask=torch.randn(len_q, 170, dtype=torch.float64), window=(50, 0), bottom_right=True)


@pytest.mark.parametrize("len_q", [1, 6, 130])
@pytest.mark.parametrize("mask_kind", [None, "bool", "bfloat16"])
def test_bfloat16_within_twice_torch_error(len_q, mask_kind):
    q, k, v = qkv(2, 4, 4, len_q, 300, 64, dtype=torch.bfloat16)
    keep = torch.rand(len_q, 300) < 0.8
    bias = (torch.randn(len_q, 300) * keep).bfloat16().masked_fill(~keep, -math.inf)
    mask = {None: None, "bool": keep, "bfloat16": bias}[mask_kind]
    out, lse = kernel(q, k, v, mask=mask)
    ref_out, ref_lse = reference(q, k, v, mask=mask)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    bound = 2 * relative_error(torch_out, ref_out)
    if amx_prefill(len_q):
        # Weights rounded to bfloat16 before P V: at least a unit in the last place of 1, as
        # test_attention.py allows kernels that do so.
        bound = max(bound, 2.0**-7)
    assert relative_error(out, ref_out) <= bound
    assert relative_error(lse, ref_lse) <= 1e-5  # float32 from bfloat16 inputs: no rounding of its own
    if not amx_prefill(len_q):
        # The bfloat16 kernel is the float32 one on the widened inputs, rounded once to nearest even.
        mask32 = bias.float() if mask_kind == "bfloat16" else mask
        out32, lse32 = kernel(q.float(), k.float(), v.float(), mask=mask32)
        assert torch.equal(out, out32.bfloat16())
        assert torch.equal(lse, lse32)


def amx_prefill(len_q):
    """Whether bfloat16 attention with len_q queries runs on the AMX tiles here (prefill only),
    where the weights are rounded to bfloat16 before P V."""
    return _C.cpu_isa() == "amx" and len_q > 4


def check_bfloat16(q, k, v, **kwargs):
    """bfloat16 out within twice the rounding of the exact result to bfloat16, or a unit in the
    last place of 1 (test_attention.py's floor for kernels that round the weights); lse within
    1e-5."""
    out, lse = kernel(q, k, v, **kwargs)
    ref_out, ref_lse = reference(q, k, v, **kwargs)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref_out) <= max(2 * relative_error(ref_out.bfloat16(), ref_out), 2.0**-7)
    assert relative_error(lse, ref_lse) <= 1e-5


def check_bfloat16_gradients(q, k, v, **kwargs):
    """Gradients of bfloat16 attention (through the public op) against the float64 reference:
    within twice PyTorch's own bfloat16 error where PyTorch takes the arguments, or eight units
    of 2^-8 of the largest gradient, test_attention_backward.py's bound for kernels that round
    the score gradients to 16 bits (the AMX backward reaches ~4 with head dim 7)."""
    import genkernels
    from genkernels import reference as ops

    dout = torch.randn(q.shape[:-1] + v.shape[-1:])
    kwargs = dict(kwargs, enable_gqa=q.shape[1] != k.shape[1])
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(ops.scaled_dot_product_attention(*exact_in, **kwargs)[0], exact_in, dout.double())
    inputs = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    ours = torch.autograd.grad(genkernels.scaled_dot_product_attention(*inputs, **kwargs), inputs, dout.bfloat16())
    bounds = [8 * 2.0**-8] * 3
    if not {"window", "causal_alignment"} & kwargs.keys():
        inputs = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        theirs = torch.autograd.grad(F.scaled_dot_product_attention(*inputs, **kwargs), inputs, dout.bfloat16())
        bounds = [max(bound, 2 * relative_error(t, e)) for bound, t, e in zip(bounds, theirs, exact)]
    for name, g, e, bound in zip("qkv", ours, exact, bounds):
        assert g.dtype == torch.bfloat16 and relative_error(g, e) <= bound, name


AMX_CASES = {
    "lengths": ((2, 2, 2, 65, 300, 64), {}),
    "short": ((1, 2, 2, 5, 1, 64), {}),
    "odd dims": ((1, 2, 2, 33, 97, 7, 33), {}),
    "dim 1": ((1, 1, 1, 40, 17, 1), {}),
    "dim 256": ((1, 1, 1, 40, 130, 256), {}),
    "dims 64, 24": ((1, 2, 2, 70, 64, 64, 24), {}),
    "groups": ((2, 6, 1, 100, 150, 32), {}),
    "causal bottom-right": ((2, 2, 2, 70, 133, 40), dict(window=(-1, 0), bottom_right=True)),
    "window": ((1, 2, 2, 200, 300, 64), dict(window=(20, 5))),
    "key counts": ((2, 2, 2, 64, 90, 64), dict(kv_lens=torch.tensor([50, 0], dtype=torch.int32))),
    "large scores": ((1, 2, 2, 70, 300, 64), dict(scale=1.0)),  # maxima that grow from tile to tile
}


@needs_amx
@pytest.mark.parametrize("case", list(AMX_CASES))
def test_bfloat16_on_amx_tiles(case):
    shape, kwargs = AMX_CASES[case]
    check_bfloat16(*qkv(*shape, dtype=torch.bfloat16), **kwargs)


AMX_GRADIENT_CASES = {
    "lengths": ((2, 2, 2, 65, 130, 64), {}),
    "odd dims": ((1, 2, 2, 33, 97, 7, 33), {}),
    "dim 256": ((1, 1, 1, 40, 70, 256), {}),
    "groups, causal": ((2, 6, 2, 100, 100, 32), dict(is_causal=True)),
    "bottom-right": ((1, 2, 2, 30, 100, 48), dict(is_causal=True, causal_alignment="bottom_right")),
    "window": ((1, 2, 2, 150, 150, 64, 40), dict(window=(20, 5))),
    "bool mask": ((1, 2, 2, 70, 90, 64), dict(attn_mask=torch.rand(70, 90) < 0.7)),
}


@needs_amx
@pytest.mark.parametrize("case", list(AMX_GRADIENT_CASES))
def test_bfloat16_gradients_on_amx_tiles(case):
    shape, kwargs = AMX_GRADIENT_CASES[case]
    check_bfloat16_gradients(*qkv(*shape), **kwargs)


@needs_amx
@pytest.mark.parametrize("kind", ["bool", "float32", "bfloat16"])
def test_bfloat16_masks_and_strides_on_amx_tiles(kind):
    """Broadcast masks of every kind (with fully masked rows), and queries, keys and values read
    through strides, as a (B, L, H, E) layout transposed gives them."""
    batch, heads, len_q, len_kv = 2, 3, 70, 140
    q, k, v = (x.transpose(1, 2) for x in (torch.randn(batch, n, heads, 48, dtype=torch.bfloat16) for n in (len_q, len_kv, len_kv)))
    keep = torch.rand(batch, 1, len_q, len_kv) < 0.7
    keep[:, :, 5] = False
    mask = keep if kind == "bool" else (torch.randn(keep.shape) * 3).masked_fill(~keep, -math.inf).to(getattr(torch, kind))
    check_bfloat16(q, k, v, mask=mask)


# float32 prefill with 256 keys and 128 queries or more runs on the AMX tiles in three bfloat16
# parts: the same features as AMX_CASES at that size, held to the float32 tolerance.
AMX_FLOAT32_CASES = {
    "lengths": ((2, 2, 2, 165, 300, 64), {}),
    "one row past": ((1, 2, 2, 129, 256, 64), {}),
    "odd dims": ((1, 2, 2, 133, 297, 7, 33), {}),
    "dim 1": ((1, 1, 1, 140, 257, 1), {}),
    "dim 256": ((1, 1, 1, 128, 300, 256), {}),
    "dims 64, 24": ((1, 2, 2, 170, 264, 64, 24), {}),
    "groups": ((2, 6, 1, 130, 350, 32), {}),
    "causal": ((1, 2, 2, 300, 300, 64), dict(window=(-1, 0))),
    "causal bottom-right": ((2, 2, 2, 170, 333, 40), dict(window=(-1, 0), bottom_right=True)),
    "window": ((1, 2, 2, 200, 300, 64), dict(window=(20, 5))),
    "key counts": ((2, 2, 2, 164, 290, 64), dict(kv_lens=torch.tensor([250, 0], dtype=torch.int32))),
    "large scores": ((1, 2, 2, 170, 300, 64), dict(scale=1.0)),
    "bool mask": ((2, 3, 3, 140, 260, 48), dict(mask=torch.rand(2, 1, 140, 260) < 0.7)),
    "float mask": ((2, 3, 3, 140, 260, 48),
                   dict(mask=torch.randn(140, 260).masked_fill(torch.rand(140, 260) < 0.3, -math.inf))),
    # Keys and values of over a megabyte packed: query tiles go in groups of eight.
    "long, causal": ((1, 2, 2, 300, 1500, 64), dict(window=(-1, 0), bottom_right=True)),
    "long, window": ((1, 1, 1, 330, 1400, 80), dict(window=(300, 40))),
}


@needs_amx
@pytest.mark.parametrize("case", list(AMX_FLOAT32_CASES))
def test_float32_on_amx_tiles(case):
    shape, kwargs = AMX_FLOAT32_CASES[case]
    check(*qkv(*shape), **kwargs)


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("len_q", [20, 160])
def test_maxima_moving_in_every_key_tile_on_amx_tiles(dtype, len_q):
    # Scores that grow by ~8 from one tile of 64 keys to the next, so that every tile moves the
    # running maximum and rescales the output, also for a query tile alone in its group (20
    # queries; the fifth tile of 160). float32 runs a tile's softmax beside the products of the
    # tile before; for a query tile alone, those products add to the output it rescales.
    positions = torch.arange(400, dtype=torch.float32)[:, None]
    q = (torch.rand(1, 2, len_q, 64) + 0.5).to(dtype)
    k = (torch.rand(1, 2, 400, 64) * positions / 32).to(dtype)
    v = torch.randn(1, 2, 400, 64, dtype=dtype)
    if dtype == torch.float32:
        check(q, k, v)
    else:
        check_bfloat16(q, k, v)


def check_float32_gradients(q, k, v, mask=None, **kwargs):
    """Gradients of float32 attention (through the public op, a float mask's included) within
    1e-4 of the largest float64 gradient."""
    import genkernels
    from genkernels import reference as ops

    dout = torch.randn(q.shape[:-1] + v.shape[-1:])
    kwargs = dict(kwargs, enable_gqa=q.shape[1] != k.shape[1])
    tensors = (q, k, v) if mask is None or mask.dtype == torch.bool else (q, k, v, mask)
    exact_in = [t.double().requires_grad_() for t in tensors]
    exact_mask = exact_in[3] if len(tensors) == 4 else mask
    exact_out = ops.scaled_dot_product_attention(*exact_in[:3], attn_mask=exact_mask, **kwargs)[0]
    exact = torch.autograd.grad(exact_out, exact_in, dout.double())
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = genkernels.scaled_dot_product_attention(*inputs[:3], attn_mask=inputs[3] if len(tensors) == 4 else mask,
                                                  **kwargs)
    ours = torch.autograd.grad(out, inputs, dout)
    for name, g, e in zip(["q", "k", "v", "mask"], ours, exact):
        assert g.dtype == torch.float32 and relative_error(g, e) <= 1e-4, name


# The float32 backward on the tiles (256 keys and 128 queries or more), as AMX_GRADIENT_CASES for
# bfloat16.
AMX_FLOAT32_GRADIENT_CASES = {
    "lengths": ((2, 2, 2, 165, 300, 64), {}),
    "odd dims": ((1, 2, 2, 133, 297, 7, 33), {}),
    "dim 256": ((1, 1, 1, 140, 270, 256), {}),
    "groups, causal": ((2, 6, 2, 300, 300, 32), dict(is_causal=True)),
    "bottom-right": ((1, 2, 2, 130, 300, 48), dict(is_causal=True, causal_alignment="bottom_right")),
    "window": ((1, 2, 2, 300, 300, 64, 40), dict(window=(20, 5))),
    "bool mask": ((1, 2, 2, 170, 290, 64), dict(mask=torch.rand(170, 290) < 0.7)),
    "float mask": ((1, 2, 2, 170, 290, 64), dict(mask=torch.randn(2, 170, 290))),
}


@needs_amx
@pytest.mark.parametrize("case", list(AMX_FLOAT32_GRADIENT_CASES))
def test_float32_gradients_on_amx_tiles(case):
    shape, kwargs = AMX_FLOAT32_GRADIENT_CASES[case]
    check_float32_gradients(*qkv(*shape), **kwargs)


@needs_amx
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradients_split_over_keys_on_amx_tiles(dtype):
    """One key/value head and more threads than heads: the key tiles are dealt to several tasks
    and their dQ parts summed."""
    check = check_bfloat16_gradients if dtype == "bfloat16" else check_float32_gradients
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        check(*qkv(1, 3, 1, 190, 600, 64), is_causal=True)
    finally:
        torch.set_num_threads(threads)


@needs_amx
def test_float32_on_amx_tiles_matches_avx512():
    """Both float32 prefill kernels of an AMX machine agree to float32 rounding, strided inputs
    included."""
    q, k, v = (x.transpose(1, 2) for x in (torch.randn(2, n, 3, 40) for n in (190, 400, 400)))
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_attention_cpu_kernel as t; "
        "q, k, v = torch.load(sys.argv[2]); out, lse = t.kernel(q, k, v, window=(-1, 0), bottom_right=True); "
        "torch.save((out, lse), sys.argv[2])"
    )
    results = []
    for isa in ("amx", "avx512"):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "qkv.pt")
            torch.save((q, k, v), path)
            env = dict(os.environ, GENKERNELS_CPU_ISA=isa)
            run = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), path], env=env,
                                 capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            results.append(torch.load(path))
    (out_amx, lse_amx), (out_avx, lse_avx) = results
    assert relative_error(out_amx, out_avx.double()) <= 1e-6
    assert relative_error(lse_amx, lse_avx.double()) <= 1e-6


@pytest.mark.parametrize("len_q", [1, 2, 4])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_decode_long_keys(len_q, threads):
    # Few heads and many keys: the decode path splits the keys across tasks and merges them.
    q, k, v = qkv(1, 4, 2, len_q, 5000, 64)
    kv_lens = torch.tensor([3333], dtype=torch.int32)
    out, lse = kernel(q, k, v, kv_lens=kv_lens, threads=threads)
    ref_out, ref_lse = reference(q, k, v, kv_lens=kv_lens)
    assert relative_error(out, ref_out) <= 1e-5 and relative_error(lse, ref_lse) <= 1e-6
    check(q, k, v, window=(1000, 0), bottom_right=True, threads=threads)


def test_results_do_not_depend_on_thread_count():
    q, k, v = qkv(2, 3, 3, 200, 300, 64)
    out1, lse1 = kernel(q, k, v, window=(-1, 0), threads=1)
    out2, lse2 = kernel(q, k, v, window=(-1, 0), threads=3)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


@pytest.mark.parametrize("len_q, len_kv", [(3, 90), (40, 90), (3, 300), (140, 300)])
def test_large_scores_do_not_overflow(len_q, len_kv):
    # Scores in the thousands: exp overflows unless the running maximum is subtracted first.
    # Rounding such scores to float32 perturbs the weights by about max|score| ulps.
    q, k, v = qkv(1, 2, 2, len_q, len_kv, 32)
    q, k, mask = q * 30, k * 30, torch.randn(len_q, len_kv) * 1000
    out, lse = kernel(q, k, v, mask=mask)
    ref_out, ref_lse = reference(q, k, v, mask=mask)
    max_score = (q.double() @ k.double().transpose(-1, -2) / 32**0.5 + mask).abs().max().item()
    assert torch.all(torch.isfinite(out))
    assert relative_error(out, ref_out) <= 16 * 2.0**-24 * max_score
    assert relative_error(lse, ref_lse) <= 1e-6


def test_every_instruction_set():
    """The baseline, AVX2 and AVX-512 builds (and AVX-512 with AMX tiles) each pass prefill cases
    (float32 with few and many keys, float64), a decode case, and bfloat16 forward and backward
    cases."""
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_attention_cpu_kernel as t; "
        "from genkernels import _C; print(_C.cpu_isa()); "
        "torch.manual_seed(0); "
        "t.check(*t.qkv(2, 4, 2, 70, 133, 40, 24), mask=torch.rand(70, 133) < 0.8, window=(-1, 0), bottom_right=True); "
        "t.check(*t.qkv(1, 4, 2, 3, 1500, 72), kv_lens=torch.tensor([1200], dtype=torch.int32)); "
        "t.check(*t.qkv(1, 2, 2, 65, 80, 19, dtype=torch.float64)); "
        "t.check(*t.qkv(1, 2, 2, 140, 300, 40), window=(-1, 0)); "
        "t.check_bfloat16(*t.qkv(2, 4, 2, 70, 133, 40, dtype=torch.bfloat16), window=(-1, 0)); "
        "t.check_bfloat16_gradients(*t.qkv(1, 4, 2, 70, 133, 40, 24), is_causal=True)"
    )
    seen = set()
    for isa in ("baseline", "avx2", "avx512", "amx"):
        env = dict(os.environ, GENKERNELS_CPU_ISA=isa)
        run = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env, capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr
        seen.add(run.stdout.split()[0])
    assert "baseline" in seen
