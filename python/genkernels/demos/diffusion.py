"""Demos: class-conditional diffusion on the 8x8 digits, in pixel space (a small U-Net) and in
the latent space of the VAE demo's model.

Both report the held-out diffusion loss as training goes and, at the end, how many of 200
class-conditional samples (20 per digit; DDIM 50 steps and DPM-Solver++ 20 steps, guidance
scale 3; 100 DDPM samples, 100 steps) a logistic regression trained on the real digits labels as
the requested digit, and the class histogram of 200 unconditional samples. They write a grid
with one row per digit, from the DDIM and from the DDPM sampler.
"""

from __future__ import annotations

import os
from typing import Any, Union

import torch

from ..models import DiffusionConfig, DiffusionModel, LatentDiffusion, VAE, load_checkpoint
from . import Demo, run
from .data import DigitClassifier, load_digits
from .png import image_grid, write_png
from .vae import VAEDemo

GUIDANCE_SCALE = 3.0
SAMPLE_STEPS = 50
DPM_STEPS = 20


class DiffusionDemo(Demo):
    name = "diffusion"
    default_steps = 2000
    unit = "images"
    eval_every = 250
    batch_size = 64
    config = DiffusionConfig(sample_shape=(1, 8, 8), channels=64, channel_mults=(1, 2), attention_levels=(1,))

    def __init__(self, device: torch.device, backend: str, steps: int, out: str) -> None:
        super().__init__(device, backend, steps, out)
        digits = load_digits()
        self.train_images, self.train_labels = digits.train_images.to(device), digits.train_labels.to(device)
        self.test_images, self.test_labels = digits.test_images.to(device), digits.test_labels.to(device)
        self.model = self._build()
        self.optimizers = {"adam": torch.optim.Adam(self.diffusion_parameters(), lr=1e-3)}

    def _build(self) -> Union[DiffusionModel, LatentDiffusion]:
        return DiffusionModel(self.config, backend=self.backend).to(self.device)

    def diffusion_parameters(self):
        return self.model.parameters()

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the model takes them: [-1, 1]."""
        return images * 2 - 1

    def from_model(self, samples: torch.Tensor) -> torch.Tensor:
        return (samples + 1) / 2

    @property
    def items_per_step(self) -> int:
        return self.batch_size

    def train_step(self, step: int) -> dict[str, float]:
        rows = torch.randint(0, len(self.train_images), (self.batch_size,), generator=self.data_generator).to(self.device)
        loss = self.model.loss(self.to_model(self.train_images[rows]), self.train_labels[rows])
        optimizer = self.optimizers["adam"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        generator = torch.Generator(device=self.device).manual_seed(0)
        return {"held-out loss": self.model.loss(self.to_model(self.test_images), self.test_labels, generator).item()}

    def finish(self, out: str) -> dict[str, Any]:
        figures = self.evaluate()
        classifier = DigitClassifier()
        labels = torch.arange(10, device=self.device).repeat_interleave(20)
        generator = torch.Generator(device=self.device).manual_seed(0)

        def sample(labels: torch.Tensor, sampler: str, steps: int) -> tuple[torch.Tensor, float]:
            """Samples of the labelled digits, and the share the classifier labels as requested."""
            images = self.from_model(self.model.sample(len(labels), labels, GUIDANCE_SCALE, sampler, steps, generator))
            return images, (classifier.predict(images) == labels.cpu()).float().mean().item()

        samples, accuracy = sample(labels, "ddim", SAMPLE_STEPS)
        rows = labels.view(10, 20)[:, :10].flatten()  # 10 samples of each digit, one row per digit
        paths = [os.path.join(out, f"{self.name}-samples-ddim.png"), os.path.join(out, f"{self.name}-samples-ddpm.png")]
        write_png(paths[0], image_grid(samples.view(10, 20, *samples.shape[1:])[:, :10].flatten(0, 1), 10))
        ddpm, ddpm_accuracy = sample(rows, "ddpm", SAMPLE_STEPS * 2)
        write_png(paths[1], image_grid(ddpm, 10))
        _, dpm_accuracy = sample(labels, "dpm", DPM_STEPS)
        unconditional = self.from_model(self.model.sample(200, None, 1.0, "ddim", SAMPLE_STEPS, generator))
        counts = torch.bincount(classifier.predict(unconditional), minlength=10).tolist()
        print(f"held-out diffusion loss {figures['held-out loss']:.4f}; class-conditional samples labelled as the "
              f"requested digit by a logistic regression trained on the real digits (guidance {GUIDANCE_SCALE}): "
              f"DDIM {SAMPLE_STEPS} steps {100 * accuracy:.1f}% of 200, DDPM {2 * SAMPLE_STEPS} steps "
              f"{100 * ddpm_accuracy:.1f}% of 100, DPM-Solver++ {DPM_STEPS} steps {100 * dpm_accuracy:.1f}% of 200; "
              f"wrote {', '.join(paths)}")
        print("class histogram of 200 unconditional DDIM samples: " + "  ".join(f"{d}: {c}" for d, c in enumerate(counts)))
        return {"held_out_loss": figures["held-out loss"], "ddim_accuracy": accuracy, "ddpm_accuracy": ddpm_accuracy, "dpm_accuracy": dpm_accuracy,
                "unconditional_histogram": counts}


class LatentDiffusionDemo(DiffusionDemo):
    """Diffusion over the latents of the VAE demo's model: its checkpoint in ``--out``, trained
    first (the VAE demo with its default steps) when there is none."""

    name = "latent-diffusion"
    default_steps = 4000
    batch_size = 256

    def _build(self) -> LatentDiffusion:
        path = os.path.join(self.out, "vae.pt")
        if not os.path.exists(path):
            print(f"latent-diffusion: no VAE at {path}; training one first (the vae demo)")
            run("vae", VAEDemo.default_steps, str(self.device), self.out, backend=self.backend)
        vae, _ = load_checkpoint(path, backend=self.backend, map_location=self.device)
        if not isinstance(vae, VAE):
            raise TypeError(f"{path} holds a {type(vae).__name__}, not a VAE")
        model = LatentDiffusion.from_vae(vae)
        model.fit_latent_scale(self.train_images)
        return model

    def diffusion_parameters(self):
        return self.model.diffusion.parameters()

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        return images  # the VAE takes [0, 1] and decodes to [0, 1]

    def from_model(self, samples: torch.Tensor) -> torch.Tensor:
        return samples
