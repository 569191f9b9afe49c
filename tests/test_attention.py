"""genkernels.scaled_dot_product_attention, merge_attention and attention_with_kvcache against
PyTorch's math backend in float64 and the definition in genkernels.reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import genkernels
from genkernels import reference


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale


def low_precision_bound(q, k, v, dtype, **kwargs) -> float:
    """Twice PyTorch's own error in `dtype` against float64, relative to the largest output."""
    mask = kwargs.pop("attn_mask", None)
    float_mask = mask is not None and mask.dtype != torch.bool
    exact = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask.double() if float_mask else mask, **kwargs
    )
    theirs = F.scaled_dot_product_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask.to(dtype) if float_mask else mask, **kwargs
    )
    # PyTorch's CPU path rounds once, at the end; tensor-core kernels also round the softmax
    # weights to 16 bits before P V, as flash attention does. That error scales with the values,
    # not with the (smaller) averaged output: allow at least one unit in the last place of 1 in
    # bfloat16 and two in float16 (1.3 units of 1 seen with random inputs).
    return max(2 * rel_error(theirs, exact), {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}[dtype])


def check(backend, q, k, v, dtypes=None, **kwargs) -> None:
    """Compares with PyTorch's sdpa in float64 for each dtype the backend runs."""
    oracle = dict(kwargs)
    if oracle.get("attn_mask") is not None and oracle["attn_mask"].dtype != torch.bool:
        oracle["attn_mask"] = oracle["attn_mask"].double()  # a float32 mask with float64 inputs is mishandled
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **oracle)
    for dtype in dtypes or backend.float_dtypes():
        args = [t.to(backend.device, dtype) for t in (q, k, v)]
        mask = kwargs.get("attn_mask")
        call = dict(kwargs)
        if mask is not None and mask.dtype != torch.bool:
            call["attn_mask"] = mask.to(backend.device, dtype)
        out = genkernels.scaled_dot_product_attention(*args, **call)
        assert out.dtype == dtype and out.shape == exact.shape
        if dtype in (torch.float32, torch.float64):
            assert rel_error(out.cpu(), exact) <= (1e-5 if dtype == torch.float32 else 1e-12), dtype
        else:
            assert rel_error(out.cpu(), exact) <= low_precision_bound(q, k, v, dtype, **kwargs), dtype


SHAPES = [(1, 1), (3, 5), (17, 17), (64, 33), (65, 130), (130, 64)]


@pytest.mark.parametrize("len_q, len_kv", SHAPES)
@pytest.mark.parametrize("dim", [16, 40, 64, 7])
def test_matches_pytorch(backend, len_q, len_kv, dim):
    q, k, v = torch.randn(2, 3, len_q, dim), torch.randn(2, 3, len_kv, dim), torch.randn(2, 3, len_kv, dim)
    check(backend, q, k, v)
    check(backend, q, k, v, is_causal=True)


def test_cpu_bfloat16():
    """The CPU kernel takes bfloat16 too, accumulating in float32."""
    q, k, v = torch.randn(2, 3, 37, 64), torch.randn(2, 3, 50, 64), torch.randn(2, 3, 50, 64)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    out = genkernels.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, exact) <= low_precision_bound(q, k, v, torch.bfloat16, is_causal=True)
    cache = torch.zeros(2, 3, 60, 64, dtype=torch.bfloat16)
    out = genkernels.attention_with_kvcache(
        q[:, :, :1].bfloat16(), cache, cache.clone(), torch.tensor([0, 3]), key=k[:, :, :1].bfloat16(), value=v[:, :, :1].bfloat16()
    )
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 1, 64)


@pytest.mark.parametrize("dim, dim_v", [(80, 80), (128, 128), (256, 256), (64, 24), (24, 64)])
def test_head_dims(backend, dim, dim_v):
    q, k, v = torch.randn(1, 2, 33, dim), torch.randn(1, 2, 47, dim), torch.randn(1, 2, 47, dim_v)
    check(backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("lead", [(), (0,), (2,), (2, 3), (1, 2, 2)])
def test_leading_dimensions(backend, lead):
    q, k, v = torch.randn(*lead, 4, 9, 16), torch.randn(*lead, 4, 11, 16), torch.randn(*lead, 4, 11, 16)
    check(backend, q, k, v, dtypes=[torch.float32])


@pytest.mark.parametrize("mask_shape", [(13, 21), (1, 1, 13, 21), (2, 1, 1, 21), (2, 4, 13, 21), (4, 1, 21)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(backend, mask_shape, kind):
    q, k, v = torch.randn(2, 4, 13, 32), torch.randn(2, 4, 21, 32), torch.randn(2, 4, 21, 32)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
    else:
        mask = torch.randn(mask_shape).masked_fill(torch.rand(mask_shape) < 0.2, float("-inf"))
    check(backend, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dim, dim_v", [(0, 8), (8, 0)])
def test_empty_feature_dimensions(backend, dim, dim_v):
    q, k, v = torch.randn(1, 2, 3, dim), torch.randn(1, 2, 4, dim), torch.randn(1, 2, 4, dim_v)
    out = genkernels.scaled_dot_product_attention(q.to(backend.device), k.to(backend.device), v.to(backend.device))
    torch.testing.assert_close(out.cpu(), F.scaled_dot_product_attention(q, k, v, scale=1.0))


def test_fully_masked_rows_give_zero(backend):
    q, k, v = (torch.randn(1, 2, 6, 16, device=backend.device) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool, device=backend.device)
    mask[2] = False
    out, lse = genkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.all(out[:, :, 2] == 0) and torch.all(lse[:, :, 2] == 0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads_q, heads_kv", [(4, 2), (6, 1), (8, 8)])
def test_grouped_query_attention(backend, heads_q, heads_kv):
    q, k, v = torch.randn(2, heads_q, 19, 32), torch.randn(2, heads_kv, 23, 32), torch.randn(2, heads_kv, 23, 32)
    check(backend, q, k, v, enable_gqa=True, is_causal=True)


def test_non_contiguous_inputs(backend):
    # (B, L, H, E) layouts transposed to (B, H, L, E), as attention blocks produce them.
    q = torch.randn(2, 15, 3, 32).transpose(1, 2)
    k = torch.randn(2, 20, 3, 32).transpose(1, 2)
    v = torch.randn(2, 20, 3, 48)[..., ::2].transpose(1, 2)
    assert not q.is_contiguous() and not v.is_contiguous()
    check(backend, q, k, v, dtypes=[torch.float32])


@pytest.mark.parametrize("len_q, len_kv", [(5, 12), (12, 5), (9, 9)])
@pytest.mark.parametrize("window", [None, (3, 2), (-1, 0), (0, -1), (4, None)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("causal", [False, True])
def test_windows_and_alignment(backend, len_q, len_kv, window, alignment, causal):
    q, k, v = (torch.randn(2, 2, n, 16, dtype=torch.float64) for n in (len_q, len_kv, len_kv))
    expected, expected_lse = reference.scaled_dot_product_attention(
        q, k, v, is_causal=causal, causal_alignment=alignment, window=window
    )
    out, lse = genkernels.scaled_dot_product_attention(
        q.float().to(backend.device), k.float().to(backend.device), v.float().to(backend.device),
        is_causal=causal, causal_alignment=alignment, window=window, return_lse=True,
    )
    assert rel_error(out.cpu(), expected) <= 1e-5
    torch.testing.assert_close(lse.cpu().double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_bottom_right_matches_torch_causal_lower_right(backend):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 11))
    out = genkernels.scaled_dot_product_attention(
        q.to(backend.device), k.to(backend.device), v.to(backend.device), is_causal=True, causal_alignment="bottom_right"
    )
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_lse_matches_logsumexp(backend):
    q, k, v = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 14, 16), torch.randn(2, 3, 14, 16)
    _, lse = genkernels.scaled_dot_product_attention(*(t.to(backend.device) for t in (q, k, v)), scale=0.3, return_lse=True)
    expected = torch.logsumexp(0.3 * q.double() @ k.double().transpose(-1, -2), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 10)
    torch.testing.assert_close(lse.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shards", [2, 3])
def test_merge_attention_of_shards_equals_whole(backend, shards):
    q, k, v = (torch.randn(2, 3, n, 16, device=backend.device) for n in (7, 30, 30))
    mask = torch.rand(7, 30, device=backend.device) > 0.5
    mask[:, :10] = False  # rows of the first shard with no key at all
    whole, whole_lse = genkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    parts = [genkernels.scaled_dot_product_attention(q, kp, vp, attn_mask=mp, return_lse=True)
             for kp, vp, mp in zip(k.chunk(shards, 2), v.chunk(shards, 2), mask.chunk(shards, 1))]
    merged, merged_lse = genkernels.merge_attention([o for o, _ in parts], [l for _, l in parts])
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, whole_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads_q, heads_kv", [(4, 4), (4, 2)])
def test_kvcache_generation_equals_full_attention(backend, heads_q, heads_kv):
    """A ragged batch decoded token by token through the cache equals attention recomputed."""
    batch, capacity, dim, steps = 3, 24, 16, 5
    prompt_lens = torch.tensor([4, 9, 1])
    total = int(prompt_lens.max()) + steps
    keys = torch.randn(batch, heads_kv, total, dim, device=backend.device)
    values = torch.randn(batch, heads_kv, total, dim, device=backend.device)
    queries = torch.randn(batch, heads_q, total, dim, device=backend.device)
    k_cache = torch.zeros(batch, heads_kv, capacity, dim, device=backend.device)
    v_cache = torch.zeros_like(k_cache)
    for b in range(batch):
        n = int(prompt_lens[b])
        k_cache[b, :, :n], v_cache[b, :, :n] = keys[b, :, :n], values[b, :, :n]
    lengths = prompt_lens.to(backend.device, torch.int32)
    for step in range(steps):
        pos = lengths.long()
        idx = torch.arange(batch, device=backend.device)
        q_new = queries[idx, :, pos].unsqueeze(2)  # (B, Hq, 1, E)
        k_new, v_new = keys[idx, :, pos].unsqueeze(2), values[idx, :, pos].unsqueeze(2)
        out = genkernels.attention_with_kvcache(q_new, k_cache, v_cache, lengths, key=k_new, value=v_new)
        for b in range(batch):
            n = int(pos[b]) + 1
            expected = F.scaled_dot_product_attention(
                q_new[b:b + 1], keys[b:b + 1, :, :n], values[b:b + 1, :, :n], enable_gqa=heads_q != heads_kv
            )
            torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-5, atol=1e-5)
        lengths = lengths + 1
    for b in range(batch):
        n = int(lengths[b])
        torch.testing.assert_close(k_cache[b, :, :n], keys[b, :, :n])


def test_kvcache_prefill_chunk_is_causal_bottom_right(backend):
    q, k, v = (torch.randn(2, 2, n, 16, device=backend.device) for n in (4, 4, 4))
    k_cache = torch.randn(2, 2, 12, 16, device=backend.device)
    v_cache = torch.randn(2, 2, 12, 16, device=backend.device)
    lengths = torch.tensor([3, 6], dtype=torch.int32, device=backend.device)
    out = genkernels.attention_with_kvcache(q, k_cache, v_cache, lengths, key=k, value=v)
    for b, n in enumerate((3, 6)):
        keys, values = k_cache[b:b + 1, :, : n + 4], v_cache[b:b + 1, :, : n + 4]
        expected, _ = reference.scaled_dot_product_attention(q[b:b + 1], keys, values, is_causal=True, causal_alignment="bottom_right")
        torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_layout", ["bhse", "bshe"])
def test_kvcache_takes_int64_lengths_strided_and_other_dtype_keys(backend, cache_layout):
    """int64 lengths, key/value that are non-contiguous views or float64, and caches stored
    position-major (B, S, H, E) viewed as (B, H, S, E) give the same step."""
    batch, heads, capacity, dim = 2, 3, 10, 8
    if cache_layout == "bhse":
        k_cache, v_cache = (torch.randn(batch, heads, capacity, dim, device=backend.device) for _ in range(2))
    else:
        k_cache, v_cache = (torch.randn(batch, capacity, heads, dim, device=backend.device).transpose(1, 2) for _ in range(2))
    q = torch.randn(batch, heads, 2, dim, device=backend.device)
    new_kv = torch.randn(batch, 2, heads, 2 * dim, device=backend.device, dtype=torch.float64)
    key, value = new_kv[..., ::2].transpose(1, 2), new_kv[..., 1::2].transpose(1, 2)  # strided, float64
    lengths = torch.tensor([4, 7], device=backend.device)  # int64
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate((4, 7)):
        expected_k[b, :, n : n + 2], expected_v[b, :, n : n + 2] = key[b].float(), value[b].float()
    out = genkernels.attention_with_kvcache(q, k_cache, v_cache, lengths, key=key, value=value)
    torch.testing.assert_close(k_cache, expected_k)
    torch.testing.assert_close(v_cache, expected_v)
    for b, n in enumerate((6, 9)):
        expected, _ = reference.scaled_dot_product_attention(
            q[b : b + 1], expected_k[b : b + 1, :, :n], expected_v[b : b + 1, :, :n], is_causal=True, causal_alignment="bottom_right"
        )
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-5, atol=1e-5)


def test_kvcache_writes_nothing_when_a_length_does_not_fit(backend):
    """The second sequence overflows: the error comes before the first one's keys are written."""
    k_cache, v_cache = (torch.randn(2, 2, 6, 8, device=backend.device) for _ in range(2))
    before = k_cache.clone(), v_cache.clone()
    new = torch.randn(2, 2, 1, 8, device=backend.device)
    with pytest.raises(ValueError, match=r"cache_seqlens.*\[0, 6\]"):
        genkernels.attention_with_kvcache(new, k_cache, v_cache, torch.tensor([2, 6], device=backend.device), key=new, value=new)
    torch.testing.assert_close((k_cache, v_cache), before, rtol=0, atol=0)


def test_kvcache_step_bumps_the_caches_versions():
    """Autograd sees the in-place write, as with any mutating op."""
    k_cache, v_cache = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)
    versions = k_cache._version, v_cache._version
    new = torch.randn(1, 1, 1, 8)
    genkernels.attention_with_kvcache(new, k_cache, v_cache, torch.tensor([0]), key=new, value=new)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q.double()), TypeError, ["value", "float64"]),
        (lambda q: genkernels.scaled_dot_product_attention(q.long(), q, q), TypeError, ["query", "int64"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q[..., :8], q), ValueError, ["key", "feature size"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q[:, :1], q[:, :1]), ValueError, ["enable_gqa"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q[:, :3], q[:, :3], enable_gqa=True), ValueError, ["multiple"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True), ValueError, ["is_causal"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 5)), ValueError, ["attn_mask", "broadcast"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int32)), TypeError, ["attn_mask", "int32"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, dropout_p=1.5), ValueError, ["dropout_p", "[0, 1]", "1.5"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, dropout_p="0.1"), TypeError, ["dropout_p", "real"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, dropout_p=0.1, generator=1), TypeError, ["generator"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, causal_alignment="middle"), ValueError, ["causal_alignment", "middle"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, window=(1, 2, 3)), TypeError, ["window"]),
        (lambda q: genkernels.scaled_dot_product_attention(q, q, q, window=(-5, 1)), ValueError, ["window[0]", ">= -1"]),
        (lambda q: genkernels.attention_with_kvcache(q, q, q, torch.tensor([1.0, 2.0])), ValueError, ["cache_seqlens"]),
        (lambda q: genkernels.attention_with_kvcache(q[:, :, :1], q, q, torch.tensor([5, 2]), key=q[:, :, :1], value=q[:, :, :1]), ValueError, ["cache_seqlens", "[0, 5]"]),
        (lambda q: genkernels.merge_attention([q], []), ValueError, ["outputs", "lses"]),
    ],
)
def test_bad_arguments(call, error, words):
    q = torch.randn(2, 4, 5, 16)
    with pytest.raises(error) as info:
        call(q)
    for word in words:
        assert word in str(info.value)


def test_opcheck():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    mask = (torch.rand(1, 1, 9, 11) > 0.3).expand(2, 4, 9, 11)
    op = torch.ops.genkernels.attention_forward.default
    torch.library.opcheck(op, (q, k, v, None, None, 0.25, -1, 0, False, 0.0, None, False))
    torch.library.opcheck(op, (q, k, v, mask, None, 0.25, 3, 2, True, 0.0, None, False))
    torch.library.opcheck(op, (q, k, v, None, torch.tensor([5, 11], dtype=torch.int32), 0.25, -1, 0, True, 0.0, None, False))
    step = torch.ops.genkernels.attention_kvcache.default
    caches = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 8)
    new_k, new_v = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 8)
    torch.library.opcheck(step, (q[:, :, :3], *caches, torch.tensor([2, 9]), new_k, new_v, 0.25, True))
    torch.library.opcheck(step, (q, *caches, torch.tensor([3, 0], dtype=torch.int32), None, None, 0.25, False))


def test_compile_fullgraph():
    def block(x: torch.Tensor) -> torch.Tensor:
        return genkernels.scaled_dot_product_attention(x, 2 * x, x.flip(-1), is_causal=True)

    x = torch.randn(2, 4, 12, 16)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x))


def test_peak_memory_is_linear_in_sequence_length():
    """L = S = 16384: the score matrix alone would take 1 GiB per head in float32."""
    script = (
        "import resource, torch, genkernels;"
        "q = torch.randn(1, 1, 16384, 64); k = torch.randn_like(q); v = torch.randn_like(q);"
        "genkernels.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64]);"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "genkernels.scaled_dot_product_attention(q, k, v, is_causal=True);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    # The output (4 MiB) plus per-thread tiles; the naive method needs over 1 GiB.
    assert grown_kib < 64 * 1024, f"peak resident memory grew by {grown_kib} KiB"
