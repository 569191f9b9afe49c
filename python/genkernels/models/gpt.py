"""GPT: a decoder-only Transformer language model (Radford et al. 2018; Vaswani et al. 2017).

Token embeddings scaled by sqrt(d_model) plus sinusoidal positions (`add_positional_encoding`),
pre-LayerNorm blocks of causal multi-head self-attention and an MLP, a final LayerNorm and an
output head tied to the token embedding. `GPT.generate` decodes with a key/value cache per layer
(`attention_with_kvcache`), for batches of prompts of different lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._ops import Ops

Prompts = Union[Tensor, Sequence[Tensor]]


@dataclass
class GPTConfig:
    vocab_size: int = 96
    block_size: int = 256  # longest sequence the model reads (prompt + generated tokens)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops) -> None:
        super().__init__()
        if config.d_model % config.n_head:
            raise ValueError(f"d_model ({config.d_model}) must be a multiple of n_head ({config.n_head})")
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.ops = ops

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_head, dim // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, E)
        return q, k, v

    def _merge(self, y: Tensor) -> Tensor:
        batch, _, length, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(batch, length, -1))  # (B, L, D)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(x)
        return self._merge(self.ops.attention(q, k, v, causal=True))

    def step(self, x: Tensor, cache: tuple[Tensor, Tensor], cache_seqlens: Tensor) -> Tensor:
        """Attention of the new positions ``x`` (B, L_new, D) over the cache, which they extend."""
        q, k, v = self._heads(x)
        return self._merge(self.ops.attention_with_kvcache(q, cache[0], cache[1], cache_seqlens, k, v))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config, ops)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.mlp_ratio * config.d_model),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.d_model, config.d_model),
        )

    def forward(self, x: Tensor, cache: Optional[tuple[Tensor, Tensor]] = None, cache_seqlens: Optional[Tensor] = None) -> Tensor:
        h = self.ln1(x)
        x = x + (self.attn(h) if cache is None else self.attn.step(h, cache, cache_seqlens))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only Transformer over token ids; ``backend`` picks genkernels' ops or the
    pure-PyTorch reference ops."""

    def __init__(self, config: GPTConfig, backend: str = "genkernels") -> None:
        super().__init__()
        self.config = config
        self.ops = Ops(backend)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, self.ops) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init)
        for block in self.blocks:  # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * config.n_layer))
        # Scaled by sqrt(d_model) the embeddings have unit size, as the positional encoding has.
        nn.init.normal_(self.wte.weight, std=config.d_model**-0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    @property
    def backend(self) -> str:
        return self.ops.backend

    def _embed(self, idx: Tensor, start: Union[int, Tensor]) -> Tensor:
        """Token embeddings plus the encoding of positions ``start, start + 1, ...``: one shared
        int ``start`` goes to the fused op's ``offset``; a ``(B,)`` tensor (ragged batches) adds
        each row's own positions."""
        x = self.wte(idx)  # (B, L, D)
        scale = math.sqrt(self.config.d_model)
        if isinstance(start, int):
            return self.ops.add_positional_encoding(x, offset=start, x_scale=scale)
        positions = start[:, None] + torch.arange(idx.shape[1], device=idx.device)  # (B, L)
        return x * scale + self.ops.sinusoidal_encoding(positions, self.config.d_model, dtype=x.dtype)

    def _logits(self, x: Tensor) -> Tensor:
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, L, vocab), weight-tied head

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Logits ``(B, L, vocab)`` for token ids ``idx`` ``(B, L)`` and, given ``targets`` of the
        same shape, the mean cross-entropy."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        x = self._embed(idx, 0)
        for block in self.blocks:
            x = block(x)
        logits = self._logits(x)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Prompts,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Union[Tensor, list[Tensor]]:
        """Continues each prompt by ``max_new_tokens`` tokens, with a key/value cache.

        ``prompt_ids`` is a ``(B, L)`` tensor (returns ``(B, L + max_new_tokens)``) or a list of
        1-d prompts of any lengths (returns a list). Each token is drawn from the softmax of the
        logits divided by ``temperature`` (0 means greedy: the argmax), restricted to the
        ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
        (nucleus sampling); ``generator`` makes the draws reproducible.
        """
        ragged = not isinstance(prompt_ids, Tensor)
        prompts = list(prompt_ids) if ragged else list(prompt_ids.unbind(0))
        if not prompts or min(p.numel() for p in prompts) == 0:
            raise ValueError("generate() needs at least one prompt, each of at least one token")
        lengths = torch.tensor([p.numel() for p in prompts], device=prompts[0].device)
        longest = int(lengths.max())
        if longest + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds block_size {self.config.block_size}")
        batch, cfg = len(prompts), self.config
        idx = torch.zeros(batch, longest, dtype=torch.long, device=lengths.device)
        for row, p in enumerate(prompts):  # right-padded: padding lies after every real token
            idx[row, : p.numel()] = p
        dtype = self.wte.weight.dtype
        caches = [
            tuple(torch.zeros(batch, cfg.n_head, longest + max_new_tokens, cfg.d_model // cfg.n_head, dtype=dtype, device=idx.device) for _ in range(2))
            for _ in self.blocks
        ]
        uniform = bool((lengths == longest).all())

        # Prefill: the causal mask keeps each real token from seeing the padding after it.
        x = self._run_cached(self._embed(idx, 0), caches, torch.zeros_like(lengths, dtype=torch.int32))
        logits = self._logits(x)[torch.arange(batch), lengths - 1]  # (B, vocab) at each last real token
        seqlens = lengths.to(torch.int32)  # the padding in the cache is overwritten from here on
        new_tokens = []
        for step in range(max_new_tokens):
            token = _sample(logits, temperature, top_k, top_p, generator)  # (B,)
            new_tokens.append(token)
            if step == max_new_tokens - 1:
                break
            start = longest + step if uniform else seqlens.to(torch.int64)
            x = self._run_cached(self._embed(token[:, None], start), caches, seqlens)
            logits = self._logits(x)[:, -1]
            seqlens = seqlens + 1
        generated = torch.stack(new_tokens, dim=1) if new_tokens else idx.new_zeros(batch, 0)
        if not ragged:
            return torch.cat([idx, generated], dim=1)
        return [torch.cat([p, g]) for p, g in zip(prompts, generated.unbind(0))]

    def _run_cached(self, x: Tensor, caches: list[tuple[Tensor, Tensor]], seqlens: Tensor) -> Tensor:
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, seqlens)
        return x


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float], generator: Optional[torch.Generator]) -> Tensor:
    """One token per row of ``logits`` (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
