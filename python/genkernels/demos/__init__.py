"""``python -m genkernels demo NAME``: train a model on real data on this machine, save a
checkpoint, and write what it makes (sample grids, loss curves, generated text).

A demo is a `Demo` subclass registered in `DEMOS`: it builds its data, model and optimizers,
takes one training step at a time, evaluates on held-out data, and writes its outputs. `run`
does the rest for every demo alike: the progress bar, periodic evaluation, checkpoints and
``--resume``, and the loss curve. Adding a demo is one module with one subclass and one entry
in `DEMOS`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

import torch

from ..models import save_checkpoint
from .png import plot_lines, write_png

DEMOS = {
    "gpt": "genkernels.demos.gpt:GPTDemo",
    "vae": "genkernels.demos.vae:VAEDemo",
    "gan": "genkernels.demos.gan:GANDemo",
    "diffusion": "genkernels.demos.diffusion:DiffusionDemo",
    "latent-diffusion": "genkernels.demos.diffusion:LatentDiffusionDemo",
}
"""Demo name -> "module:class", imported only when that demo runs."""


class Demo(ABC):
    """One model, its data and optimizers, trained one step at a time by `run`."""

    name: ClassVar[str]
    default_steps: ClassVar[int]
    unit: ClassVar[str]  # what throughput counts: "tokens", "images"
    eval_every: ClassVar[int]  # steps between held-out evaluations

    def __init__(self, device: torch.device, backend: str, steps: int, out: str) -> None:
        self.device, self.backend, self.steps, self.out = device, backend, steps, out
        self.data_generator = torch.Generator().manual_seed(1)  # batches; saved with the checkpoint
        self.model: torch.nn.Module
        self.optimizers: dict[str, torch.optim.Optimizer]

    @property
    @abstractmethod
    def items_per_step(self) -> int:
        """Tokens or images one training step consumes."""

    @abstractmethod
    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns the losses (the first is shown by the progress bar)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Figures on the held-out data (the first is plotted beside the training losses)."""

    @abstractmethod
    def finish(self, out: str) -> dict[str, Any]:
        """Prints the final figures, writes the demo's outputs under ``out``; returns the figures."""


def load_demo(name: str) -> type[Demo]:
    """The `Demo` subclass registered as ``name``."""
    module, cls = DEMOS[name].split(":")
    return getattr(importlib.import_module(module), cls)


class Progress:
    """A one-line progress bar on stderr: step, loss, steps/s, items/s and time left."""

    def __init__(self, total: int, start: int, unit: str, items_per_step: int, file=None) -> None:
        self.total, self.start, self.unit, self.items_per_step = total, start, unit, items_per_step
        self.file = file or sys.stderr
        self.tty = self.file.isatty()
        self.began = self.last_shown = time.perf_counter()

    def update(self, step: int, loss: float, force: bool = False) -> None:
        """Shows the state after ``step`` steps: at most 5 times a second on a terminal, every
        10% of the run (and at ``force``) otherwise."""
        now = time.perf_counter()
        done = step - self.start
        if self.tty and not force and now - self.last_shown < 0.2:
            return
        if not self.tty and not force and done % max(1, (self.total - self.start) // 10):
            return
        self.last_shown = now
        rate = done / max(now - self.began, 1e-9)
        width = 24
        filled = int(width * step / max(self.total, 1))
        left = (self.total - step) / rate if rate > 0 else math.inf
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} loss {loss:.4f} "
                f"{rate:.2f} steps/s {rate * self.items_per_step:,.0f} {self.unit}/s "
                f"{'eta ' + _duration(left) if math.isfinite(left) else ''}")
        print(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n", file=self.file, flush=True)

    def message(self, text: str) -> None:
        """Prints a line without breaking the bar."""
        print(("\r" + text.ljust(100) + "\n") if self.tty else text, end="" if self.tty else "\n", file=self.file, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.file, flush=True)


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run(name: str, steps: Optional[int] = None, device: str = "cpu", out: str = "out", resume: bool = False,
        backend: str = "genkernels", seed: int = 0) -> dict[str, Any]:
    """Trains demo ``name`` for ``steps`` steps in all (its default when None), continuing from
    ``out/NAME.pt`` with ``resume``; writes the checkpoint, ``out/NAME-loss.png`` and the demo's
    outputs under ``out``. Returns the figures the demo reports, with the time taken."""
    cls = load_demo(name)
    steps = cls.default_steps if steps is None else steps
    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, f"{name}.pt")
    torch.manual_seed(seed)
    demo = cls(torch.device(device), backend, steps, out)
    start, history, evals = 0, [], []
    if resume:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        demo.model.load_state_dict(state["state_dict"])
        for key, optimizer in demo.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        demo.data_generator.set_state(state["data_generator"].cpu())
        torch.set_rng_state(state["rng"].cpu())
        start, history, evals = state["step"], state["history"], state["evals"]
        print(f"resuming {name} from step {start} ({checkpoint})", file=sys.stderr)

    def save(step: int) -> None:
        save_checkpoint(demo.model, checkpoint, step=step, history=history, evals=evals, backend=backend,
                        optimizers={k: o.state_dict() for k, o in demo.optimizers.items()},
                        data_generator=demo.data_generator.get_state(), rng=torch.get_rng_state())

    began = time.perf_counter()
    progress = Progress(steps, start, cls.unit, demo.items_per_step)
    last_saved = time.perf_counter()
    for step in range(start, steps):
        losses = demo.train_step(step)
        history.append(losses)
        progress.update(step + 1, next(iter(losses.values())))
        if (step + 1) % cls.eval_every == 0 or step + 1 == steps:
            figures = demo.evaluate()
            evals.append({"step": step + 1, **figures})
            progress.message(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        if time.perf_counter() - last_saved > 60:  # an interrupted run loses at most a minute
            save(step + 1)
            last_saved = time.perf_counter()
    progress.close()
    train_s = time.perf_counter() - began
    save(max(steps, start))
    _plot_history(history, evals, os.path.join(out, f"{name}-loss.png"))
    figures = demo.finish(out)
    figures.update(train_seconds=train_s, steps=max(steps, start))
    print(f"{name}: trained {steps - start if steps > start else 0} steps in {train_s:.1f} s; wrote {checkpoint}, "
          f"{os.path.join(out, name + '-loss.png')} and the samples under {out}")
    return figures


def _plot_history(history: list[dict[str, float]], evals: list[dict[str, float]], path: str) -> None:
    """Training losses (smoothed over 1% of the run) and the first held-out figure, against steps."""
    series = []
    window = max(1, len(history) // 100)
    for key in (history[0] if history else {}):
        values = torch.tensor([h[key] for h in history], dtype=torch.float64)
        smooth = values.unfold(0, window, 1).mean(dim=1) if len(values) >= window else values
        series.append((list(range(window, window + len(smooth))), smooth.tolist()))
    if evals:
        key = next(k for k in evals[0] if k != "step")
        series.append(([e["step"] for e in evals], [e[key] for e in evals]))
    write_png(path, plot_lines(series))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of ``python -m genkernels demo`` to ``parser``."""
    parser.add_argument("name", choices=sorted(DEMOS), help="which model to train")
    parser.add_argument("--steps", type=int, default=None, help="training steps in all (default: the demo's own)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    parser.add_argument("--out", default="out", help="folder for the checkpoint and outputs (default: out)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--backend", choices=("genkernels", "torch"), default="genkernels",
                        help="the model's ops: genkernels' kernels or the pure-PyTorch reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and noise")


def main(args: argparse.Namespace) -> int:
    """Runs ``python -m genkernels demo`` with parsed ``args``."""
    run(args.name, args.steps, args.device, args.out, args.resume, args.backend, args.seed)
    return 0
