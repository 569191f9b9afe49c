"""Gradients of genkernels.scaled_dot_product_attention (query, key, value and an additive mask)
against PyTorch's math backend and torch.autograd.gradcheck, and attention dropout against the
reference computed with the same mask."""

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


def leaves(device, dtype, *tensors):
    return [t.detach().to(device, dtype).requires_grad_() for t in tensors]


def grads(fn, inputs, dout):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dout)


def torch_math_grads(q, k, v, dout, **kwargs):
    """Output and gradients of PyTorch's math backend in float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = kwargs.get("attn_mask")
    inputs = leaves("cpu", torch.float64, q, k, v)
    if mask is not None and mask.dtype != torch.bool:
        kwargs = dict(kwargs, attn_mask=mask.detach().double())
    with sdpa_kernel(SDPBackend.MATH):
        return grads(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), inputs, dout.double())


def ours(backend, dtype, q, k, v, dout, **kwargs):
    mask = kwargs.get("attn_mask")
    if mask is not None:
        kwargs = dict(kwargs, attn_mask=mask.to(backend.device, dtype if mask.dtype != torch.bool else torch.bool))
    inputs = leaves(backend.device, dtype, q, k, v)
    return grads(lambda *t: genkernels.scaled_dot_product_attention(*t, **kwargs), inputs, dout.to(backend.device, dtype))


def case(batch, heads_q, heads_kv, len_q, len_kv, dim, dim_v):
    return (torch.randn(batch, heads_q, len_q, dim), torch.randn(batch, heads_kv, len_kv, dim),
            torch.randn(batch, heads_kv, len_kv, dim_v), torch.randn(batch, heads_q, len_q, dim_v))


SWEEP = [(1, 1, 1, 1, 1, 8, 8), (2, 3, 3, 17, 23, 16, 16), (1, 2, 2, 65, 130, 64, 64), (2, 4, 2, 70, 33, 40, 24),
         (1, 6, 1, 129, 129, 7, 13), (1, 2, 2, 200, 90, 80, 80)]


@pytest.mark.parametrize("shape", SWEEP, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_float32_matches_pytorch_math(backend, shape, causal):
    q, k, v, dout = case(*shape)
    kwargs = dict(is_causal=causal, enable_gqa=shape[1] != shape[2])
    exact_out, exact = torch_math_grads(q, k, v, dout, **kwargs)
    out, got = ours(backend, torch.float32, q, k, v, dout, **kwargs)
    assert rel_error(out.cpu(), exact_out) <= 1e-5
    for name, g, e in zip("qkv", got, exact):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert rel_error(g.cpu(), e) <= 1e-4, name


@pytest.mark.parametrize("shape", SWEEP[1:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_gradients(backend, shape, causal):
    """bfloat16 (and float16 on the CUDA kernels) within twice PyTorch's own error in that
    dtype, or a few units in the last place of the largest gradient."""
    q, k, v, dout = case(*shape)
    kwargs = dict(is_causal=causal, enable_gqa=shape[1] != shape[2])
    _, exact = torch_math_grads(q, k, v, dout, **kwargs)
    dtypes = [torch.bfloat16] + ([torch.float16] if backend.cuda_kernels else [])
    for dtype in dtypes:
        theirs = grads(lambda *t: F.scaled_dot_product_attention(*t, **kwargs), leaves("cpu", dtype, q, k, v), dout.to(dtype))[1]
        _, got = ours(backend, dtype, q, k, v, dout, **kwargs)
        ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        for name, g, t, e in zip("qkv", got, theirs, exact):
            assert g.dtype == dtype
            assert rel_error(g.cpu(), e) <= max(2 * rel_error(t, e), 4 * ulp), (dtype, name)


# 16-bit cases across the features of the CUDA tensor-core backward (head dims up to 128; the
# CPU computes bfloat16 in float32): (shape, kwargs, mask kind).
LOW_PRECISION_FEATURES = {
    "window_gqa": ((1, 4, 2, 70, 90, 64, 64), dict(window=(20, 5), enable_gqa=True), None),
    "bottom_right_dims": ((2, 2, 2, 33, 75, 40, 24), dict(is_causal=True, causal_alignment="bottom_right"), None),
    "bool_mask": ((1, 2, 2, 66, 67, 80, 72), dict(), "bool"),
    "float_mask_grad": ((2, 2, 1, 20, 70, 32, 16), dict(enable_gqa=True), "float_grad"),
    "causal_128": ((1, 2, 2, 130, 130, 128, 128), dict(is_causal=True), None),
    "odd_dims": ((1, 3, 1, 17, 40, 7, 13), dict(enable_gqa=True), "float"),
}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", LOW_PRECISION_FEATURES)
def test_low_precision_features(backend, name, deterministic):
    """Windows, alignments, GQA, masks (and their gradient), head dims and lengths that cross
    tiles in bfloat16 and float16, through both CUDA backward paths: within a few units in the
    last place of the largest gradient of the float64 reference."""
    shape, kwargs, mask_kind = LOW_PRECISION_FEATURES[name]
    q, k, v, dout = case(*shape)
    batch, heads_q, _, len_q, len_kv = shape[:5]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, heads_q, len_q, len_kv) > 0.2
        mask[0, 0, 3] = False  # a fully masked row
    elif mask_kind is not None:
        mask = torch.randn(1, heads_q, len_q, len_kv)
    dtypes = [torch.bfloat16] + ([torch.float16] if backend.cuda_kernels else [])
    for dtype in dtypes:
        ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        tensors = [q, k, v] + ([mask] if mask_kind == "float_grad" else [])
        inputs, exact_inputs = leaves(backend.device, dtype, *tensors), leaves("cpu", torch.float64, *tensors)

        def run(inputs, device, mask_dtype):
            m = inputs[3] if mask_kind == "float_grad" else None
            if mask is not None and m is None:
                m = mask.to(device, torch.bool if mask.dtype == torch.bool else mask_dtype)
            return dict(attn_mask=m, **kwargs)

        out = genkernels.scaled_dot_product_attention(*inputs[:3], **run(inputs, backend.device, dtype),
                                                      deterministic=deterministic)
        got = torch.autograd.grad(out, inputs, dout.to(backend.device, dtype))
        exact_out, _ = reference.scaled_dot_product_attention(*exact_inputs[:3], **run(exact_inputs, "cpu", torch.float64))
        exact = torch.autograd.grad(exact_out, exact_inputs, dout.double())
        for g_name, g, e in zip(("dq", "dk", "dv", "dmask"), got, exact):
            assert g.dtype == dtype and rel_error(g.cpu(), e) <= 8 * ulp, (dtype, g_name)


def test_deterministic_mode(backend):
    """deterministic=True, and deterministic=None under torch.use_deterministic_algorithms, give
    the same gradients bit for bit on every call; the default (atomics on CUDA) agrees with them
    to rounding."""
    q, k, v, dout = case(1, 4, 2, 70, 90, 64, 64)
    kwargs = dict(is_causal=True, enable_gqa=True)
    for dtype in backend.float_dtypes():
        runs = [ours(backend, dtype, q, k, v, dout, deterministic=True, **kwargs)[1] for _ in range(2)]
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            runs.append(ours(backend, dtype, q, k, v, dout, **kwargs)[1])
        finally:
            torch.use_deterministic_algorithms(previous)
        default = ours(backend, dtype, q, k, v, dout, **kwargs)[1]
        ulp = {torch.float32: 1e-6, torch.float64: 1e-15, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        for name, first, *others, other in zip("qkv", *runs, default):
            assert all(torch.equal(first, x) for x in others), (dtype, name)
            assert rel_error(other.cpu(), first.cpu()) <= 2 * ulp, (dtype, name)
    with pytest.raises(TypeError, match="'deterministic' must be a bool or None"):
        genkernels.scaled_dot_product_attention(q, k, v, enable_gqa=True, deterministic=1)


@pytest.mark.parametrize("dim, dim_v", [(128, 128), (200, 160), (256, 32), (24, 256)])
def test_head_dims(backend, dim, dim_v):
    q, k, v, dout = case(1, 2, 1, 19, 33, dim, dim_v)
    _, exact = torch_math_grads(q, k, v, dout, is_causal=True, enable_gqa=True)
    _, got = ours(backend, torch.float32, q, k, v, dout, is_causal=True, enable_gqa=True)
    for name, g, e in zip("qkv", got, exact):
        assert rel_error(g.cpu(), e) <= 1e-4, name


GRADCHECK_CASES = {
    "plain": (dict(), (1, 2, 2, 5, 7, 4, 4)),
    "causal": (dict(is_causal=True), (1, 2, 2, 6, 6, 4, 3)),
    "bottom_right": (dict(is_causal=True, causal_alignment="bottom_right"), (1, 1, 1, 4, 9, 4, 4)),
    "window": (dict(window=(2, 1)), (2, 1, 1, 7, 8, 3, 3)),
    "gqa": (dict(enable_gqa=True, is_causal=True), (1, 4, 2, 5, 6, 4, 4)),
    "dim_v": (dict(), (1, 2, 2, 5, 5, 3, 6)),
}


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck(backend, name):
    kwargs, shape = GRADCHECK_CASES[name]
    q, k, v, _ = case(*shape)
    inputs = leaves(backend.device, torch.float64, q, k, v)
    assert torch.autograd.gradcheck(lambda *t: genkernels.scaled_dot_product_attention(*t, **kwargs), inputs)


@pytest.mark.parametrize("kind", ["bool", "float", "float_grad", "broadcast_float_grad"])
def test_gradcheck_masks(backend, kind):
    q, k, v, _ = case(2, 2, 2, 5, 6, 4, 4)
    inputs = leaves(backend.device, torch.float64, q, k, v)
    if kind == "bool":
        mask = (torch.rand(2, 2, 5, 6) > 0.3).to(backend.device)
        mask[0, 0, 1] = False  # a fully masked row
    else:
        shape = (1, 2, 1, 6) if kind == "broadcast_float_grad" else (2, 2, 5, 6)
        mask = torch.randn(shape, dtype=torch.float64, device=backend.device)
        if kind == "float":
            mask[..., 2] = float("-inf")
    if kind.endswith("grad"):
        inputs.append(mask.requires_grad_())
        fn = lambda q, k, v, m: genkernels.scaled_dot_product_attention(q, k, v, attn_mask=m)
    else:
        fn = lambda q, k, v: genkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradient_through_lse(backend):
    """lse is float32 for every input dtype, too coarse for gradcheck's finite differences: the
    gradient through it is compared with the reference's in float64 instead."""
    q, k, v, dout = case(1, 2, 2, 9, 13, 8, 8)
    dlse = torch.randn(1, 2, 9)
    inputs = leaves(backend.device, torch.float64, q, k, v)
    out, lse = genkernels.scaled_dot_product_attention(*inputs, is_causal=True, return_lse=True)
    got = torch.autograd.grad((out, lse), inputs, (dout.double().to(backend.device), dlse.to(backend.device)))
    exact_inputs = leaves("cpu", torch.float64, q, k, v)
    exact_out, exact_lse = reference.scaled_dot_product_attention(*exact_inputs, is_causal=True)
    exact = torch.autograd.grad((exact_out, exact_lse), exact_inputs, (dout.double(), dlse.double()))
    for g, e in zip(got, exact):
        assert rel_error(g.cpu(), e) <= 1e-6


def test_mask_gradient_matches_pytorch(backend):
    q, k, v, dout = case(2, 3, 3, 19, 27, 16, 16)
    mask = torch.randn(1, 3, 19, 27)
    inputs = leaves(backend.device, torch.float32, q, k, v, mask)
    out = genkernels.scaled_dot_product_attention(*inputs[:3], attn_mask=inputs[3])
    got = torch.autograd.grad(out, inputs, dout.to(backend.device))
    exact_inputs = leaves("cpu", torch.float64, q, k, v, mask)
    exact_out = F.scaled_dot_product_attention(*exact_inputs[:3], attn_mask=exact_inputs[3])
    exact = torch.autograd.grad(exact_out, exact_inputs, dout.double())
    for g, e in zip(got, exact):
        assert g.shape == e.shape and rel_error(g.cpu(), e) <= 1e-4


def test_fully_masked_rows_give_zero_gradients(backend):
    q, k, v, dout = case(1, 2, 2, 6, 9, 16, 16)
    mask = torch.rand(6, 9) > 0.4
    mask[2] = False
    mask[:, 4] = False  # a key no query sees
    _, (dq, dk, dv) = ours(backend, torch.float32, q, k, v, dout, attn_mask=mask)
    assert torch.all(dq[:, :, 2] == 0) and torch.all(dk[:, :, 4] == 0) and torch.all(dv[:, :, 4] == 0)
    _, exact = torch_math_grads(q, k, v, dout, attn_mask=mask)
    for g, e in zip((dq, dk, dv), exact):
        assert rel_error(g.cpu(), e.nan_to_num()) <= 1e-4


def test_non_contiguous_inputs_and_gradient(backend):
    q = torch.randn(2, 15, 3, 32).transpose(1, 2)
    k = torch.randn(2, 20, 3, 32).transpose(1, 2)
    v = torch.randn(2, 20, 3, 48)[..., ::2].transpose(1, 2)
    dout = torch.randn(2, 15, 3, 24).transpose(1, 2)
    exact_out, exact = torch_math_grads(q, k, v, dout, is_causal=True)
    inputs = [t.to(backend.device).requires_grad_() for t in (q.clone(), k.clone(), v.clone())]
    inputs = [t.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_() for t in inputs]
    out = genkernels.scaled_dot_product_attention(*inputs, is_causal=True)
    got = torch.autograd.grad(out, inputs, dout.to(backend.device))
    for g, e in zip(got, exact):
        assert rel_error(g.cpu(), e) <= 1e-4


def test_leading_dimensions_and_broadcast_batch(backend):
    q = torch.randn(2, 3, 4, 9, 16)
    k, v = torch.randn(1, 3, 4, 11, 16), torch.randn(1, 3, 4, 11, 16)
    dout = torch.randn(2, 3, 4, 9, 16)
    _, exact = torch_math_grads(q, k.expand(2, -1, -1, -1, -1), v.expand(2, -1, -1, -1, -1), dout)
    _, got = ours(backend, torch.float32, q, k, v, dout)
    assert got[1].shape == k.shape
    assert rel_error(got[0].cpu(), exact[0]) <= 1e-4
    assert rel_error(got[1].cpu(), exact[1].sum(0, keepdim=True)) <= 1e-4
    assert rel_error(got[2].cpu(), exact[2].sum(0, keepdim=True)) <= 1e-4


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5, 8, 8), (1, 2, 2, 0, 5, 8, 8), (1, 2, 2, 5, 0, 8, 8),
                                   (1, 2, 2, 5, 5, 0, 8), (1, 2, 2, 5, 5, 8, 0)])
def test_empty_sizes(backend, shape):
    q, k, v, dout = case(*shape)
    out, got = ours(backend, torch.float32, q, k, v, dout)
    _, exact = torch_math_grads(q, k, v, dout) if 0 not in shape[5:] else (None, None)
    for i, g in enumerate(got):
        assert g.shape == (q, k, v)[i].shape
        if exact is not None:
            assert rel_error(g.cpu(), exact[i].nan_to_num()) <= 1e-4
        else:
            assert torch.isfinite(g).all()


def test_opcheck():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    mask = torch.randn(1, 1, 9, 11).expand(2, 4, 9, 11)
    fwd = torch.ops.genkernels.attention_forward.default
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(fwd, (q, k, v, None, None, 0.25, -1, 0, False, 0.0, None, False))
    torch.library.opcheck(fwd, (q, k, v, mask.clone().requires_grad_(), None, 0.25, 3, 2, True, 0.0, None, True))
    seed = torch.tensor([123, 4], dtype=torch.int64)
    torch.library.opcheck(fwd, (q, k, v, None, None, 0.25, -1, 0, False, 0.2, seed, False))
    out, lse = fwd(q, k, v, None, None, 0.25, -1, 0, False, 0.0, None, False)
    bwd = torch.ops.genkernels.attention_backward.default
    args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach())
    torch.library.opcheck(bwd, args + (None, 0.25, -1, 0, False, 0.0, None, False, False))
    torch.library.opcheck(bwd, args + (mask, 0.25, -1, 0, False, 0.1, seed, True, True))


def test_compile_training_step():
    """One graph for the loss (fullgraph); AOTAutograd compiles its backward, with the backward op."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 48)
    mask = torch.randn(12, 12, requires_grad=True)

    def loss_fn(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, E)
        out = genkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.square().mean()

    x = torch.randn(2, 12, 16)
    params = [*proj.parameters(), mask]
    loss = loss_fn(x, mask)
    expected = torch.autograd.grad(loss, params)
    compiled = torch.compile(loss_fn, fullgraph=True)
    compiled_loss = compiled(x, mask)
    torch.testing.assert_close(compiled_loss, loss)
    for g, e in zip(torch.autograd.grad(compiled_loss, params), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_peak_memory_of_backward_is_linear_in_sequence_length():
    """L = S = 8192: forward plus backward. The score matrix alone would take 256 MiB in float32."""
    script = (
        "import resource, torch, genkernels;"
        "q, k, v = (torch.randn(1, 1, 8192, 64, requires_grad=True) for _ in range(3));"
        "small = [t[:, :, :64].detach().requires_grad_() for t in (q, k, v)];"
        "genkernels.scaled_dot_product_attention(*small).sum().backward();"
        "dout = torch.randn(1, 1, 8192, 64);"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "out = genkernels.scaled_dot_product_attention(q, k, v, is_causal=True);"
        "out.backward(dout);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    # out, lse, the three gradients (2 MiB each) and per-thread packed queries (~10 MiB); the
    # naive method needs 256 MiB for the scores and as much again for their gradient.
    assert grown_kib < 64 * 1024, f"peak resident memory grew by {grown_kib} KiB"


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_cpu_threads_and_determinism(threads):
    """One key/value head (multi-query attention, batch 1): with more threads than heads the CPU
    kernel splits the keys and merges dQ in a fixed order; results repeat bit for bit."""
    q, k, v, dout = case(1, 4, 1, 150, 300, 32, 32)
    _, exact = torch_math_grads(q, k, v, dout, is_causal=True, enable_gqa=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [grads(lambda *t: genkernels.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True),
                      leaves("cpu", torch.float32, q, k, v), dout)[1] for _ in range(2)]
    finally:
        torch.set_num_threads(previous)
    for first, second, e in zip(*runs, exact):
        assert torch.equal(first, second)
        assert rel_error(first, e) <= 1e-4
