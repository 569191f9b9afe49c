"""Sinusoidal positional and timestep encodings (Vaswani et al. 2017; Ho et al. 2020).

`sinusoidal_encoding` builds the table for any positions or diffusion timesteps, with the
options of diffusers' `get_timestep_embedding`; `add_positional_encoding` adds it to a batch of
sequences in one pass, at any starting position (for generation with a key/value cache).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks
from ._backend import DTYPE_CODES, compute_dtype, custom_op, float_dtypes, launch_for

LAYOUTS = ("interleaved", "concat")


@custom_op("genkernels::sinusoidal_encoding", mutates_args=())
def _sinusoidal_encoding(
    positions: Tensor,
    dim: int,
    base: float,
    interleaved: bool,
    flip_sin_to_cos: bool,
    downscale_freq_shift: float,
    scale: float,
    dtype: torch.dtype,
) -> Tensor:
    out = torch.empty(positions.shape + (dim,), dtype=dtype, device=positions.device)
    flat = positions.reshape(-1).to(compute_dtype(dtype)).contiguous()
    run = launch_for(out)
    run.module.sinusoidal_encoding(
        run.where, run.stream, out.data_ptr(), flat.data_ptr(), flat.numel(), DTYPE_CODES[dtype], dim,
        math.log(base), dim // 2 - downscale_freq_shift, scale, interleaved, flip_sin_to_cos,
    )
    return out


@_sinusoidal_encoding.register_fake
def _(positions, dim, base, interleaved, flip_sin_to_cos, downscale_freq_shift, scale, dtype):
    return positions.new_empty(positions.shape + (dim,), dtype=dtype)


def sinusoidal_encoding(
    positions: Tensor,
    dim: int,
    *,
    base: float = 10000.0,
    layout: str = "interleaved",
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sinusoidal encoding of integer or float `positions` (token indices or timesteps).

    Returns a tensor of shape ``positions.shape + (dim,)``. Pair ``i`` has frequency
    ``base ** (-i / (dim // 2 - downscale_freq_shift))`` and angle ``scale * position * freq``;
    ``layout="interleaved"`` puts sin at even and cos at odd columns (the Transformer paper),
    ``"concat"`` gives ``[sin | cos]`` (tensor2tensor, diffusers), and ``flip_sin_to_cos`` swaps
    the two. An odd ``dim`` leaves the last column zero. With ``layout="concat"`` and
    ``base=max_period`` this is ``diffusers.models.embeddings.get_timestep_embedding``.

    Computed in float32 (float64 when ``dtype`` is float64), with sin and cos accurate to float32
    rounding for angles up to 1e6.

    Example:
        >>> genkernels.sinusoidal_encoding(torch.arange(4), 4, base=100.0).round(decimals=2)
        tensor([[ 0.0000,  1.0000,  0.0000,  1.0000],
                [ 0.8400,  0.5400,  0.1000,  1.0000],
                [ 0.9100, -0.4200,  0.2000,  0.9800],
                [ 0.1400, -0.9900,  0.3000,  0.9600]])
    """
    fn = "sinusoidal_encoding"
    positions = _checks.tensor(fn, "positions", positions)
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"{fn}(): argument 'positions' must be an integer or floating tensor, got {positions.dtype}")
    dim = _checks.integer(fn, "dim", dim, minimum=1)
    base = _checks.real(fn, "base", base, positive=True)
    layout = _checks.choice(fn, "layout", layout, LAYOUTS)
    shift = _checks.real(fn, "downscale_freq_shift", downscale_freq_shift)
    scale = _checks.real(fn, "scale", scale)
    dtype = _checks.dtype(fn, "dtype", dtype, float_dtypes(positions.device))
    if dim // 2 > 0 and dim // 2 == shift:
        raise ValueError(f"{fn}(): 'downscale_freq_shift' must differ from dim // 2 = {dim // 2}, got {shift}")
    return _sinusoidal_encoding(positions, dim, base, layout == "interleaved", bool(flip_sin_to_cos), shift, scale, dtype)


@custom_op("genkernels::add_positional_encoding", mutates_args=())
def _add_positional_encoding(x: Tensor, offset: int, base: float, interleaved: bool, x_scale: float) -> Tensor:
    src = x.contiguous()
    out = torch.empty_like(src)
    length, dim = x.shape[-2], x.shape[-1]
    rows = x.numel() // (length * dim) if length * dim else 0
    run = launch_for(out)
    run.module.add_positional_encoding(
        run.where, run.stream, out.data_ptr(), src.data_ptr(), rows, length, DTYPE_CODES[x.dtype], dim, offset,
        x_scale, math.log(base), interleaved,
    )
    return out


@_add_positional_encoding.register_fake
def _(x, offset, base, interleaved, x_scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_pe_setup(ctx, inputs, output):
    ctx.x_scale = inputs[4]


def _add_pe_backward(ctx, grad):
    return grad * ctx.x_scale, None, None, None, None


_add_positional_encoding.register_autograd(_add_pe_backward, setup_context=_add_pe_setup)


def add_positional_encoding(
    x: Tensor,
    *,
    offset: int = 0,
    base: float = 10000.0,
    layout: str = "interleaved",
    x_scale: float = 1.0,
) -> Tensor:
    """``x * x_scale + PE[offset : offset + L]`` for ``x`` of shape ``(..., L, D)``, in one pass.

    ``PE`` is ``sinusoidal_encoding(arange(offset, offset + L), D, base=base, layout=layout)``;
    ``offset`` encodes new tokens at their true positions when generating with a key/value
    cache, and ``x_scale`` is the ``sqrt(d_model)`` embedding scale of the Transformer paper.
    Differentiable with respect to ``x``.
    """
    fn = "add_positional_encoding"
    x = _checks.float_tensor(fn, "x", x, min_dim=2)
    offset = _checks.integer(fn, "offset", offset, minimum=0)
    base = _checks.real(fn, "base", base, positive=True)
    layout = _checks.choice(fn, "layout", layout, LAYOUTS)
    x_scale = _checks.real(fn, "x_scale", x_scale)
    return _add_positional_encoding(x, offset, base, layout == "interleaved", x_scale)
