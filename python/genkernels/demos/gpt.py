"""Demo: a character-level GPT that writes Python, trained on the standard library's source.

Reports the held-out bits per character beside a bigram model's on the same characters, and
writes code the model generates from a few prompts.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from ..models import GPT, GPTConfig
from . import Demo
from .data import VOCAB, bigram_bits_per_char, decode, encode, python_source_corpus

PROMPTS = ["def ", "class ", "import ", "    def __init__(self"]


class GPTDemo(Demo):
    name = "gpt"
    default_steps = 600
    unit = "tokens"
    eval_every = 100
    batch_size = 16
    eval_windows = 64  # held-out windows of block_size + 1 characters, spread over the held-out text
    config = GPTConfig(vocab_size=len(VOCAB), block_size=128, n_layer=4, n_head=4, d_model=128)

    def __init__(self, device: torch.device, backend: str, steps: int, out: str) -> None:
        super().__init__(device, backend, steps, out)
        self.corpus = python_source_corpus()
        self.model = GPT(self.config, backend=backend).to(device)
        self.optimizers = {"adamw": torch.optim.AdamW(self.model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01)}
        span = self.config.block_size + 1
        starts = torch.linspace(0, len(self.corpus.test) - span, self.eval_windows).long()
        windows = torch.stack([self.corpus.test[s : s + span] for s in starts.tolist()])
        self.eval_inputs, self.eval_targets = windows[:, :-1].to(device), windows[:, 1:].to(device)

    @property
    def items_per_step(self) -> int:
        return self.batch_size * self.config.block_size

    def _learning_rate(self, step: int) -> float:
        """Linear warm-up over 50 steps, then cosine decay to a tenth."""
        peak = 3e-3
        if step < 50:
            return peak * (step + 1) / 50
        progress = (step - 50) / max(1, self.steps - 50)
        return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def train_step(self, step: int) -> dict[str, float]:
        span = self.config.block_size + 1
        starts = torch.randint(0, len(self.corpus.train) - span, (self.batch_size,), generator=self.data_generator)
        batch = torch.stack([self.corpus.train[s : s + span] for s in starts.tolist()]).to(self.device)
        optimizer = self.optimizers["adamw"]
        for group in optimizer.param_groups:
            group["lr"] = self._learning_rate(step)
        _, loss = self.model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        optimizer.step()
        return {"bits/char": loss.item() / math.log(2)}

    @torch.no_grad()
    def bits_per_char(self) -> float:
        """The model's mean cross-entropy on the held-out windows, in bits per character."""
        self.model.eval()
        logits, _ = self.model(self.eval_inputs)
        self.model.train()
        return F.cross_entropy(logits.flatten(0, 1), self.eval_targets.flatten()).item() / math.log(2)

    def evaluate(self) -> dict[str, float]:
        return {"held-out bits/char": self.bits_per_char()}

    def finish(self, out: str) -> dict[str, Any]:
        model_bpc = self.bits_per_char()
        bigram_bpc = bigram_bits_per_char(self.corpus.train, self.eval_inputs.cpu(), self.eval_targets.cpu())
        generator = torch.Generator(device=self.device).manual_seed(0)
        prompts = [encode(p).to(self.device) for p in PROMPTS]
        new_tokens = self.config.block_size - max(len(p) for p in prompts)
        samples = self.model.generate(prompts, new_tokens, temperature=0.8, top_k=20, generator=generator)
        text = "\n".join(f"--- prompt {p!r} ---\n{decode(s.cpu())}\n" for p, s in zip(PROMPTS, samples))
        path = os.path.join(out, "gpt-samples.txt")
        with open(path, "w") as f:
            f.write(text)
        print(text)
        print(f"held-out bits per character: GPT {model_bpc:.3f}, bigram {bigram_bpc:.3f} "
              f"({len(self.corpus.train):,} training and {len(self.corpus.test):,} held-out characters "
              f"from {len(self.corpus.train_files)} and {len(self.corpus.test_files)} standard-library files)")
        print(f"wrote {path}")
        return {"bits_per_char": model_bpc, "bigram_bits_per_char": bigram_bpc}
