"""LatentDiffusion: diffusion in the latent space of a trained VAE (Rombach et al. 2022).

The VAE, trained first and then frozen, encodes images to latents (a reparameterised sample of
q(z|x), divided by ``latent_scale`` so that they have unit variance, as Stable Diffusion's 0.18215
does); a `DiffusionModel` learns those latents, and its samples are decoded back to images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .diffusion import DiffusionConfig, DiffusionModel
from .vae import VAE, VAEConfig


@dataclass
class LatentDiffusionConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(
        default_factory=lambda: DiffusionConfig(sample_shape=(VAEConfig().latent_dim,), channels=128, clip_sample=4.0))

    def __post_init__(self) -> None:  # nested dicts from a checkpoint become configs again
        if isinstance(self.vae, dict):
            self.vae = VAEConfig(**self.vae)
        if isinstance(self.diffusion, dict):
            self.diffusion = DiffusionConfig(**self.diffusion)
        if self.diffusion.sample_shape != (self.vae.latent_dim,):
            raise ValueError(f"diffusion.sample_shape must be ({self.vae.latent_dim},), the VAE's latents, got {self.diffusion.sample_shape}")


class LatentDiffusion(nn.Module):
    """A frozen `VAE` and a `DiffusionModel` over its latents."""

    def __init__(self, config: LatentDiffusionConfig, backend: str = "genkernels") -> None:
        super().__init__()
        self.config = config
        self.vae = VAE(config.vae, backend=backend)
        self.vae.requires_grad_(False)
        self.diffusion = DiffusionModel(config.diffusion, backend=backend)
        self.register_buffer("latent_scale", torch.ones(()))

    @classmethod
    def from_vae(cls, vae: VAE, diffusion: Optional[DiffusionConfig] = None) -> "LatentDiffusion":
        """A latent diffusion model around the trained ``vae`` (its weights are copied)."""
        diffusion = diffusion or DiffusionConfig(sample_shape=(vae.config.latent_dim,), channels=128, clip_sample=4.0)
        model = cls(LatentDiffusionConfig(VAEConfig(**asdict(vae.config)), diffusion), backend=vae.backend)
        model.vae.load_state_dict(vae.state_dict())
        return model.to(next(vae.parameters()).device)

    @property
    def backend(self) -> str:
        return self.diffusion.backend

    @torch.no_grad()
    def encode(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Scaled latents ``(B, latent_dim)`` of images ``x``: a sample of q(z|x) / latent_scale."""
        mu, logvar = self.vae.encode(x)
        return self.vae.ops.reparameterize(mu, logvar, generator=generator) / self.latent_scale

    @torch.no_grad()
    def fit_latent_scale(self, x: Tensor) -> float:
        """Sets ``latent_scale`` to the standard deviation of the latents of ``x``; returns it."""
        self.latent_scale.fill_(1.0)
        self.latent_scale.fill_(self.encode(x).std())
        return float(self.latent_scale)

    def loss(self, x: Tensor, labels: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """The diffusion loss of the latents of images ``x``."""
        return self.diffusion.loss(self.encode(x, generator), labels, generator)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The training loss of ``x`` (see `loss`)."""
        return self.loss(x, labels)

    @torch.no_grad()
    def sample(self, n: int, labels: Optional[Tensor] = None, guidance_scale: float = 3.0, sampler: str = "ddim",
               num_inference_steps: int = 50, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` images: latents sampled as `DiffusionModel.sample` does, decoded by the VAE."""
        z = self.diffusion.sample(n, labels, guidance_scale, sampler, num_inference_steps, generator)
        return self.vae.decode(z * self.latent_scale)
