"""genkernels: hand-written CUDA kernels and fast CPU kernels for the building blocks of
generative models, as drop-in PyTorch ops (``torch.ops.genkernels.*``)."""

from __future__ import annotations

from . import diffusion, reference, schedulers
from ._backend import emulated_cuda
from ._info import info
from .attention import attention_dropout_mask, attention_with_kvcache, merge_attention, scaled_dot_product_attention
from .diffusion import NoiseSchedule, ddim_step, ddpm_step, dpm_solver_step, q_sample
from .positional import add_positional_encoding, sinusoidal_encoding
from .sampling import gaussian_kl, randn, randn_like, reparameterize
from ._C import __version__

__all__ = [
    "__version__",
    "NoiseSchedule",
    "add_positional_encoding",
    "attention_dropout_mask",
    "attention_with_kvcache",
    "ddim_step",
    "ddpm_step",
    "diffusion",
    "dpm_solver_step",
    "emulated_cuda",
    "gaussian_kl",
    "info",
    "merge_attention",
    "q_sample",
    "randn",
    "randn_like",
    "reference",
    "reparameterize",
    "scaled_dot_product_attention",
    "schedulers",
    "sinusoidal_encoding",
]
