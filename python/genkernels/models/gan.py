"""GAN: a DCGAN (Radford et al. 2016) for small one-channel images, trained with the
non-saturating loss of Goodfellow et al. (2014).

The generator maps latent noise (`genkernels.randn`) through a linear layer to a 4x4 feature map
and doubles it with transposed convolutions up to the image size, with batch norm and a tanh
output in [-1, 1]; the discriminator mirrors it with strided convolutions and leaky ReLUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._ops import Ops


@dataclass
class GANConfig:
    image_size: int = 16  # square, one channel, a power of two >= 8
    latent_dim: int = 32
    width: int = 64  # channels of the layer next to the image; doubled at each halving


def _levels(config: GANConfig) -> int:
    levels = int(math.log2(config.image_size)) - 2  # resolution doublings from 4x4
    if levels < 1 or 4 << (levels - 1) != config.image_size // 2:
        raise ValueError(f"image_size must be a power of two >= 8, got {config.image_size}")
    return levels


class Generator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        levels = _levels(config)
        self.channels = config.width << (levels - 1)  # at 4x4
        self.fc = nn.Sequential(nn.Linear(config.latent_dim, self.channels * 16), nn.BatchNorm1d(self.channels * 16), nn.ReLU())
        layers: list[nn.Module] = []
        channels = self.channels
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2), nn.ReLU()]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, 1, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(-1, self.channels, 4, 4))  # (B, 1, S, S)


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        levels = _levels(config)
        layers: list[nn.Module] = []
        channels_in, channels = 1, config.width
        for _ in range(levels):
            layers += [nn.Conv2d(channels_in, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
            channels_in, channels = channels, channels * 2
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels_in * 16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (B,) logits: real vs generated


class GAN(nn.Module):
    """Generator and discriminator for images ``(B, 1, S, S)`` in [-1, 1]."""

    def __init__(self, config: GANConfig, backend: str = "genkernels") -> None:
        super().__init__()
        self.config = config
        self.ops = Ops(backend)
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        for m in self.modules():  # DCGAN's initialisation
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.02)

    @property
    def backend(self) -> str:
        return self.ops.backend

    def noise(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Latent noise ``(n, latent_dim)`` from our Philox sampler."""
        weight = self.generator.fc[0].weight
        return self.ops.randn(n, self.config.latent_dim, generator=generator, dtype=weight.dtype, device=weight.device)

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        """``-log D(real) - log(1 - D(fake))``, batch means; ``fake`` is detached."""
        return F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake.detach())).mean()

    def generator_loss(self, fake: Tensor) -> Tensor:
        """The non-saturating generator loss ``-log D(fake)``, a batch mean."""
        return F.softplus(-self.discriminator(fake)).mean()

    def forward(self, z: Tensor) -> Tensor:
        """Images ``(B, 1, S, S)`` in [-1, 1] for latents ``z``."""
        return self.generator(z)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` generated images ``(n, 1, S, S)`` in [-1, 1] (generator in eval mode)."""
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(self.noise(n, generator))
        finally:
            self.generator.train(was_training)
