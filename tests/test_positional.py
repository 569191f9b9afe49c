"""Sinusoidal encodings against the reference, diffusers, and the Transformer paper's example."""

from __future__ import annotations

import math

import pytest
import torch

import genkernels
from genkernels import reference

from tolerances import low_precision_tol


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, max_angle: float = 5000.0) -> None:
    # Both sides evaluate sin and cos of the same rounded angle; float32 kernels are within a
    # few units in the last place of libm, low precision within two of its own units. In
    # float64 the two libms' exp may differ by an ulp in the frequency, moving the angle by
    # up to max_angle * 2^-52.
    atol = {torch.float32: 6e-7, torch.float64: max_angle * 2.0**-50}.get(dtype) or low_precision_tol(dtype)
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=0, atol=atol)


def test_i_am_a_robot_example(backend):
    pe = genkernels.sinusoidal_encoding(torch.arange(4, device=backend.device), 4, base=100.0)
    expected = torch.tensor(
        [[0, 1, 0, 1], [0.84, 0.54, 0.10, 1.00], [0.91, -0.42, 0.20, 0.98], [0.14, -0.99, 0.30, 0.96]]
    )
    torch.testing.assert_close(pe.cpu().round(decimals=2), expected)


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 31, 64, 320, 1025])
@pytest.mark.parametrize("layout", ["interleaved", "concat"])
@pytest.mark.parametrize("flip", [False, True])
def test_matches_reference(backend, dim, layout, flip):
    positions = torch.randint(0, 5000, (37,), device=backend.device)
    kwargs = dict(base=10000.0, layout=layout, flip_sin_to_cos=flip)
    for dtype in backend.float_dtypes():
        out = genkernels.sinusoidal_encoding(positions, dim, dtype=dtype, **kwargs)
        assert out.shape == (37, dim) and out.dtype == dtype and out.device == backend.device
        close(out, reference.sinusoidal_encoding(positions, dim, dtype=dtype, **kwargs), dtype)


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (4, 0, 2)])
def test_position_shapes_and_types(backend, shape):
    for positions in (
        torch.randint(0, 100, shape, device=backend.device),
        torch.rand(shape, device=backend.device, dtype=torch.float64) * 1000,
        torch.randint(0, 100, shape, device=backend.device, dtype=torch.int32),
    ):
        out = genkernels.sinusoidal_encoding(positions, 10, downscale_freq_shift=1.0, scale=3.0)
        assert out.shape == shape + (10,)
        close(out, reference.sinusoidal_encoding(positions, 10, downscale_freq_shift=1.0, scale=3.0), torch.float32)


def test_non_contiguous_positions(backend):
    positions = torch.randint(0, 1000, (6, 8), device=backend.device).t()
    assert not positions.is_contiguous()
    close(genkernels.sinusoidal_encoding(positions, 16), reference.sinusoidal_encoding(positions, 16), torch.float32)


def test_accurate_to_float32_rounding_for_large_positions(backend):
    positions = torch.cat([torch.randint(0, 1_000_000, (4000,)), torch.tensor([999_999, 1_000_000])]).to(backend.device)
    dim = 64
    out = genkernels.sinusoidal_encoding(positions, dim, layout="concat")
    # The exact sin and cos of the float32 angle the kernel forms.
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half).float()
    angle = (positions.cpu().float()[:, None] * freq).double()
    exact = torch.cat([angle.sin(), angle.cos()], dim=-1)
    assert (out.cpu().double() - exact).abs().max().item() <= 2.5 * 2.0**-24


@pytest.mark.parametrize("dim", [4, 15, 128, 320])
@pytest.mark.parametrize("flip_sin_to_cos", [False, True])
@pytest.mark.parametrize("downscale_freq_shift", [0.0, 1.0])
@pytest.mark.parametrize("scale", [1.0, 1000.0])
@pytest.mark.parametrize("max_period", [10000, 100])
def test_equals_diffusers_timestep_embedding(backend, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period):
    from diffusers.models import embeddings

    t = torch.randint(0, 1000, (64,)).float()
    theirs = embeddings.get_timestep_embedding(
        t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=downscale_freq_shift, scale=scale, max_period=max_period
    )
    ours = genkernels.sinusoidal_encoding(
        t.to(backend.device), dim, base=float(max_period), layout="concat", flip_sin_to_cos=flip_sin_to_cos,
        downscale_freq_shift=downscale_freq_shift, scale=scale,
    )
    # diffusers rounds the exponent to float32 before exp; the angles then differ by at most
    # |angle| * 2^-22, which bounds the difference of the values.
    angle_bound = t.max().item() * scale * 2.0**-22 + 1e-6
    torch.testing.assert_close(ours.cpu(), theirs, rtol=0, atol=angle_bound)


def test_shift_equal_to_half_dim_is_rejected():
    with pytest.raises(ValueError, match="downscale_freq_shift"):
        genkernels.sinusoidal_encoding(torch.arange(3), 2, downscale_freq_shift=1.0)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(positions=[1, 2]), TypeError, ["positions", "torch.Tensor", "list"]),
        (dict(positions=torch.ones(2, dtype=torch.bool)), TypeError, ["positions", "torch.bool"]),
        (dict(dim=0), ValueError, ["dim", ">= 1", "0"]),
        (dict(dim=4.0), TypeError, ["dim", "int", "float"]),
        (dict(base=-2.0), ValueError, ["base", "positive"]),
        (dict(base=float("nan")), ValueError, ["base", "finite"]),
        (dict(layout="columns"), ValueError, ["layout", "interleaved", "columns"]),
        (dict(dtype=torch.int32), TypeError, ["dtype", "torch.int32"]),
        (dict(dtype=torch.bfloat16), TypeError, ["dtype", "torch.bfloat16"]),
        (dict(scale=float("inf")), ValueError, ["scale", "finite"]),
    ],
)
def test_bad_arguments(kwargs, error, words):
    args = dict(positions=torch.arange(3), dim=8)
    args.update(kwargs)
    positions, dim = args.pop("positions"), args.pop("dim")
    with pytest.raises(error) as info:
        genkernels.sinusoidal_encoding(positions, dim, **args)
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------- add_positional_encoding


@pytest.mark.parametrize("shape", [(1, 1), (7, 6), (3, 17, 33), (2, 3, 5, 8), (0, 4, 8), (2, 0, 8)])
@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_add_matches_reference(backend, shape, layout):
    for dtype in backend.float_dtypes():
        x = torch.randn(shape, device=backend.device).to(dtype)
        out = genkernels.add_positional_encoding(x, offset=11, layout=layout, x_scale=2.5, base=500.0)
        expected = reference.add_positional_encoding(x, offset=11, layout=layout, x_scale=2.5, base=500.0)
        assert out.dtype == dtype and out.shape == x.shape
        tol = {torch.float32: 2e-6, torch.float64: 1e-12}.get(dtype) or 4 * low_precision_tol(dtype)
        torch.testing.assert_close(out.double(), expected.double(), rtol=0, atol=tol)


def test_add_non_contiguous_and_offset(backend):
    x = torch.randn(4, 16, 10, device=backend.device).transpose(0, 1)  # (16, 4, 10): L = 4
    assert not x.is_contiguous()
    out = genkernels.add_positional_encoding(x, offset=1000)
    torch.testing.assert_close(out, reference.add_positional_encoding(x, offset=1000), rtol=0, atol=2e-6)


def test_add_offset_continues_the_sequence():
    x = torch.randn(2, 9, 12)
    whole = genkernels.add_positional_encoding(x)
    parts = torch.cat([genkernels.add_positional_encoding(x[:, :5]), genkernels.add_positional_encoding(x[:, 5:], offset=5)], 1)
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)


def test_add_gradcheck():
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: genkernels.add_positional_encoding(t, offset=3, x_scale=1.7), (x,))


def test_add_bad_arguments():
    with pytest.raises(ValueError, match="'x'.*at least 2 dimensions"):
        genkernels.add_positional_encoding(torch.randn(5))
    with pytest.raises(TypeError, match="'x'.*int64"):
        genkernels.add_positional_encoding(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="'offset'.*>= 0"):
        genkernels.add_positional_encoding(torch.randn(2, 3), offset=-1)


# ---------------------------------------------------------------- the op contract


def test_opcheck():
    ops = torch.ops.genkernels
    torch.library.opcheck(ops.sinusoidal_encoding.default, (torch.arange(7), 9, 10000.0, True, False, 1.0, 2.0, torch.float32))
    torch.library.opcheck(ops.sinusoidal_encoding.default, (torch.rand(2, 3).double(), 8, 100.0, False, True, 0.0, 1.0, torch.float64))
    x = torch.randn(3, 5, 8, requires_grad=True)
    torch.library.opcheck(ops.add_positional_encoding.default, (x, 4, 10000.0, True, 1.5))


def test_compile_fullgraph():
    def embed(tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = genkernels.add_positional_encoding(tokens, offset=2, x_scale=4.0)
        return h + genkernels.sinusoidal_encoding(t, tokens.shape[-1], layout="concat")[:, None, :]

    tokens, t = torch.randn(2, 7, 16), torch.tensor([3, 999])
    compiled = torch.compile(embed, fullgraph=True)
    torch.testing.assert_close(compiled(tokens, t), embed(tokens, t))
