"""Benchmarks: every genkernels op beside its PyTorch reference, eager and compiled.

``python -m genkernels bench`` first measures the machine's ceilings (copy bandwidth and float32
matrix-product rate), then times each case of `CASES` three ways: the genkernels op, the
pure-PyTorch reference run eagerly, and the reference under ``torch.compile``. It prints one
table with the times, the speed-ups, the achieved bandwidth against the measured copy bandwidth
and each case's target, then the per-call overhead of each op on a 16-element input.

Every time is the minimum over ``--repeat`` repeats after a warm-up (the median is kept in the
``--json`` output too); the minimum is the figure least disturbed by other work on the machine.
A repeat runs the function enough times back to back to last a few milliseconds and reports the
mean per call. On CUDA, repeats are timed with CUDA events and the device is synchronised.

Adding a benchmark means adding one `Case` to `CASES` (or, for whole models, to `MODEL_CASES`);
``benchmarks/test_ops.py`` picks the same list up for pytest-benchmark.

This module is imported only by ``python -m genkernels`` and the benchmarks, never by
``import genkernels``, and imports nothing heavy itself (``torch.compile`` loads its machinery
on first use).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .attention import scaled_dot_product_attention
from .diffusion import q_sample
from .positional import add_positional_encoding, sinusoidal_encoding
from .sampling import gaussian_kl, randn_like, reparameterize

F32 = 4  # bytes of a float32 element
I64 = 8  # bytes of an int64 element
MI = 1024 * 1024

Sizes = dict[str, int]  # keyword arguments of a case's `inputs`, `bytes_moved`, `flops` and `shape`


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a case should reach: a speed-up over the eager reference and a share of the measured
    copy bandwidth (either may be left out)."""

    speedup: Optional[float] = None  # genkernels time x this <= eager time
    bandwidth: Optional[float] = None  # achieved GB/s >= this fraction of the copy bandwidth

    def __str__(self) -> str:
        parts = []
        if self.speedup is not None:
            parts.append(f">= {self.speedup:g}x")
        if self.bandwidth is not None:
            parts.append(f">= {100 * self.bandwidth:.0f}% BW")
        return ", ".join(parts)

    def met(self, speedup: Optional[float], bandwidth_fraction: Optional[float]) -> Optional[bool]:
        """Whether the measured figures reach the target; None when there is no target or a
        figure it needs is missing."""
        checks = []
        if self.speedup is not None:
            checks.append(None if speedup is None else speedup >= self.speedup)
        if self.bandwidth is not None:
            checks.append(None if bandwidth_fraction is None else bandwidth_fraction >= self.bandwidth)
        if not checks or None in checks:
            return None
        return all(checks)


@dataclass(frozen=True)
class Case:
    """One benchmark: a genkernels op and its reference on inputs of a given size.

    A size is a dict of keyword arguments, given to ``inputs`` (after the device), ``bytes_moved``
    and ``flops``, and formatted into ``shape``. ``full`` is the size of the standard run,
    ``quick`` the size of ``--quick``, and ``tiny`` (about 16 elements) the size at which the
    per-call overhead is measured (None: not measured).

    ``inputs(device, **size)`` returns the positional arguments of both callables, so that
    ``genkernels(*args)`` and ``reference(*args)`` compute the same thing. ``bytes_moved`` is the
    fewest bytes the op must move (every input read once, every output written once), ``flops``
    the floating-point operations where counting them is meaningful (0 bytes: not meaningful,
    as for whole models). ``items`` names what one call processes (training steps, tokens) and
    counts it, for a throughput column.
    """

    name: str
    shape: str  # format string over the size, e.g. "({n},)"
    inputs: Callable[..., tuple]
    genkernels: Callable[..., Any]
    reference: Callable[..., Any]
    bytes_moved: Callable[..., int]
    full: Sizes
    quick: Sizes
    tiny: Optional[Sizes] = None
    flops: Optional[Callable[..., float]] = None
    compile: bool = True  # also time torch.compile(reference)
    target: Target = Target()
    exact: bool = True  # outputs agree with the reference (False for ops that draw noise)
    devices: tuple[str, ...] = ("cpu", "cuda")
    items: Optional[tuple[str, Callable[..., float]]] = None  # (unit, count per call): report throughput
    # The part of both callables that is not genkernels' to speed up (a sampling loop's denoiser),
    # timed alone: the report gives the share of each library's time left to the rest.
    common: Optional[Callable[..., Any]] = None

    def size(self, scale: str) -> Sizes:
        """The size for ``scale``: "full", "quick" or "tiny"."""
        sizes = {"full": self.full, "quick": self.quick, "tiny": self.tiny}
        if sizes[scale] is None:
            raise ValueError(f"case {self.name!r} has no {scale} size")
        return sizes[scale]


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _mu_logvar(device: torch.device, n: int) -> tuple[Tensor, Tensor]:
    g = _generator(device)
    mu = torch.randn(n, generator=g, device=device)
    logvar = 0.5 * torch.randn(n, generator=g, device=device)
    return mu, logvar


def _positions(device: torch.device, n: int, dim: int) -> tuple[Tensor, int]:
    return torch.arange(n, device=device), dim


def _timesteps(device: torch.device, n: int, dim: int) -> tuple[Tensor, int]:
    return torch.randint(0, 1000, (n,), generator=_generator(device), device=device), dim


def _sequences(device: torch.device, b: int, l: int, d: int) -> tuple[Tensor]:
    return (torch.randn(b, l, d, generator=_generator(device), device=device),)


def _qkv(device: torch.device, b: int, h: int, l: int, s: int, e: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = _generator(device)
    return tuple(torch.randn(b, h, n, e, generator=g, device=device).to(dtype) for n in (l, s, s))


def _attention_shape(dtype: torch.dtype) -> str:
    """An attention case's shape format, naming its dtype unless float32."""
    return "B{b} H{h} L{l} S{s} E{e}" + ("" if dtype == torch.float32 else f" {str(dtype).replace('torch.', '')}")


def _attention_case(name: str, causal: bool, full: Sizes, quick: Sizes, target: Target = Target(),
                    dtype: torch.dtype = torch.float32) -> Case:
    """Attention of (b, h, l, e) queries over (b, h, s, e) keys and values in ``dtype``, beside
    PyTorch's scaled_dot_product_attention (on a GPU, 16-bit inputs select its flash backend).
    Flops: 2 matrix products of 2 l s e each (half when causal)."""
    size = dtype.itemsize
    return Case(
        name=name,
        shape=_attention_shape(dtype),
        inputs=lambda device, **shape: _qkv(device, **shape, dtype=dtype),
        genkernels=lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=causal),
        reference=lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
        bytes_moved=lambda b, h, l, s, e: size * b * h * (2 * l * e + 2 * s * e),
        flops=lambda b, h, l, s, e: 4.0 * b * h * l * s * e * (0.5 if causal else 1.0),
        full=full,
        quick=quick,
        tiny=dict(b=1, h=1, l=4, s=4, e=4),
        target=target,
        compile=dtype == torch.float32,
    )


_SCHEDULERS: dict[str, Any] = {}
_SCHEDULER_ARGS = {"DDPM": dict(clip_sample=False), "DDIM": dict(clip_sample=False), "DPMSolverMultistep": {}}
_STEP_T = 500  # the timestep each step case takes (in all three 50-step chains)


def _scheduler(library: str, kind: str, steps: int = 50) -> Any:
    """A DDPM, DDIM or DPM-Solver scheduler with ``steps`` inference steps from genkernels or
    diffusers (the baseline, when installed; else None), made once."""
    key = f"{library}.{kind}.{steps}"
    if key not in _SCHEDULERS:
        if library == "diffusers":
            try:
                import diffusers
            except ImportError:
                return None
            module = diffusers
        else:
            from . import schedulers as module
        scheduler = getattr(module, f"{kind}Scheduler")(**_SCHEDULER_ARGS[kind])
        scheduler.set_timesteps(steps)
        _SCHEDULERS[key] = scheduler
    return _SCHEDULERS[key]


def _neighbours(kind: str) -> tuple[int, int, int]:
    """(index of _STEP_T in the 50-step chain, the timestep before it, the one after it)."""
    chain = _scheduler("genkernels", kind).timesteps.tolist()
    i = chain.index(_STEP_T)
    return i, chain[i - 1], chain[i + 1]


def _latents(device: torch.device, b: int, c: int, hw: int) -> tuple[Tensor, Tensor]:
    x = torch.randn(b, c, hw, hw, generator=_generator(device), device=device)
    return torch.randn_like(x), x


def _latents_and_x0(device: torch.device, b: int, c: int, hw: int) -> tuple[Tensor, Tensor, Tensor]:
    """The model output, the sample and the previous step's x0 of a multistep solver."""
    m, x = _latents(device, b, c, hw)
    return m, x, torch.randn_like(x)


def _step(library: str, kind: str, m: Tensor, x: Tensor, prev_x0: Optional[Tensor] = None) -> Optional[Tensor]:
    """One step at _STEP_T by the library's scheduler (None without it). A multistep scheduler is
    first put back to just after the previous step of its chain, whose x0 was ``prev_x0``, so
    every call is the same second-order update."""
    scheduler = _scheduler(library, kind)
    if scheduler is None:
        return None
    if prev_x0 is not None:
        scheduler.model_outputs = [None, prev_x0]
        scheduler.lower_order_nums = 1
        if library == "diffusers":
            scheduler._step_index = _neighbours(kind)[0]
    return scheduler.step(m, _STEP_T, x).prev_sample


def _step_baseline(kind: str) -> Callable[..., Tensor]:
    """diffusers' step at t = 500, or the pure-PyTorch formulas without diffusers."""
    def step(m: Tensor, x: Tensor, *history: Tensor) -> Tensor:
        theirs = _step("diffusers", kind, m, x, *history)
        if theirs is not None:
            return theirs
        abar = _scheduler("genkernels", kind).schedule._abar64.cpu()
        _, before, after = _neighbours(kind)
        t = torch.full((x.shape[0],), _STEP_T)
        if kind == "DDPM":
            return reference.ddpm_step(m, t, t - 20, x, abar, torch.randn_like(x), clip=None)[0].float()
        if kind == "DDIM":
            return reference.ddim_step(m, t, t - 20, x, abar, torch.zeros(1))[0].float()
        return reference.dpm_solver_step(m, t, torch.full_like(t, after), x, abar, prev_x0=history[0],
                                         prev_x0_t=torch.full_like(t, before))[0].float()
    return step


def _noised_baseline(x0: Tensor, t: Tensor) -> Tensor:
    """randn_like plus diffusers' add_noise (or its formula without diffusers)."""
    noise = torch.randn_like(x0)
    theirs = _scheduler("diffusers", "DDPM")
    if theirs is not None:
        return theirs.add_noise(x0, noise, t)
    return reference.q_sample(x0, t.cpu(), _scheduler("genkernels", "DDPM").schedule._abar64.cpu(), noise)[0].float()


def _denoiser_and_latents(device: torch.device, b: int, c: int, hw: int, steps: int) -> tuple:
    """A tiny denoiser (a 1x1 convolution), latents and the step count of a sampling loop."""
    denoiser = torch.nn.Conv2d(c, c, 1).to(device).requires_grad_(False)
    with torch.no_grad():
        denoiser.weight.copy_(0.1 * torch.eye(c).reshape(c, c, 1, 1))
    return denoiser, _latents(device, b, c, hw)[1], steps


def _ddim_loop(library: str) -> Callable[..., Tensor]:
    """A deterministic DDIM sampling loop of ``steps`` steps with the library's scheduler
    (diffusers', or the float64 reference formulas without diffusers)."""
    def loop(denoiser: torch.nn.Module, x: Tensor, steps: int) -> Tensor:
        scheduler = _scheduler(library, "DDIM", steps)
        if scheduler is None:
            scheduler = _scheduler("genkernels", "DDIM", steps)
            abar = scheduler.schedule._abar64.to(x.device)
            step = lambda m, t, x: reference.ddim_step(  # noqa: E731
                m, t.expand(x.shape[0]), scheduler.previous_timestep(t).expand(x.shape[0]), x, abar, torch.zeros(1))[0].float()
        else:
            step = lambda m, t, x: scheduler.step(m, t, x).prev_sample  # noqa: E731
        for t in scheduler.timesteps:
            x = step(denoiser(x), t, x)
        return x
    return loop


def _diffusion_case(name: str, kind: str, target: Target) -> Case:
    """A scheduler's step beside diffusers'; DPM-Solver's is its second-order (multistep) update,
    which also reads the previous step's x0."""
    multistep = kind == "DPMSolverMultistep"
    return Case(
        name=name,
        shape="({b}, {c}, {hw}, {hw})",
        inputs=_latents_and_x0 if multistep else _latents,
        genkernels=lambda *args: _step("genkernels", kind, *args),
        reference=_step_baseline(kind),
        # model output, sample (and the previous x0) read; prev_sample and pred_original_sample written
        bytes_moved=lambda b, c, hw: (5 if multistep else 4) * F32 * b * c * hw * hw,
        full=dict(b=64, c=4, hw=64),
        quick=dict(b=2, c=4, hw=16),
        tiny=dict(b=1, c=1, hw=4),
        target=target,
        exact=kind != "DDPM",
    )


def _qkv_dout(device: torch.device, b: int, h: int, l: int, s: int, e: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
    q, k, v = (t.requires_grad_() for t in _qkv(device, b, h, l, s, e, dtype))
    return q, k, v, torch.randn(b, h, l, e, generator=_generator(device), device=device).to(dtype)


def _training_step(attention: Callable[..., Tensor], causal: bool, **options: Any) -> Callable[..., Tensor]:
    """Forward and backward of `attention`; returns dq (dk and dv are computed too)."""

    def step(q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> Tensor:
        out = attention(q, k, v, is_causal=causal, **options)
        return torch.autograd.grad(out, (q, k, v), dout)[0]

    return step


def _attention_training_case(name: str, causal: bool, full: Sizes, quick: Sizes, target: Target = Target(),
                             dtype: torch.dtype = torch.float32, deterministic: Optional[bool] = None,
                             devices: tuple[str, ...] = ("cpu", "cuda")) -> Case:
    """Attention forward plus backward (gradients of q, k and v) in ``dtype``, beside PyTorch's
    scaled_dot_product_attention and its backward. Flops: the forward's 2 matrix products and
    the backward's 5 (recomputed scores, dP, dV, dK, dQ), 2 l s e each (half when causal)."""
    size = dtype.itemsize
    return Case(
        name=name,
        shape=_attention_shape(dtype),
        inputs=lambda device, **shape: _qkv_dout(device, **shape, dtype=dtype),
        genkernels=_training_step(scaled_dot_product_attention, causal, deterministic=deterministic),
        reference=_training_step(torch.nn.functional.scaled_dot_product_attention, causal),
        # Forward: q, k, v read, out written (2l + 2s rows); backward: q, k, v, out, dout read and
        # dq, dk, dv written (4l + 4s rows).
        bytes_moved=lambda b, h, l, s, e: size * b * h * e * (6 * l + 6 * s),
        flops=lambda b, h, l, s, e: 14.0 * b * h * l * s * e * (0.5 if causal else 1.0),
        full=full,
        quick=quick,
        tiny=dict(b=1, h=1, l=4, s=4, e=4),
        target=target,
        compile=dtype == torch.float32,
        devices=devices,
    )


BF16_FULL, BF16_QUICK = dict(b=4, h=16, l=2048, s=2048, e=128), dict(b=1, h=2, l=128, s=128, e=64)

CASES: list[Case] = [
    Case(
        name="reparameterize",
        shape="({n},)",
        inputs=_mu_logvar,
        genkernels=lambda mu, logvar: reparameterize(mu, logvar),
        reference=lambda mu, logvar: mu + torch.exp(0.5 * logvar) * torch.randn_like(mu),
        bytes_moved=lambda n: 3 * F32 * n,
        full=dict(n=16 * MI),
        quick=dict(n=64 * 1024),
        tiny=dict(n=16),
        target=Target(speedup=8, bandwidth=0.5),
        exact=False,
    ),
    Case(
        name="randn_like",
        shape="({n},)",
        inputs=lambda device, n: (torch.empty(n, device=device),),
        genkernels=lambda x: randn_like(x),
        reference=lambda x: torch.randn_like(x),
        bytes_moved=lambda n: F32 * n,
        full=dict(n=16 * MI),
        quick=dict(n=64 * 1024),
        tiny=dict(n=16),
        target=Target(speedup=4),
        exact=False,
    ),
    Case(
        name="sinusoidal_table",
        shape="({n},) -> ({n}, {dim})",
        inputs=_positions,
        genkernels=lambda positions, dim: sinusoidal_encoding(positions, dim),
        reference=lambda positions, dim: reference.sinusoidal_encoding(positions, dim),
        bytes_moved=lambda n, dim: I64 * n + F32 * n * dim,
        full=dict(n=8192, dim=1024),
        quick=dict(n=256, dim=256),
        tiny=dict(n=2, dim=8),
        target=Target(speedup=4),
    ),
    Case(
        name="add_positional_encoding",
        shape="({b}, {l}, {d})",
        inputs=_sequences,
        genkernels=lambda x: add_positional_encoding(x),
        reference=lambda x: reference.add_positional_encoding(x),
        bytes_moved=lambda b, l, d: 2 * F32 * b * l * d,
        full=dict(b=8, l=1024, d=1024),
        quick=dict(b=2, l=64, d=256),
        tiny=dict(b=1, l=4, d=4),
    ),
    Case(
        name="gaussian_kl_sum",
        shape="({n},) -> ()",
        inputs=_mu_logvar,
        genkernels=lambda mu, logvar: gaussian_kl(mu, logvar, reduction="sum"),
        reference=lambda mu, logvar: reference.gaussian_kl(mu, logvar, reduction="sum"),
        bytes_moved=lambda n: 2 * F32 * n + F32,
        full=dict(n=16 * MI),
        quick=dict(n=64 * 1024),
        tiny=dict(n=16),
    ),
    Case(
        # diffusers' get_timestep_embedding as used by the Stable Diffusion UNet
        name="timestep_embedding",
        shape="({n},) -> ({n}, {dim})",
        inputs=_timesteps,
        genkernels=lambda t, dim: sinusoidal_encoding(t, dim, layout="concat", flip_sin_to_cos=True),
        reference=lambda t, dim: reference.sinusoidal_encoding(t, dim, layout="concat", flip_sin_to_cos=True),
        bytes_moved=lambda n, dim: I64 * n + F32 * n * dim,
        full=dict(n=256, dim=320),
        quick=dict(n=256, dim=320),
        tiny=dict(n=1, dim=16),
    ),
    Case(
        name="q_sample",
        shape="({b}, {c}, {hw}, {hw})",
        inputs=lambda device, b, c, hw: (_latents(device, b, c, hw)[1], torch.randint(0, 1000, (b,), device=device)),
        genkernels=lambda x0, t: q_sample(x0, t, _scheduler("genkernels", "DDPM").schedule)[0],
        reference=_noised_baseline,
        bytes_moved=lambda b, c, hw: 3 * F32 * b * c * hw * hw,  # x0 read; x_t and the noise written
        full=dict(b=64, c=4, hw=64),
        quick=dict(b=2, c=4, hw=16),
        tiny=dict(b=1, c=1, hw=4),
        target=Target(speedup=3, bandwidth=0.5),
        exact=False,
    ),
    _diffusion_case("ddpm_step", "DDPM", Target(speedup=5, bandwidth=0.5)),
    _diffusion_case("ddim_step", "DDIM", Target(speedup=2, bandwidth=0.5)),
    _diffusion_case("dpm_solver_step", "DPMSolverMultistep", Target(speedup=2, bandwidth=0.5)),
    Case(
        # The scheduler's share of a whole sampling loop beside diffusers': per-step overhead
        # matters once the denoiser is cheap.
        name="ddim_loop",
        shape="{steps} steps, ({b}, {c}, {hw}, {hw}), 1x1-conv denoiser",
        inputs=_denoiser_and_latents,
        genkernels=_ddim_loop("genkernels"),
        reference=_ddim_loop("diffusers"),
        common=lambda denoiser, x, steps: [denoiser(x) for _ in range(steps)],
        bytes_moved=lambda b, c, hw, steps: 0,  # a loop's time includes its denoiser's: no bandwidth
        full=dict(b=4, c=4, hw=64, steps=50),
        quick=dict(b=1, c=4, hw=8, steps=5),
        tiny=dict(b=1, c=1, hw=4, steps=1),
        compile=False,
    ),
    _attention_case("attention", False, dict(b=4, h=12, l=1024, s=1024, e=64), dict(b=1, h=2, l=128, s=128, e=64), Target(speedup=1.0)),
    _attention_case("attention_causal", True, dict(b=4, h=12, l=1024, s=1024, e=64), dict(b=1, h=2, l=128, s=128, e=64), Target(speedup=1.8)),
    _attention_case("attention_causal_long", True, dict(b=1, h=16, l=4096, s=4096, e=64), dict(b=1, h=2, l=256, s=256, e=64), Target(speedup=1.8)),
    _attention_case("attention_decode", False, dict(b=8, h=12, l=1, s=2048, e=64), dict(b=2, h=2, l=1, s=256, e=64), Target(speedup=3.0, bandwidth=0.6)),
    _attention_training_case("attention_train", False, dict(b=4, h=12, l=1024, s=1024, e=64), dict(b=1, h=2, l=128, s=128, e=64), Target(speedup=1.0)),
    _attention_training_case("attention_train_causal", True, dict(b=4, h=12, l=1024, s=1024, e=64), dict(b=1, h=2, l=128, s=128, e=64), Target(speedup=1.6)),
    # bfloat16 at a GPU-sized shape: tensor cores on CUDA, beside PyTorch's flash backend there.
    _attention_case("attention_bf16", False, BF16_FULL, BF16_QUICK, dtype=torch.bfloat16),
    _attention_case("attention_causal_bf16", True, BF16_FULL, BF16_QUICK, dtype=torch.bfloat16),
    _attention_training_case("attention_train_bf16", False, BF16_FULL, BF16_QUICK, dtype=torch.bfloat16),
    _attention_training_case("attention_train_causal_bf16", True, BF16_FULL, BF16_QUICK, dtype=torch.bfloat16),
    # CUDA's backward without atomics, beside the fused default above (the CPU has only one).
    _attention_training_case("attention_train_bf16_deterministic", False, BF16_FULL, BF16_QUICK, dtype=torch.bfloat16,
                             deterministic=True, devices=("cuda",)),
]
"""The op benchmarks, in the order they are run and printed."""

def _twin_models(device: torch.device, build: Callable[[str], torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same model on the genkernels and the torch backend, with the same weights."""
    torch.manual_seed(0)
    fast, slow = build("genkernels").to(device), build("torch").to(device)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def _gpt_config(d: int, layers: int, l: int):
    from .models import GPTConfig

    return GPTConfig(vocab_size=96, block_size=l, n_layer=layers, n_head=4, d_model=d)


def _optimizer_step(optimizer: torch.optim.Optimizer, loss_of: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """One optimisation step of the loss ``loss_of()``."""
    def step() -> Tensor:
        loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _cpu_rand(*shape: int) -> Tensor:
    return torch.rand(*shape, generator=_generator(torch.device("cpu")))


def _gpt_train_inputs(device: torch.device, b: int, l: int, d: int, layers: int) -> tuple:
    """One AdamW step of each GPT on the same batch of ``b`` sequences of ``l`` tokens."""
    from .models import GPT

    idx = torch.randint(0, 96, (b, l + 1), generator=_generator(torch.device("cpu"))).to(device)
    return tuple(_optimizer_step(torch.optim.AdamW(model.parameters(), lr=1e-4),
                                 lambda model=model: model(idx[:, :-1], idx[:, 1:])[1])
                 for model in _twin_models(device, lambda backend: GPT(_gpt_config(d, layers, l), backend=backend)))


def _gpt_generate_inputs(device: torch.device, b: int, prompt: int, new: int, d: int, layers: int) -> tuple:
    """Greedy generation of ``new`` tokens after ``b`` prompts of ``prompt`` tokens, KV-cached."""
    from .models import GPT

    idx = torch.randint(0, 96, (b, prompt), generator=_generator(torch.device("cpu"))).to(device)
    models = _twin_models(device, lambda backend: GPT(_gpt_config(d, layers, prompt + new), backend=backend).eval())
    return tuple((lambda model=model: model.generate(idx, new, temperature=0)) for model in models)


def _image_train_inputs(device: torch.device, kind: str, b: int) -> tuple:
    """One optimisation step of the demo's VAE (8x8 digits) or GAN (16x16, both players)."""
    from .models import GAN, VAE, GANConfig, VAEConfig

    if kind == "vae":
        x = _cpu_rand(b, 1, 8, 8).to(device)
        return tuple(_optimizer_step(torch.optim.Adam(model.parameters(), lr=1e-4), lambda model=model: model(x))
                     for model in _twin_models(device, lambda backend: VAE(VAEConfig(), backend=backend)))
    real = _cpu_rand(b, 1, 16, 16).to(device) * 2 - 1

    def gan_loss(model) -> Tensor:
        fake = model(model.noise(real.shape[0]))
        return model.discriminator_loss(real, fake) + model.generator_loss(fake)

    return tuple(_optimizer_step(torch.optim.Adam(model.parameters(), lr=1e-4), lambda model=model: gan_loss(model))
                 for model in _twin_models(device, lambda backend: GAN(GANConfig(), backend=backend)))


def _diffusion_sample_inputs(device: torch.device, n: int, steps: int, channels: int = 64, latent: bool = False) -> tuple:
    """Class-conditional DDIM sampling with guidance (the demos' configurations, random weights)."""
    from .models import VAE, DiffusionConfig, DiffusionModel, LatentDiffusion, VAEConfig

    def build(backend: str) -> torch.nn.Module:
        if latent:
            return LatentDiffusion.from_vae(VAE(VAEConfig(), backend=backend))
        return DiffusionModel(DiffusionConfig(channels=channels), backend=backend)

    labels = (torch.arange(n) % 10).to(device)
    return tuple((lambda model=model: model.sample(n, labels, 3.0, "ddim", steps, _generator(device)))
                 for model in _twin_models(device, lambda backend: build(backend).eval()))


def _model_case(name: str, shape: str, inputs: Callable[..., tuple], items: tuple[str, Callable[..., float]],
                full: Sizes, quick: Sizes, target: Target = Target()) -> Case:
    """A whole model on the genkernels backend (``inputs``' first callable) against the same model
    on the torch backend (its second), timed per call; no compiled variant or byte count."""
    return Case(
        name=name, shape=shape, inputs=inputs, genkernels=lambda fast, slow: fast(), reference=lambda fast, slow: slow(),
        bytes_moved=lambda **size: 0, full=full, quick=quick, compile=False, target=target, exact=False, items=items,
    )


MODEL_CASES: list[Case] = [
    _model_case("gpt_train_step", "B{b} L{l} D{d} x{layers} layers", _gpt_train_inputs, ("steps", lambda **s: 1),
                dict(b=16, l=128, d=128, layers=4), dict(b=2, l=16, d=32, layers=1)),
    _model_case("gpt_generate", "B{b} prompt {prompt} + {new} new, D{d} x{layers} layers", _gpt_generate_inputs,
                ("tokens", lambda b, new, **s: b * new), dict(b=1, prompt=16, new=112, d=128, layers=4),
                dict(b=2, prompt=4, new=8, d=32, layers=1), Target(speedup=1.5)),
    _model_case("gpt_generate_batch", "B{b} prompt {prompt} + {new} new, D{d} x{layers} layers", _gpt_generate_inputs,
                ("tokens", lambda b, new, **s: b * new), dict(b=8, prompt=16, new=112, d=128, layers=4),
                dict(b=2, prompt=4, new=8, d=32, layers=1), Target(speedup=1.5)),
    _model_case("diffusion_sample", "{n} images 8x8, DDIM {steps} steps, guided, C{channels}",
                _diffusion_sample_inputs, ("images", lambda n, **s: n),
                dict(n=20, steps=50, channels=64), dict(n=2, steps=2, channels=8), Target(speedup=1.3)),
    _model_case("latent_diffusion_sample", "{n} images via 8-d latents, DDIM {steps} steps, guided",
                lambda device, n, steps: _diffusion_sample_inputs(device, n, steps, latent=True), ("images", lambda n, **s: n),
                dict(n=20, steps=50), dict(n=2, steps=2), Target(speedup=1.3)),
    _model_case("vae_train_step", "B{b} 8x8", lambda device, b: _image_train_inputs(device, "vae", b),
                ("steps", lambda **s: 1), dict(b=128), dict(b=4)),
    _model_case("gan_train_step", "B{b} 16x16", lambda device, b: _image_train_inputs(device, "gan", b),
                ("steps", lambda **s: 1), dict(b=64), dict(b=4)),
]
"""Whole-model benchmarks, run with ``--models``: each model (the demos' configurations) on the
genkernels backend against the torch backend: training steps, generated tokens and sampled
images per second."""


def select_cases(name_filter: Optional[str] = None, models: bool = False) -> list[Case]:
    """The cases to run: `CASES` (and `MODEL_CASES` with ``models``) whose name contains
    ``name_filter`` (case-insensitive)."""
    cases = CASES + (MODEL_CASES if models else [])
    if name_filter:
        cases = [c for c in cases if name_filter.lower() in c.name.lower()]
    return cases


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How to time: the device, the scale of the inputs, repeats and the length of warm-up and
    of one repeat."""

    device: torch.device
    quick: bool = False
    repeat: int = 10
    compile: bool = True
    warmup_s: float = 0.2  # warm up for at least this long (and at least two calls)
    batch_s: float = 0.02  # run enough calls back to back for one repeat to last this long

    @classmethod
    def make(cls, device: torch.device, *, quick: bool, repeat: Optional[int] = None, compile: Optional[bool] = None) -> "Settings":
        """The standard settings of a full or a ``quick`` run, with ``repeat`` and ``compile`` as
        given (default: 10 repeats and compilation for a full run, 3 and none for a quick one)."""
        return cls(
            device=device,
            quick=quick,
            repeat=repeat if repeat is not None else (3 if quick else 10),
            compile=compile if compile is not None else not quick,
            warmup_s=0.005 if quick else 0.2,
            batch_s=0.001 if quick else 0.02,
        )


@dataclass(frozen=True)
class Timing:
    """Per-call time of a function: minimum and median over ``repeats`` repeats of ``number``
    back-to-back calls each."""

    min_ms: float
    median_ms: float
    repeats: int
    number: int


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bind(fn: Callable[..., Any], args: Sequence[Any], device: Optional[torch.device] = None) -> Callable[[], Any]:
    """``fn(*args)`` as a function of no arguments; given a ``device``, the function returns only
    once the device has finished (for timers that do not synchronise themselves)."""

    def call() -> Any:
        out = fn(*args)
        if device is not None:
            synchronize(device)
        return out

    return call


def measure(fn: Callable[[], Any], settings: Settings) -> Timing:
    """Times ``fn()`` on ``settings.device``: warms up for ``settings.warmup_s`` and at least two
    calls, picks the calls per repeat from the fastest warm-up call so that a repeat lasts about
    ``settings.batch_s``, then times ``settings.repeat`` repeats with the garbage collector off.
    On CUDA the device is synchronised before each repeat and the repeat is timed with events
    recorded around its calls."""
    device = settings.device
    warmup_calls, fastest = 0, math.inf
    start = time.perf_counter()
    while warmup_calls < 2 or time.perf_counter() - start < settings.warmup_s:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - t0)
        warmup_calls += 1
    number = max(1, min(1_000_000, math.ceil(settings.batch_s / max(fastest, 1e-9))))

    cuda = device.type == "cuda"
    times_ms = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(1, settings.repeat)):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                synchronize(device)
                begin.record()
                for _ in range(number):
                    fn()
                end.record()
                end.synchronize()
                times_ms.append(begin.elapsed_time(end) / number)
            else:
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                times_ms.append((time.perf_counter() - t0) * 1e3 / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(min(times_ms), statistics.median(times_ms), len(times_ms), number)


@dataclass(frozen=True)
class Ceilings:
    """What this machine can do at best: copy bandwidth (bytes read + written per second of
    ``dst.copy_(src)``) and float32 matrix-product rate, each the best of the repeats."""

    copy_bytes: int  # size of the copied tensor
    copy_gbps: float
    matmul_n: int  # n of the n x n @ n x n product
    matmul_gflops: float


def measure_ceilings(settings: Settings) -> Ceilings:
    """Measures the copy bandwidth on a 64 MiB float32 tensor (256 MiB on CUDA, to exceed the L2
    cache; 4 MiB with ``quick``) and the float32 matmul rate at n = 2048 (8192 on CUDA; 256
    with ``quick``)."""
    device = settings.device
    cuda = device.type == "cuda"
    copy_bytes = (4 if settings.quick else 256 if cuda else 64) * MI
    src = torch.rand(copy_bytes // F32, device=device)
    dst = torch.empty_like(src)
    copy = measure(bind(dst.copy_, (src,)), settings)
    del src, dst

    n = 256 if settings.quick else 8192 if cuda else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    mm = measure(lambda: torch.mm(a, b, out=c), settings)
    return Ceilings(
        copy_bytes=copy_bytes,
        copy_gbps=2 * copy_bytes / (copy.min_ms * 1e-3) / 1e9,
        matmul_n=n,
        matmul_gflops=2 * n**3 / (mm.min_ms * 1e-3) / 1e9,
    )


@dataclass
class CaseResult:
    """The figures of one case; derived figures are None where they cannot be computed."""

    name: str
    shape: str
    bytes: int
    flops: Optional[float]
    target: str
    genkernels: Optional[Timing] = None
    eager: Optional[Timing] = None
    compiled: Optional[Timing] = None
    compile_s: Optional[float] = None  # first call of the compiled reference: compilation + one run
    overhead_us: Optional[dict[str, float]] = None  # per call at the tiny size: genkernels, eager
    items: Optional[tuple[str, float]] = None  # (unit, count per call) of cases that report throughput
    common: Optional[Timing] = None  # the case's common part alone (Case.common)
    speedup_eager: Optional[float] = None
    speedup_compiled: Optional[float] = None
    gbps: Optional[float] = None
    bandwidth_fraction: Optional[float] = None  # gbps / copy bandwidth
    gflops: Optional[float] = None
    target_met: Optional[bool] = None
    notes: list[str] = field(default_factory=list)


def _compile(case: Case, args: tuple, settings: Settings) -> tuple[Optional[Callable[[], Any]], Optional[float], Optional[str]]:
    """``torch.compile(case.reference)`` bound to ``args``, compiled by one first call, with the
    time that call took; or a note saying why there is none."""
    if not (case.compile and settings.compile):
        return None, None, None
    try:
        call = bind(torch.compile(case.reference, dynamic=False), args)
        t0 = time.perf_counter()
        call()
        synchronize(settings.device)
        return call, time.perf_counter() - t0, None
    except Exception as exc:  # no C++ compiler, unsupported Python, an op inductor cannot lower, ...
        message = str(exc).strip().splitlines()
        return None, None, f"compile failed: {type(exc).__name__}: {message[0] if message else ''}"[:200]


def run_case(case: Case, settings: Settings, ceilings: Optional[Ceilings] = None) -> CaseResult:
    """Times one case (genkernels, eager reference, compiled reference, and the per-call
    overhead at the tiny size) and derives speed-ups, bandwidth and target."""
    size = case.size("quick" if settings.quick else "full")
    device = settings.device
    result = CaseResult(
        name=case.name,
        shape=case.shape.format(**size),
        bytes=int(case.bytes_moved(**size)),
        flops=float(case.flops(**size)) if case.flops is not None else None,
        target=str(case.target),
        items=(case.items[0], float(case.items[1](**size))) if case.items else None,
    )
    if device.type not in case.devices:
        result.notes.append(f"not run on {device.type}")
        return result

    args = case.inputs(device, **size)
    result.eager = measure(bind(case.reference, args), settings)
    try:
        result.genkernels = measure(bind(case.genkernels, args), settings)
    except Exception as exc:  # an op's missing feature (e.g. a backward pass not written yet)
        message = str(exc).strip().splitlines()
        result.notes.append(f"genkernels failed: {type(exc).__name__}: {message[0] if message else ''}"[:200])
        return result
    if case.common is not None:
        result.common = measure(bind(case.common, args), settings)
    compiled, result.compile_s, note = _compile(case, args, settings)
    if note:
        result.notes.append(note)
    if compiled is not None:
        result.compiled = measure(compiled, settings)
        dynamo = sys.modules.get("torch._dynamo")  # loaded by torch.compile
        if dynamo is not None:
            dynamo.reset()  # drop the compiled graphs and guards of this case
    del args, compiled

    if case.tiny is not None:
        tiny = case.inputs(device, **case.tiny)
        result.overhead_us = {
            "genkernels": measure(bind(case.genkernels, tiny), settings).min_ms * 1e3,
            "eager": measure(bind(case.reference, tiny), settings).min_ms * 1e3,
        }

    seconds = result.genkernels.min_ms * 1e-3
    result.speedup_eager = result.eager.min_ms / result.genkernels.min_ms
    if result.compiled is not None:
        result.speedup_compiled = result.compiled.min_ms / result.genkernels.min_ms
    if result.bytes:
        result.gbps = result.bytes / seconds / 1e9
    if ceilings is not None and result.gbps is not None:
        result.bandwidth_fraction = result.gbps / ceilings.copy_gbps
    if result.flops is not None:
        result.gflops = result.flops / seconds / 1e9
    if not settings.quick:  # the targets are for the full sizes
        result.target_met = case.target.met(result.speedup_eager, result.bandwidth_fraction)
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _allocator() -> str:
    """The process's malloc: a preloaded tcmalloc, jemalloc or mimalloc, else the C library's.
    CPU timings depend on it: glibc returns freed buffers of some MiB to the system, and a call
    whose outputs land on such memory again pays a page fault per 4 KiB of them."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    libc, _ = platform.libc_ver()
    return libc or "system"


def machine_info(device: torch.device) -> dict[str, Any]:
    """The CPU, thread count, GPU, malloc, software versions and ``genkernels.info()``."""
    from ._info import info

    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "allocator": _allocator(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "genkernels": info(),
    }


def _num(x: Optional[float], suffix: str = "") -> str:
    """Three significant figures (whole numbers from 1000 up); "-" for None."""
    if x is None:
        return "-"
    return (f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}") + suffix


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    """Plain-text table; the columns numbered in ``left`` are left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def print_header(machine: dict[str, Any], ceilings: Ceilings, settings: Settings, file=None) -> None:
    """Prints the machine and its measured ceilings."""
    file = file or sys.stdout
    where = machine["gpu"] or f"{machine['cpu']}, {machine['threads']} threads, {machine['allocator']} malloc"
    print(f"genkernels {machine['genkernels']['version']} bench on {settings.device} ({where}), torch {machine['torch']}", file=file)
    print(
        f"ceilings: copy {ceilings.copy_gbps:.1f} GB/s (read + write, {ceilings.copy_bytes // MI} MiB float32),"
        f" matmul {ceilings.matmul_gflops:.1f} GFLOP/s (float32, {ceilings.matmul_n}x{ceilings.matmul_n})",
        file=file,
        flush=True,
    )


def print_results(results: Sequence[CaseResult], settings: Settings, file=None) -> None:
    """Prints the table of the cases, the per-call overhead table and the notes."""
    file = file or sys.stdout
    rows = []
    for r in results:
        met = {None: "", True: "met", False: "MISSED"}[r.target_met]
        rows.append([
            r.name,
            r.shape,
            _num(r.genkernels and r.genkernels.min_ms),
            _num(r.eager and r.eager.min_ms),
            _num(r.speedup_eager, "x"),
            _num(r.compiled and r.compiled.min_ms),
            _num(r.speedup_compiled, "x"),
            _num(r.gbps),
            _num(r.bandwidth_fraction and 100 * r.bandwidth_fraction, "%"),
            _num(r.gflops),
            f"{r.target} {met}".strip(),
        ])
    headers = ["case", "shape", "genkernels ms", "eager ms", "vs eager", "compiled ms", "vs compiled",
               "GB/s", "% copy BW", "GFLOP/s", "target"]
    print(file=file)
    print(_table(headers, rows, left=(0, 1, 10)), file=file)
    print(
        f"\nms: minimum over {settings.repeat} repeats per call; vs eager / vs compiled: reference time /"
        " genkernels time; GB/s: inputs read once + outputs written once per genkernels time.",
        file=file,
    )
    if not settings.compile:
        print("compiled: not timed (on by default in full runs; --compile turns it on).", file=file)
    if settings.quick:
        print("targets: not checked at the --quick sizes.", file=file)

    throughput = [r for r in results if r.items]
    if throughput:
        rows = [[r.name, r.items[0], _num(r.genkernels and r.items[1] / (r.genkernels.min_ms * 1e-3)),
                 _num(r.items[1] / (r.eager.min_ms * 1e-3)), _num(r.speedup_eager, "x")] for r in throughput]
        print("\nmodels, genkernels backend against the torch backend (genkernels.reference ops), per second:", file=file)
        print(_table(["case", "unit", "genkernels", "torch", "ratio"], rows), file=file)

    shares = [r for r in results if r.common and r.genkernels]
    if shares:
        rows = [[r.name, _num(r.common.min_ms), _num(100 * (1 - r.common.min_ms / r.genkernels.min_ms), "%"),
                 _num(100 * (1 - r.common.min_ms / r.eager.min_ms), "%")] for r in shares]
        print("\nshare of each library's time outside the common part (a loop's denoiser, timed alone):", file=file)
        print(_table(["case", "common ms", "genkernels", "reference"], rows), file=file)

    overhead = [r for r in results if r.overhead_us]
    if overhead:
        rows = [[r.name, _num(r.overhead_us["genkernels"]), _num(r.overhead_us["eager"]),
                 _num(r.overhead_us["eager"] / r.overhead_us["genkernels"], "x")] for r in overhead]
        print("\nper-call overhead on tiny inputs (16 elements), microseconds:", file=file)
        print(_table(["case", "genkernels us", "eager us", "vs eager"], rows), file=file)

    notes = [f"{r.name}: {n}" for r in results for n in r.notes]
    if notes:
        print("\nnotes:", file=file)
        for n in notes:
            print(f"  {n}", file=file)


def report(machine: dict[str, Any], ceilings: Ceilings, settings: Settings, results: Sequence[CaseResult]) -> dict[str, Any]:
    """Everything measured, as written by ``--json``."""
    return {
        "machine": machine,
        "settings": {
            "device": str(settings.device),
            "quick": settings.quick,
            "repeat": settings.repeat,
            "compile": settings.compile,
            "statistic": "min",
        },
        "ceilings": asdict(ceilings),
        "cases": [asdict(r) for r in results],
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``python -m genkernels bench`` to ``parser``."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 3 repeats and no torch.compile: a smoke test in seconds")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every figure to PATH as JSON")
    parser.add_argument("--filter", metavar="SUBSTRING", default=None,
                        help="run only the cases whose name contains SUBSTRING (case-insensitive)")
    parser.add_argument("--repeat", metavar="N", type=int, default=None,
                        help="timed repeats per measurement (default: 10, or 3 with --quick)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile of the references (default: on, off with --quick)")
    parser.add_argument("--models", action="store_true", help="also run the whole-model benchmarks")


def run(args: argparse.Namespace) -> int:
    """Runs ``python -m genkernels bench`` with parsed ``args``; returns the exit status (0: ran;
    1: no case matched; 2: the device cannot be used)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("genkernels bench: --device cuda, but CUDA is not available to torch", file=sys.stderr)
        return 2
    if args.repeat is not None and args.repeat < 1:
        print("genkernels bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    cases = select_cases(args.filter, args.models)
    if not cases:
        print(f"genkernels bench: no case matches {args.filter!r}", file=sys.stderr)
        return 1

    settings = Settings.make(device, quick=args.quick, repeat=args.repeat, compile=args.compile)
    started = time.perf_counter()
    machine = machine_info(device)
    ceilings = measure_ceilings(settings)
    print_header(machine, ceilings, settings)
    results = []
    for case in cases:
        print(f"  timing {case.name} ...", file=sys.stderr, flush=True)
        results.append(run_case(case, settings, ceilings))
    print_results(results, settings)
    print(f"\nbench took {time.perf_counter() - started:.1f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report(machine, ceilings, settings, results), f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0
