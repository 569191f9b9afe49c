"""Gaussian sampling with noise drawn inside the kernels: standard normals, the VAE's
reparameterised sample (Kingma & Welling 2014) and its KL divergence to N(0, I).

Noise comes from the counter-based Philox4x32-10 stream keyed by a seed drawn from a
``torch.Generator``, so ``torch.manual_seed`` reproduces it, and CPU and CUDA give the same
numbers for the same seed.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks
from ._backend import DTYPE_CODES, custom_op, float_dtypes, launch_for
from ._rng import draw_seed

REDUCTIONS = ("none", "sum", "mean", "batchmean")


@custom_op("genkernels::normal", mutates_args=())
def _normal(like: Tensor, seed: Tensor) -> Tensor:
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    run = launch_for(out)
    run.module.normal(run.where, run.stream, out.data_ptr(), out.numel(), DTYPE_CODES[out.dtype], seed.data_ptr())
    return out


@_normal.register_fake
def _(like, seed):
    return like.new_empty(like.shape)


def _check_seed(fn: str, seed: Tensor, device: torch.device) -> None:
    if seed.dtype != torch.int64 or seed.shape != (2,) or seed.device != device:
        raise ValueError(f"{fn}(): seed must be an int64 tensor of shape (2,) on {device}, got {seed.dtype} {tuple(seed.shape)} on {seed.device}")


def randn_like(x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal samples with the shape, dtype and device of ``x`` (a contiguous tensor)."""
    fn = "randn_like"
    x = _checks.float_tensor(fn, "x", x)
    generator = _checks.generator(fn, generator)
    return _normal(x, draw_seed(generator, x.device))


def randn(
    *size: Union[int, Sequence[int]],
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """Standard normal samples of shape ``size``, like ``torch.randn`` but from the Philox stream.

    ``dtype`` defaults to ``torch.get_default_dtype()`` and ``device`` to the CPU.
    """
    fn = "randn"
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    shape = tuple(_checks.integer(fn, "size", s, minimum=0) for s in shape)
    device = torch.device(device if device is not None else "cpu")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    dtype = _checks.dtype(fn, "dtype", dtype, float_dtypes(device))
    generator = _checks.generator(fn, generator)
    like = torch.empty(shape, dtype=dtype, device=device)
    return _normal(like, draw_seed(generator, device))


@custom_op("genkernels::reparameterize", mutates_args=())
def _reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor) -> Tensor:
    mu_c, logvar_c = mu.contiguous(), logvar.contiguous()
    z = torch.empty_like(mu_c)
    run = launch_for(z)
    run.module.reparameterize(
        run.where, run.stream, z.data_ptr(), mu_c.data_ptr(), logvar_c.data_ptr(), z.numel(), DTYPE_CODES[z.dtype],
        seed.data_ptr(),
    )
    return z


@_reparameterize.register_fake
def _(mu, logvar, seed):
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


def _reparameterize_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _reparameterize_backward(ctx, grad):
    mu, z = ctx.saved_tensors
    # dz/dmu = 1 and dz/dlogvar = sigma * eps / 2 = (z - mu) / 2: no stored noise needed.
    return grad, 0.5 * grad * (z - mu), None


_reparameterize.register_autograd(_reparameterize_backward, setup_context=_reparameterize_setup)


def _expand(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.expand(shape)


def reparameterize(
    mu: Tensor,
    logvar: Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    return_noise: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``z = mu + exp(0.5 * logvar) * eps`` with ``eps ~ N(0, I)`` drawn inside the kernel.

    ``mu`` and ``logvar`` broadcast against each other. Gradients flow to both without storing
    ``eps``. With ``return_noise=True`` returns ``(z, eps)``.

    Example:
        >>> mu, logvar = encoder(x).chunk(2, dim=-1)
        >>> z = genkernels.reparameterize(mu, logvar)
    """
    fn = "reparameterize"
    mu = _checks.float_tensor(fn, "mu", mu)
    logvar = _checks.float_tensor(fn, "logvar", logvar)
    args = {"mu": mu, "logvar": logvar}
    _checks.same_device(fn, args)
    _checks.same_dtype(fn, args)
    shape = _checks.broadcast_shapes(fn, args)
    generator = _checks.generator(fn, generator)
    mu, logvar = _expand(mu, shape), _expand(logvar, shape)
    seed = draw_seed(generator, mu.device)
    z = _reparameterize(mu, logvar, seed)
    if return_noise:
        return z, _normal(z, seed)
    return z


@custom_op("genkernels::gaussian_kl", mutates_args=())
def _gaussian_kl(mu: Tensor, logvar: Tensor, reduction: str) -> Tensor:
    mu_c, logvar_c = mu.contiguous(), logvar.contiguous()
    run = launch_for(mu_c)
    n = mu_c.numel()
    if reduction == "none":
        out = torch.empty_like(mu_c)
        run.module.gaussian_kl(run.where, run.stream, out.data_ptr(), mu_c.data_ptr(), logvar_c.data_ptr(), n, DTYPE_CODES[mu.dtype], False)
        return out
    chunk = run.module.KL_CHUNK
    partials = torch.empty((n + chunk - 1) // chunk, dtype=torch.float64, device=mu.device)
    run.module.gaussian_kl(run.where, run.stream, partials.data_ptr(), mu_c.data_ptr(), logvar_c.data_ptr(), n, DTYPE_CODES[mu.dtype], True)
    return (partials.sum() / _kl_divisor(mu.shape, reduction)).to(mu.dtype)


def _kl_divisor(shape: torch.Size, reduction: str) -> float:
    if reduction == "mean":
        return float(shape.numel()) if shape.numel() else float("nan")
    if reduction == "batchmean":
        return float(shape[0]) if len(shape) and shape[0] else float("nan")
    return 1.0


@_gaussian_kl.register_fake
def _(mu, logvar, reduction):
    if reduction == "none":
        return torch.empty_like(mu, memory_format=torch.contiguous_format)
    return mu.new_empty(())


def _gaussian_kl_setup(ctx, inputs, output):
    mu, logvar, reduction = inputs
    ctx.save_for_backward(mu, logvar)
    ctx.reduction = reduction


def _gaussian_kl_backward(ctx, grad):
    mu, logvar = ctx.saved_tensors
    if ctx.reduction != "none":
        grad = grad / _kl_divisor(mu.shape, ctx.reduction)
    # d/dmu = mu, d/dlogvar = (exp(logvar) - 1) / 2
    return grad * mu, 0.5 * grad * torch.expm1(logvar), None


_gaussian_kl.register_autograd(_gaussian_kl_backward, setup_context=_gaussian_kl_setup)


def gaussian_kl(mu: Tensor, logvar: Tensor, *, reduction: str = "sum") -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I)) = 0.5 * (mu^2 + exp(logvar) - 1 - logvar)`` in one pass.

    ``reduction`` is ``"none"`` (per element), ``"sum"``, ``"mean"`` (over all elements) or
    ``"batchmean"`` (sum divided by the size of the first dimension, as ``F.kl_div``). Sums are
    accumulated in float64 in a fixed order, so they do not depend on the thread count.
    """
    fn = "gaussian_kl"
    mu = _checks.float_tensor(fn, "mu", mu)
    logvar = _checks.float_tensor(fn, "logvar", logvar)
    args = {"mu": mu, "logvar": logvar}
    _checks.same_device(fn, args)
    _checks.same_dtype(fn, args)
    shape = _checks.broadcast_shapes(fn, args)
    reduction = _checks.choice(fn, "reduction", reduction, REDUCTIONS)
    if reduction == "batchmean" and len(shape) == 0:
        raise ValueError(f"{fn}(): reduction 'batchmean' needs at least one dimension, got a 0-d tensor")
    return _gaussian_kl(_expand(mu, shape), _expand(logvar, shape), reduction)
