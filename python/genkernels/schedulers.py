"""Drop-in replacements for diffusers' ``DDPMScheduler`` and ``DDIMScheduler``, built on the fused
steps of ``genkernels.diffusion``: an existing diffusers-style sampling loop runs with only the
import changed.

They accept diffusers' constructor arguments and offer ``set_timesteps``, ``scale_model_input``,
``add_noise``, ``get_velocity`` and ``step`` (returning ``prev_sample`` and ``pred_original_sample``).
Beyond diffusers: ``step`` takes a timestep per batch element and guidance (``model_output=(uncond,
cond)`` with ``guidance_scale``), never reads a timestep on the host, and DDIM steps to the next
timestep of the schedule (``diffusers_compat=True`` keeps diffusers' ``t - T // N`` rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .diffusion import NoiseSchedule, Timesteps, ddim_step, ddpm_step, q_sample

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (x_{t_prev}) and ``pred_original_sample`` (x0)."""

    prev_sample: Tensor
    pred_original_sample: Tensor

    def __getitem__(self, index: int) -> Tensor:
        return (self.prev_sample, self.pred_original_sample)[index]

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.prev_sample, self.pred_original_sample))


class _Scheduler:
    """What the two schedulers share: the noise schedule, inference timesteps and noising."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: dict[str, Any]) -> None:
        fn = type(self).__name__
        self.config = SimpleNamespace(**config)
        _checks.choice(fn, "timestep_spacing", config["timestep_spacing"], TIMESTEP_SPACINGS)
        _checks.integer(fn, "steps_offset", config["steps_offset"], minimum=0)
        self.schedule = NoiseSchedule(
            config["num_train_timesteps"], config["beta_schedule"], config["beta_start"], config["beta_end"],
            config["trained_betas"], config["rescale_betas_zero_snr"],
        )
        self.betas = self.schedule.betas
        self.alphas = self.schedule.alphas
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.num_inference_steps: Optional[int] = None
        n = len(self.schedule)
        self.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64)
        # prev_of[t + 1] = the timestep after t in the chain (-1 at its end); indexed on the device.
        self._prev_of = torch.arange(-2, n - 1, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.schedule)

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Inference timesteps, descending, for the configured spacing (diffusers' rules; Lin et al.
        2023, table 2)."""
        n, spacing = len(self.schedule), self.config.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, n - 1, num_inference_steps).round()[::-1].astype(np.int64)
        if spacing == "leading":
            ratio = n // num_inference_steps
            return (np.arange(0, num_inference_steps) * ratio).round()[::-1].astype(np.int64) + self.config.steps_offset
        return np.round(np.arange(n, 0, -n / num_inference_steps)).astype(np.int64) - 1

    def _use_timesteps(self, timesteps: np.ndarray, device: Union[torch.device, str, None]) -> None:
        n = len(self.schedule)
        if len(timesteps) and (timesteps.min() < 0 or timesteps.max() >= n):
            raise ValueError(f"{type(self).__name__}: timesteps must lie in [0, {n}), got [{timesteps.min()}, {timesteps.max()}]")
        if np.any(np.diff(timesteps) >= 0):
            raise ValueError(f"{type(self).__name__}: timesteps must be strictly decreasing, got {timesteps.tolist()}")
        prev_of = np.arange(-2, n - 1, dtype=np.int64)
        prev_of[timesteps + 1] = np.append(timesteps[1:], -1)
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)
        self._prev_of = torch.from_numpy(prev_of).to(device)
        self.schedule = self.schedule.to(self.timesteps.device)

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[torch.device, str, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """Chooses the inference timesteps: ``num_inference_steps`` spaced by ``timestep_spacing``,
        or custom descending ``timesteps``; tables move to ``device``."""
        fn = f"{type(self).__name__}.set_timesteps"
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{fn}(): pass exactly one of 'num_inference_steps' and 'timesteps'")
        if timesteps is not None:
            self.num_inference_steps = len(timesteps)
            self._use_timesteps(np.asarray(timesteps, dtype=np.int64), device)
            return
        steps = _checks.integer(fn, "num_inference_steps", num_inference_steps, minimum=1)
        if steps > len(self.schedule):
            raise ValueError(f"{fn}(): argument 'num_inference_steps' must be at most num_train_timesteps={len(self.schedule)}, got {steps}")
        self.num_inference_steps = steps
        self._use_timesteps(self._spaced_timesteps(steps), device)

    def previous_timestep(self, timestep: Timesteps) -> Tensor:
        """The timestep the chain steps to from ``timestep`` (-1 at its end), as a tensor."""
        t = torch.as_tensor(timestep, device=self._prev_of.device)
        return self._prev_of[t + 1]

    def scale_model_input(self, sample: Tensor, timestep: Optional[Timesteps] = None) -> Tensor:
        """The model input for ``sample`` at ``timestep``: the sample itself for DDPM and DDIM."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Timesteps) -> Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``: the forward process, one fused pass."""
        return q_sample(original_samples, _flat(timesteps, original_samples), self.schedule, noise)[0]

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Timesteps) -> Tensor:
        """The v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) sample``."""
        return q_sample(sample, _flat(timesteps, sample), self.schedule, noise, return_velocity=True)[2]

    def _timestep(self, timestep: Timesteps, sample: Tensor) -> Timesteps:
        return timestep if isinstance(timestep, int) else _flat(timestep, sample)


def _arguments(scope: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments, from its locals(), as the scheduler's config."""
    return {k: v for k, v in scope.items() if k not in ("self", "__class__")}


def _flat(timesteps: Timesteps, like: Tensor) -> Timesteps:
    if isinstance(timesteps, Tensor):
        return timesteps.to(like.device).reshape(-1)
    return timesteps


class DDPMScheduler(_Scheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020) with diffusers' arguments."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[Sequence[float], Tensor]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        super().__init__(_arguments(locals()))
        self.variance_type = variance_type

    def step(
        self,
        model_output: Union[Tensor, Sequence[Tensor]],
        timestep: Timesteps,
        sample: Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        *,
        guidance_scale: Optional[float] = None,
        guidance_rescale: float = 0.0,
        noise: Optional[Tensor] = None,
    ) -> Union[SchedulerOutput, tuple[Tensor, Tensor]]:
        """x_t -> x_{t_prev}, t_prev the next timestep of the chain; ``timestep`` may be per sample."""
        c = self.config
        t = self._timestep(timestep, sample)
        prev, x0 = ddpm_step(
            model_output, t, sample, self.schedule, t_prev=self.previous_timestep(t).to(sample.device),
            prediction_type=c.prediction_type, variance_type=c.variance_type, clip_sample=c.clip_sample,
            clip_sample_range=c.clip_sample_range, thresholding=c.thresholding,
            dynamic_thresholding_ratio=c.dynamic_thresholding_ratio, sample_max_value=c.sample_max_value,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator, noise=noise,
        )
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class DDIMScheduler(_Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021) with diffusers' arguments.

    ``step`` goes to the next timestep of the schedule set by ``set_timesteps``. diffusers uses
    ``t - num_train_timesteps // num_inference_steps`` instead, which skips or repeats timesteps
    for ``linspace`` and ``trailing`` spacing; ``diffusers_compat=True`` reproduces it.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[Sequence[float], Tensor]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        diffusers_compat: bool = False,
    ) -> None:
        super().__init__(_arguments(locals()))
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0].cpu()

    def previous_timestep(self, timestep: Timesteps) -> Tensor:
        if self.config.diffusers_compat:
            if self.num_inference_steps is None:
                raise ValueError("DDIMScheduler: call set_timesteps before step")
            t = torch.as_tensor(timestep, device=self._prev_of.device)
            return (t - len(self.schedule) // self.num_inference_steps).clamp(min=-1)
        return super().previous_timestep(timestep)

    def step(
        self,
        model_output: Union[Tensor, Sequence[Tensor]],
        timestep: Timesteps,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[Tensor] = None,
        return_dict: bool = True,
        *,
        guidance_scale: Optional[float] = None,
        guidance_rescale: float = 0.0,
    ) -> Union[SchedulerOutput, tuple[Tensor, Tensor]]:
        """x_t -> x_{t_prev}; ``eta`` scales the noise (0: deterministic DDIM, 1: DDPM-like)."""
        if variance_noise is not None and generator is not None:
            raise ValueError("DDIMScheduler.step(): pass at most one of 'generator' and 'variance_noise'")
        c = self.config
        t = self._timestep(timestep, sample)
        prev, x0 = ddim_step(
            model_output, t, self.previous_timestep(t).to(sample.device), sample, self.schedule, eta=eta,
            prediction_type=c.prediction_type, clip_sample=c.clip_sample, clip_sample_range=c.clip_sample_range,
            thresholding=c.thresholding, dynamic_thresholding_ratio=c.dynamic_thresholding_ratio,
            sample_max_value=c.sample_max_value, use_clipped_model_output=use_clipped_model_output,
            set_alpha_to_one=c.set_alpha_to_one, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            generator=generator, noise=variance_noise,
        )
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
