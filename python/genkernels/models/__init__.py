"""Generative models composed from the genkernels ops: `GPT`, `VAE`, `GAN`, `DiffusionModel` and
`LatentDiffusion`.

Each model is a ``torch.nn.Module`` built from a config dataclass and a ``backend``:
``"genkernels"`` (default; our custom ops) or ``"torch"`` (the pure-PyTorch ops of
`genkernels.reference`). For the same weights and seeds both backends give the same results
within floating-point tolerance. `save_checkpoint` and `load_checkpoint` store a model with its
config and any extra state (optimizer, step, losses).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Union

import torch
from torch import nn

from ._ops import BACKENDS
from .diffusion import DiffusionConfig, DiffusionModel
from .gan import GAN, GANConfig
from .gpt import GPT, GPTConfig
from .latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from .vae import VAE, VAEConfig

MODELS: dict[str, tuple[type[nn.Module], type]] = {
    "GPT": (GPT, GPTConfig), "VAE": (VAE, VAEConfig), "GAN": (GAN, GANConfig),
    "DiffusionModel": (DiffusionModel, DiffusionConfig), "LatentDiffusion": (LatentDiffusion, LatentDiffusionConfig),
}
"""Model class and config class by class name (what a checkpoint records)."""

PathLike = Union[str, "os.PathLike[str]"]


def save_checkpoint(model: nn.Module, path: PathLike, **extra: Any) -> None:
    """Writes ``model``'s class, config and weights, and ``extra`` entries, to ``path``."""
    state = {"model": type(model).__name__, "config": dataclasses.asdict(model.config), "state_dict": model.state_dict(), **extra}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def load_checkpoint(path: PathLike, backend: str = "genkernels", map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model saved at ``path`` (on ``map_location``, with ``backend``) and the checkpoint's
    other entries."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    cls, config_cls = MODELS[state.pop("model")]
    model = cls(config_cls(**state.pop("config")), backend=backend)
    model.load_state_dict(state.pop("state_dict"))
    return model, state


__all__ = [
    "BACKENDS", "DiffusionConfig", "DiffusionModel", "GAN", "GANConfig", "GPT", "GPTConfig", "LatentDiffusion",
    "LatentDiffusionConfig", "MODELS", "VAE", "VAEConfig", "load_checkpoint", "save_checkpoint",
]
