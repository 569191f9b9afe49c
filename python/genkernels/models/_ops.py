"""The ops a model calls, from one of two backends: ``"genkernels"`` (our custom ops,
``torch.ops.genkernels.*``) or ``"torch"`` (the pure-PyTorch definitions of
`genkernels.reference`).

Both backends draw noise from the same Philox4x32-10 stream with seeds taken from the same
``torch.Generator`` calls, so a model gives the same samples on either backend for the same
weights and seeds; only floating-point rounding differs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import attention, positional, reference, sampling
from .._rng import draw_seed
from ..diffusion import NoiseSchedule, q_sample
from ..schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

Scheduler = Union[DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler]

BACKENDS = ("genkernels", "torch")


def check_backend(backend: str) -> str:
    """``backend`` if it names a backend, else a ValueError listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def _philox_normal(shape: Sequence[int], seed: Tensor, dtype: torch.dtype) -> Tensor:
    """The normals the kernels draw for ``seed`` = [key, offset] (int64 tensor), in pure PyTorch,
    with the key and offset kept as tensors so that no value leaves the graph."""
    return reference.normal(math.prod(shape), seed[0], seed[1], dtype).reshape(shape)


class Ops:
    """The model-facing ops of one backend. Models hold one of these (``self.ops``) and call
    nothing else for the operations genkernels provides."""

    def __init__(self, backend: str) -> None:
        self.backend = check_backend(backend)
        self.fast = backend == "genkernels"

    def add_positional_encoding(self, x: Tensor, *, offset: int = 0, x_scale: float = 1.0) -> Tensor:
        """``x * x_scale + PE[offset : offset + L]`` for ``x`` of shape ``(..., L, D)``."""
        if self.fast:
            return positional.add_positional_encoding(x, offset=offset, x_scale=x_scale)
        return reference.add_positional_encoding(x, offset=offset, x_scale=x_scale)

    def sinusoidal_encoding(self, positions: Tensor, dim: int, **kwargs) -> Tensor:
        """The sinusoidal table of ``positions``: ``positions.shape + (dim,)``."""
        fn = positional.sinusoidal_encoding if self.fast else reference.sinusoidal_encoding
        return fn(positions, dim, **kwargs)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
        """Self-attention of ``(B, H, L, E)`` queries, keys and values, causal (top-left) or not."""
        if self.fast:
            return attention.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return reference.scaled_dot_product_attention(q, k, v, is_causal=causal)[0]

    def attention_with_kvcache(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Writes ``k``/``v`` ``(B, H, L_new, E)`` into the caches at each sequence's length, then
        lets ``q`` attend causally (bottom-right) to the ``cache_seqlens[b] + L_new`` valid keys."""
        if self.fast:
            return attention.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, key=k, value=v)
        kv_lens = reference.kvcache_append(k_cache, v_cache, cache_seqlens, k, v)
        out, _ = reference.scaled_dot_product_attention(
            q, k_cache, v_cache, is_causal=True, causal_alignment="bottom_right", kv_lens=kv_lens
        )
        return out

    def randn(self, *shape: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
              device: torch.device = torch.device("cpu")) -> Tensor:
        """Standard normal noise of ``shape`` from the Philox stream."""
        if self.fast:
            return sampling.randn(*shape, generator=generator, dtype=dtype, device=device)
        return _philox_normal(shape, draw_seed(generator, torch.device(device)), dtype)

    def reparameterize(self, mu: Tensor, logvar: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """``mu + exp(logvar / 2) * eps``, ``eps`` from the Philox stream."""
        if self.fast:
            return sampling.reparameterize(mu, logvar, generator=generator)
        eps = _philox_normal(mu.shape, draw_seed(generator, mu.device), mu.dtype)
        return reference.reparameterize(mu, logvar, eps)

    def gaussian_kl(self, mu: Tensor, logvar: Tensor, reduction: str = "batchmean") -> Tensor:
        """KL divergence of ``N(mu, exp(logvar))`` to ``N(0, I)``."""
        fn = sampling.gaussian_kl if self.fast else reference.gaussian_kl
        return fn(mu, logvar, reduction=reduction)

    def q_sample(self, x0: Tensor, t: Tensor, schedule: NoiseSchedule, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``(x_t, noise)``: ``x0`` noised to the timesteps ``t`` ``(B,)`` of ``schedule``."""
        if self.fast:
            return q_sample(x0, t, schedule, generator=generator)
        noise = _philox_normal(x0.shape, draw_seed(generator, x0.device), x0.dtype)
        x_t, _ = reference.q_sample(x0, t, schedule.alphas_cumprod.double(), noise)
        return x_t.to(x0.dtype), noise

    def scheduler_step(self, scheduler: Scheduler, model_output: Union[Tensor, tuple[Tensor, Tensor]],
                       t: Tensor, sample: Tensor, guidance_scale: Optional[float] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """``x_{t_prev}`` from ``sample`` at timesteps ``t`` ``(B,)``: one step of ``scheduler``
        (DDPM, deterministic DDIM or DPM-Solver++(2M)), with classifier-free guidance when ``model_output`` is
        ``(uncond, cond)``.

        DDIM recomputes the noise from the clipped x0 (``use_clipped_model_output``): at the
        first, nearly pure-noise timesteps the x0 prediction is clipped hard, and stepping with
        the unclipped noise beside it left grainy samples (39% recognised as the requested
        digit against 100% with the recomputed noise, same model)."""
        if self.fast:
            extra = {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
            return scheduler.step(model_output, t, sample, generator=generator, guidance_scale=guidance_scale, **extra).prev_sample
        if not isinstance(model_output, Tensor):
            model_output = reference.guided(model_output[0], model_output[1], guidance_scale)
        config = scheduler.config
        abar = scheduler.schedule.alphas_cumprod.double()
        t_prev = scheduler.previous_timestep(t).to(sample.device)
        clip = config.clip_sample_range if getattr(config, "clip_sample", False) else None
        if isinstance(scheduler, DDPMScheduler):
            noise = _philox_normal(sample.shape, draw_seed(generator, sample.device), sample.dtype)
            prev, _ = reference.ddpm_step(model_output, t, t_prev, sample, abar, noise, prediction_type=config.prediction_type,
                                          variance_type=scheduler.variance_type, clip=clip)
        elif isinstance(scheduler, DPMSolverMultistepScheduler):
            prev_x0 = scheduler.previous_x0()
            prev_x0_t = None if prev_x0 is None else scheduler.timestep_before(t).to(sample.device)
            prev, x0 = reference.dpm_solver_step(model_output, t, t_prev, sample, abar, prev_x0=prev_x0, prev_x0_t=prev_x0_t,
                                                 algorithm_type=config.algorithm_type, solver_type=config.solver_type,
                                                 prediction_type=config.prediction_type, final_sigmas_type=config.final_sigmas_type,
                                                 euler_at_final=scheduler.euler_at_final, clip=clip)
            scheduler.record(x0, t)
        else:
            final = 1.0 if config.set_alpha_to_one else float(abar[0])
            prev, _ = reference.ddim_step(model_output, t, t_prev, sample, abar, torch.zeros_like(sample),
                                          prediction_type=config.prediction_type, clip=clip, final=final,
                                          use_clipped_model_output=True)
        return prev.to(sample.dtype)
