"""DiffusionModel: a denoising diffusion model (Ho et al. 2020) with classifier-free guidance
(Ho & Salimans 2022).

The denoiser predicts the noise in ``x_t``. For images it is a small U-Net: residual blocks at
each resolution, self-attention blocks (our attention) at the coarsest ones, skip connections
across; for vectors (the latents of `LatentDiffusion`) it is a residual MLP. Both are conditioned
on the timestep, through our sinusoidal timestep encoding, and optionally on a class label,
replaced by a "no label" class with probability ``label_dropout`` in training so that one model
gives both the conditional and the unconditional prediction that guidance mixes. Training noises
with our fused `q_sample`; sampling runs our DDPM, DDIM or DPM-Solver++(2M) scheduler steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion import NoiseSchedule
from ..schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from ._ops import Ops, Scheduler

SAMPLERS = ("ddpm", "ddim", "dpm")


@dataclass
class DiffusionConfig:
    sample_shape: tuple[int, ...] = (1, 8, 8)  # (C, H, W) images: U-Net; (D,) vectors: residual MLP
    channels: int = 64  # U-Net channels at full resolution, or the MLP's width
    channel_mults: tuple[int, ...] = (1, 2)  # U-Net: channels of each resolution; each but the last halves H, W
    attention_levels: tuple[int, ...] = (1,)  # U-Net resolutions (indices) with self-attention
    heads: int = 4
    mlp_blocks: int = 4  # residual MLP only
    num_classes: Optional[int] = 10  # None: unconditional
    label_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: Optional[float] = 1.0  # sampling clamps predicted x0 to [-clip, clip] (None: no clamp)

    def __post_init__(self) -> None:  # lists from a checkpoint's dict become tuples again
        self.sample_shape, self.channel_mults, self.attention_levels = (
            tuple(self.sample_shape), tuple(self.channel_mults), tuple(self.attention_levels))


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the conditioning embedding added between them."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, heads: int, ops: Ops) -> None:
        super().__init__()
        self.heads, self.ops = heads, ops
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # Positions as rows, as diffusers' attention blocks take them: q, k and v then come out of
        # the projection with contiguous features, which the attention kernels read in place.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(tokens).unflatten(-1, (3, self.heads, c // self.heads))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, E)
        y = self.ops.attention(q, k, v).transpose(1, 2).flatten(2)  # (B, HW, C)
        return x + self.proj(y).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    def __init__(self, config: DiffusionConfig, emb_dim: int, ops: Ops) -> None:
        super().__init__()
        widths = [config.channels * m for m in config.channel_mults]
        levels = range(len(widths))
        self.conv_in = nn.Conv2d(config.sample_shape[0], widths[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(widths[max(i - 1, 0)], widths[i], emb_dim) for i in levels)
        self.down_attn = nn.ModuleList(self._attention(config, i, widths[i], ops) for i in levels)
        self.downsample = nn.ModuleList(nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1) for i in levels[:-1])
        self.mid = nn.ModuleList([ResBlock(widths[-1], widths[-1], emb_dim), ResBlock(widths[-1], widths[-1], emb_dim)])
        self.mid_attn = AttentionBlock(widths[-1], config.heads, ops)
        self.up = nn.ModuleList(ResBlock(2 * widths[i] if i == len(widths) - 1 else widths[i + 1] + widths[i], widths[i], emb_dim) for i in levels)
        self.up_attn = nn.ModuleList(self._attention(config, i, widths[i], ops) for i in levels)
        self.upsample = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i + 1], 3, padding=1) for i in levels[:-1])
        self.norm_out = nn.GroupNorm(8, widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.sample_shape[0], 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # starts by predicting zero noise

    @staticmethod
    def _attention(config: DiffusionConfig, level: int, channels: int, ops: Ops) -> nn.Module:
        return AttentionBlock(channels, config.heads, ops) if level in config.attention_levels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv_in(x)
        skips = []
        for i, (block, attn) in enumerate(zip(self.down, self.down_attn)):
            h = attn(block(h, emb))
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid[1](self.mid_attn(self.mid[0](h, emb)), emb)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):  # back to level i's resolution
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up_attn[i](self.up[i](torch.cat([h, skips[i]], dim=1), emb))
        return self.conv_out(F.silu(self.norm_out(h)))


class ResMLP(nn.Module):
    """Residual MLP denoiser for vector samples."""

    def __init__(self, config: DiffusionConfig, emb_dim: int) -> None:
        super().__init__()
        dim, width = config.sample_shape[0], config.channels
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(width), "emb": nn.Linear(emb_dim, width),
                           "mlp": nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))})
            for _ in range(config.mlp_blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        nn.init.zeros_(self.out[1].weight)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block["mlp"](block["norm"](h) + block["emb"](emb))
        return self.out(h)


class DiffusionModel(nn.Module):
    """Noise-predicting diffusion model over samples of ``config.sample_shape``."""

    def __init__(self, config: DiffusionConfig, backend: str = "genkernels") -> None:
        super().__init__()
        self.config = config
        self.ops = Ops(backend)
        self.schedule = NoiseSchedule(config.num_train_timesteps, config.beta_schedule)
        emb_dim = 4 * config.channels
        self.time_mlp = nn.Sequential(nn.Linear(config.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one more class than labels: the "no label" class of the unconditional prediction
        self.label_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None
        image = len(config.sample_shape) == 3
        self.denoiser = UNet(config, emb_dim, self.ops) if image else ResMLP(config, emb_dim)

    @property
    def backend(self) -> str:
        return self.ops.backend

    def forward(self, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The predicted noise in ``x_t`` at timesteps ``t`` ``(B,)``; ``labels`` ``(B,)``, where
        ``num_classes`` means "no label" (the default)."""
        t_emb = self.ops.sinusoidal_encoding(t, self.config.channels, layout="concat", flip_sin_to_cos=True, dtype=x_t.dtype)
        emb = self.time_mlp(t_emb)
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full_like(t, self.config.num_classes)
            emb = emb + self.label_emb(labels)
        return self.denoiser(x_t, emb)

    def loss(self, x0: Tensor, labels: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Mean squared error of the predicted noise at uniformly drawn timesteps (Ho et al. 2020,
        eq. 14), labels dropped with probability ``label_dropout``."""
        t = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        x_t, noise = self.ops.q_sample(x0, t, self.schedule, generator=generator)
        if labels is not None and self.label_emb is not None:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.config.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.config.num_classes), labels)
        return F.mse_loss(self(x_t, t, labels), noise)

    def scheduler(self, sampler: str = "ddim") -> Scheduler:
        """A scheduler of the training schedule: ``"ddpm"`` (ancestral), ``"ddim"`` (deterministic)
        or ``"dpm"`` (DPM-Solver++(2M), for good samples in 10-25 steps)."""
        schedule = dict(num_train_timesteps=self.config.num_train_timesteps, beta_schedule=self.config.beta_schedule,
                        timestep_spacing="trailing")
        clip = dict(clip_sample=self.config.clip_sample is not None, clip_sample_range=self.config.clip_sample or 1.0)
        if sampler == "ddpm":
            return DDPMScheduler(**schedule, **clip)
        if sampler == "ddim":
            return DDIMScheduler(**schedule, **clip)
        if sampler == "dpm":
            return DPMSolverMultistepScheduler(**schedule, **clip)
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: Optional[Tensor] = None,
        guidance_scale: float = 3.0,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """``n`` samples ``(n, *sample_shape)``, from ``num_inference_steps`` steps of ``sampler``.

        With ``labels`` ``(n,)`` the samples are class-conditional, with classifier-free guidance
        ``uncond + guidance_scale * (cond - uncond)`` (1: the conditional model alone); without,
        unconditional.
        """
        weight = self.time_mlp[0].weight
        scheduler = self.scheduler(sampler)
        scheduler.set_timesteps(num_inference_steps, device=weight.device)
        x = self.ops.randn(n, *self.config.sample_shape, generator=generator, dtype=weight.dtype, device=weight.device)
        guided = labels is not None and guidance_scale != 1.0
        for t in scheduler.timesteps:
            t = t.expand(n)
            if guided:  # one batch for both predictions
                null = torch.full_like(labels, self.config.num_classes)
                out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, labels])).chunk(2)
            else:
                out = self(x, t, labels)
            x = self.ops.scheduler_step(scheduler, out, t, x, guidance_scale if guided else None, generator)
        return x
