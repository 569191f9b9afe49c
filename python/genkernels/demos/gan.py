"""Demo: a DCGAN on the handwritten digits, upsampled from 8x8 to 16x16.

Checks the samples for mode collapse: a logistic regression trained on the real digits
classifies 1,000 samples, and the demo reports the class histogram (every class should appear).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from ..models import GAN, GANConfig
from . import Demo
from .data import DigitClassifier, load_digits
from .png import image_grid, write_png


def class_histogram(model: GAN, classifier: DigitClassifier, n: int = 1000, seed: int = 0) -> list[int]:
    """How many of ``n`` samples the classifier puts in each of the 10 classes."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    images = (model.sample(n, generator) + 1) / 2
    return torch.bincount(classifier.predict(images), minlength=10).tolist()


class GANDemo(Demo):
    name = "gan"
    default_steps = 2000
    unit = "images"
    eval_every = 250
    batch_size = 64
    config = GANConfig(image_size=16, latent_dim=32, width=64)

    def __init__(self, device: torch.device, backend: str, steps: int, out: str) -> None:
        super().__init__(device, backend, steps, out)
        digits = load_digits()
        # All 1,797 digits: a GAN has no held-out loss; its samples are judged by the classifier.
        images = torch.cat([digits.train_images, digits.test_images])
        self.images = (F.interpolate(images, size=self.config.image_size, mode="bilinear", align_corners=False) * 2 - 1).to(device)
        self.model = GAN(self.config, backend=backend).to(device)
        self.optimizers = {
            "generator": torch.optim.Adam(self.model.generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            "discriminator": torch.optim.Adam(self.model.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        }
        self.classifier = None

    @property
    def items_per_step(self) -> int:
        return self.batch_size

    def train_step(self, step: int) -> dict[str, float]:
        rows = torch.randint(0, len(self.images), (self.batch_size,), generator=self.data_generator)
        real = self.images[rows.to(self.device)]
        fake = self.model(self.model.noise(self.batch_size))
        d_loss = self.model.discriminator_loss(real, fake)
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizers["discriminator"].step()
        g_loss = self.model.generator_loss(fake)
        self.optimizers["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        self.optimizers["generator"].step()
        return {"generator loss": g_loss.item(), "discriminator loss": d_loss.item()}

    def evaluate(self) -> dict[str, float]:
        self.classifier = self.classifier or DigitClassifier()
        counts = class_histogram(self.model, self.classifier)
        return {"classes present": float(sum(c > 0 for c in counts)), "smallest class share": min(counts) / sum(counts)}

    def finish(self, out: str) -> dict[str, Any]:
        self.classifier = self.classifier or DigitClassifier()
        counts = class_histogram(self.model, self.classifier)
        generator = torch.Generator(device=self.device).manual_seed(0)
        path = os.path.join(out, "gan-samples.png")
        write_png(path, image_grid((self.model.sample(64, generator) + 1) / 2, 8, scale=3))
        print("class histogram of 1,000 samples (logistic regression trained on the real digits):")
        print("  " + "  ".join(f"{digit}: {count}" for digit, count in enumerate(counts)))
        print(f"classes present: {sum(c > 0 for c in counts)} of 10; wrote {path}")
        return {"class_histogram": counts}
