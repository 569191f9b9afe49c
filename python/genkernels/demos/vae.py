"""Demo: a VAE on the 8x8 handwritten digits.

Reports the held-out negative ELBO as training goes, and writes a grid of samples from the
prior, held-out digits beside their reconstructions, and interpolations between digits.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..models import VAE, VAEConfig
from . import Demo
from .data import load_digits
from .png import image_grid, write_png


class VAEDemo(Demo):
    name = "vae"
    default_steps = 3000
    unit = "images"
    eval_every = 250
    batch_size = 128
    config = VAEConfig(image_size=8, latent_dim=8, hidden=256, beta=1.0)

    def __init__(self, device: torch.device, backend: str, steps: int, out: str) -> None:
        super().__init__(device, backend, steps, out)
        self.digits = load_digits()
        self.train_images = self.digits.train_images.to(device)
        self.test_images = self.digits.test_images.to(device)
        self.model = VAE(self.config, backend=backend).to(device)
        self.optimizers = {"adam": torch.optim.Adam(self.model.parameters(), lr=1e-3)}

    @property
    def items_per_step(self) -> int:
        return self.batch_size

    def train_step(self, step: int) -> dict[str, float]:
        rows = torch.randint(0, len(self.train_images), (self.batch_size,), generator=self.data_generator)
        loss, terms = self.model.loss(self.train_images[rows.to(self.device)])
        optimizer = self.optimizers["adam"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "kl": terms["kl"].item()}

    def evaluate(self) -> dict[str, float]:
        # A fixed generator: the held-out figure changes only when the model does.
        generator = torch.Generator(device=self.device).manual_seed(0)
        return {"held-out -ELBO (nats)": self.model.negative_elbo(self.test_images, generator)}

    def finish(self, out: str) -> dict[str, Any]:
        figures = self.evaluate()
        generator = torch.Generator(device=self.device).manual_seed(0)
        samples = self.model.sample(64, generator)
        originals = self.test_images[:32]
        pairs = torch.stack([originals, self.model.reconstruct(originals)], dim=1).flatten(0, 1)  # original, reconstruction
        lines = torch.cat([self.model.interpolate(self.test_images[2 * i], self.test_images[2 * i + 1], 8) for i in range(8)])
        paths = {}
        for name, images, columns in (("samples", samples, 8), ("reconstructions", pairs, 8), ("interpolations", lines, 8)):
            paths[name] = os.path.join(out, f"vae-{name}.png")
            write_png(paths[name], image_grid(images, columns, scale=4))
        print(f"held-out negative ELBO: {figures['held-out -ELBO (nats)']:.2f} nats per image "
              f"({len(self.test_images)} held-out digits); wrote {', '.join(paths.values())}")
        return {"negative_elbo": figures["held-out -ELBO (nats)"]}
