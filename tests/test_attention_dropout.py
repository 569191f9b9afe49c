"""Attention dropout: the kernels apply the mask of genkernels.attention_dropout_mask (a Philox
stream, the same on every backend), forward and backward, equal to the reference computed with
that mask."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import genkernels
from genkernels import reference


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale


def run_with_mask(backend, dtype, q, k, v, dout, p, seed, **kwargs):
    """Our output and gradients with dropout, and the reference's (float64) with the mask the
    helper reports for the same generator state."""
    mask = genkernels.attention_dropout_mask(q, k, p, generator=torch.Generator().manual_seed(seed))
    assert mask.dtype == torch.bool and mask.shape == q.shape[:-1] + (k.shape[-2],)
    kwargs = dict(kwargs, enable_gqa=q.shape[1] != k.shape[1])
    deterministic = kwargs.pop("deterministic", None)
    inputs = [t.to(backend.device, dtype).requires_grad_() for t in (q, k, v)]
    out = genkernels.scaled_dot_product_attention(
        *inputs, dropout_p=p, generator=torch.Generator().manual_seed(seed), deterministic=deterministic, **kwargs
    )
    got = torch.autograd.grad(out, inputs, dout.to(backend.device, dtype))
    exact_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    exact_out, _ = reference.scaled_dot_product_attention(
        *exact_inputs, dropout_mask=mask, dropout_p=p, **{n: x.cpu() if torch.is_tensor(x) else x for n, x in kwargs.items()}
    )
    exact = torch.autograd.grad(exact_out, exact_inputs, dout.double())
    return (out, *got), (exact_out, *exact), mask


@pytest.mark.parametrize("len_q, len_kv", [(1, 37), (3, 64), (17, 23), (70, 130), (129, 65)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_with_the_same_mask(backend, len_q, len_kv, causal):
    q, k, v = torch.randn(2, 4, len_q, 24), torch.randn(2, 2, len_kv, 24), torch.randn(2, 2, len_kv, 16)
    dout = torch.randn(2, 4, len_q, 16)
    seed = int(torch.randint(0, 2**31, ()))
    got, exact, mask = run_with_mask(backend, torch.float32, q, k, v, dout, 0.3, seed, is_causal=causal)
    assert 0.2 < 1 - mask.float().mean().item() < 0.4
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, exact):
        assert rel_error(g.detach().cpu(), e) <= 1e-4, name


@pytest.mark.parametrize("causal", [False, True])
def test_float32_with_many_keys_on_the_cpu(causal):
    """256 keys and 128 queries and more: the float32 kernels that run on the AMX tiles where the
    CPU has them."""
    q, k, v = torch.randn(1, 2, 140, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 16)
    dout = torch.randn(1, 2, 140, 16)
    seed = int(torch.randint(0, 2**31, ()))
    got, exact, _ = run_with_mask(SimpleNamespace(device=torch.device("cpu")), torch.float32, q, k, v, dout, 0.3, seed, is_causal=causal)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, exact):
        assert rel_error(g.detach(), e) <= 1e-4, name


@pytest.mark.parametrize("deterministic", [False, True])
def test_low_precision(backend, deterministic):
    """bfloat16 (and float16 on the CUDA kernels, where the tensor-core kernels apply dropout
    to P in registers, in both backward paths): within a few units in the last place of the
    largest output and gradient."""
    q, k, v = torch.randn(1, 2, 70, 64), torch.randn(1, 2, 90, 64), torch.randn(1, 2, 90, 64)
    dout = torch.randn(1, 2, 70, 64)
    dtypes = [torch.bfloat16] + ([torch.float16] if backend.cuda_kernels else [])
    for dtype in dtypes:
        ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        got, exact, _ = run_with_mask(backend, dtype, q, k, v, dout, 0.2, 11, is_causal=True, deterministic=deterministic)
        for name, g, e in zip(("out", "dq", "dk", "dv"), got, exact):
            assert g.dtype == dtype and rel_error(g.detach().cpu(), e) <= 8 * ulp, (dtype, name)


def test_float_mask_and_float64(backend):
    q, k, v, dout = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 9, 8)
    bias = torch.randn(9, 11, dtype=torch.float64)
    got, exact, _ = run_with_mask(backend, torch.float64, q, k, v, dout, 0.5, 7, attn_mask=bias.to(backend.device))
    for g, e in zip(got, exact):
        assert rel_error(g.detach().cpu(), e) <= 1e-6  # the float32 lse bounds float64 gradients


def test_gradcheck_with_dropout(backend):
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, device=backend.device, requires_grad=True) for n in (5, 6, 6))

    def fn(*t):  # the same mask at every evaluation: a generator in the same state
        return genkernels.scaled_dot_product_attention(*t, dropout_p=0.4, is_causal=True, generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_mask_statistics_and_keep_scale():
    p = 0.25
    q, k = torch.randn(2, 3, 64, 8), torch.randn(2, 3, 96, 8)
    mask = genkernels.attention_dropout_mask(q, k, p, generator=torch.Generator().manual_seed(0))
    n = mask.numel()
    # Dropped fraction within 5 standard deviations of p.
    assert abs((1 - mask.float().mean().item()) - p) < 5 * (p * (1 - p) / n) ** 0.5
    # v = ones: each output is the kept weights' sum, scaled by 1 / (1 - p).
    v = torch.ones(2, 3, 96, 1)
    out = genkernels.scaled_dot_product_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(0))
    weights = torch.softmax(q.double() @ k.double().mT / 8**0.5, dim=-1)
    torch.testing.assert_close(out.squeeze(-1).double(), (weights * mask).sum(-1) / (1 - p), rtol=1e-5, atol=1e-6)


def test_generator_governs_the_mask(backend):
    q, k, v = (torch.randn(1, 2, 16, 8, device=backend.device) for _ in range(3))
    run = lambda g: genkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=g)
    assert torch.equal(run(torch.Generator().manual_seed(1)), run(torch.Generator().manual_seed(1)))
    assert not torch.equal(run(torch.Generator().manual_seed(1)), run(torch.Generator().manual_seed(2)))
    torch.manual_seed(5)
    first = genkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(first, genkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5))


def test_dropout_one_gives_zeros(backend):
    q, k, v = (torch.randn(1, 2, 7, 8, device=backend.device, requires_grad=True) for _ in range(3))
    out = genkernels.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.all(out == 0)
    for g in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)):
        assert torch.all(g == 0)


def test_reference_mask_matches_philox_binding():
    """The reference's mask is word e % 4 of Philox block e // 4, as the C++ Philox gives it."""
    from genkernels import _C

    seed = torch.tensor([0x9ABC_DEF0_1234_5678 - 2**64, 77], dtype=torch.int64)
    p = 0.5
    mask = reference.attention_dropout_mask(seed, (1, 1, 3, 5), p).reshape(-1)
    key = 0x9ABC_DEF0_1234_5678  # a negative int64 seed: its two's-complement bits
    for e in range(15):
        word = _C.philox4x32_10([e // 4, 0, 77, 0], [key & 0xFFFFFFFF, key >> 32])[e % 4]
        assert bool(mask[e]) == (word >= 2**31)


def test_compile_training_step_with_dropout():
    """fullgraph: the seed is drawn inside the graph; with inductor's eager-equal random numbers
    the compiled step applies the eager step's mask (a different mask would change the loss by
    far more than the rounding of inductor's fused reductions)."""
    import torch._inductor.config as inductor_config

    def loss_fn(q, k, v):
        return genkernels.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.2).square().mean()

    q, k, v = (torch.randn(2, 2, 12, 8, requires_grad=True) for _ in range(3))
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(loss_fn, fullgraph=True)
        torch.manual_seed(3)
        loss = compiled(q, k, v)
        got = torch.autograd.grad(loss, (q, k, v))
    torch.manual_seed(3)
    expected_loss = loss_fn(q, k, v)
    expected = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
