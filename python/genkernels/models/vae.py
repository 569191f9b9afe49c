"""VAE: a variational autoencoder (Kingma & Welling 2014) for small images.

An MLP encoder gives the mean and log-variance of q(z|x), `reparameterize` draws z, and an MLP
decoder gives Bernoulli logits for each pixel (images scaled to [0, 1]). The loss is the
negative ELBO, reconstruction + beta * `gaussian_kl`, in nats per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._ops import Ops


@dataclass
class VAEConfig:
    image_size: int = 8  # square, one channel
    latent_dim: int = 8
    hidden: int = 256
    beta: float = 1.0  # weight of the KL term (1: the ELBO)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.SiLU()]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


class VAE(nn.Module):
    """Images ``(B, 1, S, S)`` in [0, 1] to a ``latent_dim`` Gaussian latent and back."""

    def __init__(self, config: VAEConfig, backend: str = "genkernels") -> None:
        super().__init__()
        self.config = config
        self.ops = Ops(backend)
        pixels = config.image_size**2
        self.encoder = _mlp([pixels, config.hidden, config.hidden, 2 * config.latent_dim])
        self.decoder = _mlp([config.latent_dim, config.hidden, config.hidden, pixels])

    @property
    def backend(self) -> str:
        return self.ops.backend

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``(B, latent_dim)``."""
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=-1)
        return mu, logvar

    def decode_logits(self, z: Tensor) -> Tensor:
        """Bernoulli logits ``(B, 1, S, S)`` of the pixels given latents ``z``."""
        size = self.config.image_size
        return self.decoder(z).view(-1, 1, size, size)

    def decode(self, z: Tensor) -> Tensor:
        """Mean images ``(B, 1, S, S)`` in [0, 1] for latents ``z``."""
        return torch.sigmoid(self.decode_logits(z))

    def loss(self, x: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``reconstruction + beta * KL`` per image, averaged over the batch, and its two terms
        (with beta = 1 the loss is the negative ELBO, an upper bound on -log p(x) in nats)."""
        mu, logvar = self.encode(x)
        z = self.ops.reparameterize(mu, logvar, generator=generator)
        reconstruction = F.binary_cross_entropy_with_logits(self.decode_logits(z), x, reduction="sum") / x.shape[0]
        kl = self.ops.gaussian_kl(mu, logvar, reduction="batchmean")
        return reconstruction + self.config.beta * kl, {"reconstruction": reconstruction, "kl": kl}

    def forward(self, x: Tensor) -> Tensor:
        """The training loss of ``x`` (see `loss`)."""
        return self.loss(x)[0]

    @torch.no_grad()
    def negative_elbo(self, x: Tensor, generator: Optional[torch.Generator] = None) -> float:
        """Mean negative ELBO of ``x`` in nats per image (reconstruction + KL, beta = 1)."""
        _, terms = self.loss(x, generator)
        return float(terms["reconstruction"] + terms["kl"])

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` images ``(n, 1, S, S)``: decoder means at latents drawn from the prior."""
        weight = self.decoder[0].weight
        z = self.ops.randn(n, self.config.latent_dim, generator=generator, dtype=weight.dtype, device=weight.device)
        return self.decode(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder means at the posterior means of ``x``."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def interpolate(self, x1: Tensor, x2: Tensor, steps: int) -> Tensor:
        """``steps`` images ``(steps, 1, S, S)`` decoded along the line between the posterior
        means of the images ``x1`` and ``x2`` (each ``(1, S, S)`` or ``(1, 1, S, S)``)."""
        mu = self.encode(torch.stack([x1.reshape(x1.shape[-3:]), x2.reshape(x2.shape[-3:])]))[0]
        t = torch.linspace(0, 1, steps, dtype=mu.dtype, device=mu.device)[:, None]
        return self.decode((1 - t) * mu[0] + t * mu[1])
