"""Drop-in replacements for diffusers' ``DDPMScheduler``, ``DDIMScheduler`` and
``DPMSolverMultistepScheduler``, built on the fused steps of ``genkernels.diffusion``: an existing
diffusers-style sampling loop runs with only the import changed.

They accept diffusers' constructor arguments and offer ``set_timesteps``, ``scale_model_input``,
``add_noise``, ``get_velocity`` and ``step`` (returning ``prev_sample`` and ``pred_original_sample``).
Beyond diffusers: ``step`` takes a timestep per batch element and guidance (``model_output=(uncond,
cond)`` with ``guidance_scale``), never reads a timestep on the host, and DDIM steps to the next
timestep of the schedule (``diffusers_compat=True`` keeps diffusers' ``t - T // N`` rule). A
scheduler computes its steps' coefficients once per ``set_timesteps``, for every timestep, and a
step looks its rows up, so a step costs a kernel launch and a gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .diffusion import (
    DPM_ALGORITHM_TYPES,
    DPM_SOLVER_TYPES,
    FINAL_SIGMAS_TYPES,
    PREDICTION_TYPES,
    CoeffsOf,
    NoiseSchedule,
    Timesteps,
    _ddim_plan,
    _ddpm_plan,
    _dpm_plan,
    _half_log_snr,
    _Plan,
    _step,
    _table_rows,
    q_sample,
)

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
    """What the schedulers share: the noise schedule, inference timesteps and noising."""

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
        self.num_inference_steps: Optional[int] = None
        self._tables: dict[tuple, Tensor] = {}
        self._use_timesteps(np.arange(len(self.schedule) - 1, -1, -1, dtype=np.int64), None)  # every timestep until set_timesteps

    def __len__(self) -> int:
        return len(self.schedule)

    @property
    def betas(self) -> Tensor:
        return self.schedule.betas

    @property
    def alphas(self) -> Tensor:
        return self.schedule.alphas

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.schedule.alphas_cumprod

    def _spaced_timesteps(self, num_inference_steps: int, *, extra: int = 0, last: Optional[int] = None) -> np.ndarray:
        """Inference timesteps, descending, for the configured spacing (diffusers' rules; Lin et al.
        2023, table 2). ``linspace`` and ``leading`` space ``num_inference_steps + extra`` points
        over [0, last) and keep the largest ``num_inference_steps`` (DPM-Solver: extra = 1, so
        that the chain does not end at t = 0); ``last`` defaults to num_train_timesteps."""
        n, spacing = len(self.schedule), self.config.timestep_spacing
        last = n if last is None else last
        points = num_inference_steps + extra
        if spacing == "linspace":
            return np.linspace(0, last - 1, points).round()[::-1][:num_inference_steps].astype(np.int64)
        if spacing == "leading":
            ratio = last // points
            spaced = (np.arange(0, points) * ratio).round()[::-1][:num_inference_steps]
            return spaced.astype(np.int64) + self.config.steps_offset
        return np.round(np.arange(last, 0, -n / num_inference_steps)).astype(np.int64) - 1

    def _use_timesteps(self, timesteps: np.ndarray, device: Union[torch.device, str, None]) -> None:
        n = len(self.schedule)
        if len(timesteps) and (timesteps.min() < 0 or timesteps.max() >= n):
            raise ValueError(f"{type(self).__name__}: timesteps must lie in [0, {n}), got [{timesteps.min()}, {timesteps.max()}]")
        if np.any(np.diff(timesteps) >= 0):
            raise ValueError(f"{type(self).__name__}: timesteps must be strictly decreasing, got {timesteps.tolist()}")
        # prev_of[t + 1] = the timestep after t in the chain (-1 at its end); indexed on the device.
        prev_of = np.arange(-2, n - 1, dtype=np.int64)
        prev_of[timesteps + 1] = np.append(timesteps[1:], -1)
        # before_of[t] = the timestep before t in the chain (t itself where there is none).
        before_of = np.minimum(np.arange(1, n + 1, dtype=np.int64), n - 1)
        before_of[timesteps[1:]] = timesteps[:-1]
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)
        self._prev_of = torch.from_numpy(prev_of).to(device)
        self._before_of = torch.from_numpy(before_of).to(device)
        self._tables = {}
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

    def timestep_before(self, timestep: Timesteps) -> Tensor:
        """The timestep the chain visits before ``timestep`` (itself at the chain's start), as a tensor."""
        return self._before_of[torch.as_tensor(timestep, device=self._before_of.device)]

    def _coefficients(self, plan: _Plan, second_order: bool = False) -> CoeffsOf:
        """A step's per-sample coefficient rows, looked up in a table of every training timestep t
        stepping to ``previous_timestep(t)`` (second order: from the x0 predicted at the chain's
        timestep before t, as diffusers takes it), built once per plan and device after
        ``set_timesteps``: a step gathers its rows instead of computing them in some twenty small
        tensor operations."""
        def coeffs_of(schedule: NoiseSchedule, t: Tensor, inputs: Any) -> Tensor:
            def build() -> Tensor:
                every = torch.arange(len(schedule), device=schedule.device)
                prev = self.previous_timestep(every).to(schedule.device)
                before = (self.timestep_before(every).to(schedule.device),) if second_order else ()
                return plan.build(schedule, every, prev, *before)
            return _table_rows(self._tables, (plan.key, second_order, schedule.device), t, build)
        return coeffs_of

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
        # The usual (B,) timestep on the sample's device as it is: even a no-op .to() or reshape costs.
        if timesteps.device != like.device:
            timesteps = timesteps.to(like.device)
        return timesteps if timesteps.dim() == 1 else timesteps.reshape(-1)
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

    @property
    def variance_type(self) -> str:
        return self.config.variance_type

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
        c, fn = self.config, "DDPMScheduler.step"
        plan = _ddpm_plan(fn, c.prediction_type, c.variance_type, c.clip_sample, c.clip_sample_range, c.thresholding,
                          c.dynamic_thresholding_ratio, c.sample_max_value)
        prev, x0 = _step(fn, plan, model_output, self._timestep(timestep, sample), sample, self.schedule,
                         self._coefficients(plan), guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         generator=generator, noise=noise)
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

    @property
    def final_alpha_cumprod(self) -> Tensor:
        """abar after the last step: 1 with ``set_alpha_to_one``, else abar_0."""
        return torch.ones(()) if self.config.set_alpha_to_one else self.alphas_cumprod[0].cpu()

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
        c, fn = self.config, "DDIMScheduler.step"
        plan = _ddim_plan(fn, eta, c.prediction_type, c.clip_sample, c.clip_sample_range, c.thresholding,
                          c.dynamic_thresholding_ratio, c.sample_max_value, use_clipped_model_output, c.set_alpha_to_one)
        prev, x0 = _step(fn, plan, model_output, self._timestep(timestep, sample), sample, self.schedule,
                         self._coefficients(plan), guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         generator=generator, noise=variance_noise)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


_NOT_IMPLEMENTED_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                          "use_flow_sigmas", "use_dynamic_shifting")


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022) with diffusers' arguments, ``dpmsolver++`` and
    ``sde-dpmsolver++``, first or second order.

    Like diffusers, ``step`` keeps the x0 prediction of the previous step in ``model_outputs`` and
    takes the second-order update from the second step on, and the last step first order when
    ``final_sigmas_type="zero"``, ``euler_at_final``, or ``lower_order_final`` with fewer than 15
    steps. Each step is one ``dpm_solver_step`` (its second-order term from the x0 predicted at
    the chain's previous timestep, as in diffusers): the end of the chain is found per sample on
    the device, so the loop never reads a timestep on the host (``step_index`` finds the first
    timestep when read). ``step`` returns ``pred_original_sample`` too.

    Beyond diffusers: ``clip_sample``/``clip_sample_range`` clip the x0 prediction as the DDPM and
    DDIM schedulers do (off by default, as diffusers has no such option); with schedules whose
    first sigma is huge (``squaredcos_cap_v2``) a model's x0 from pure noise is otherwise wild.

    Not implemented (``NotImplementedError``): ``solver_order=3``, ``algorithm_type`` ``dpmsolver``
    and ``sde-dpmsolver``, ``prediction_type="flow_prediction"`` and the sigma schedules
    (``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``, ``use_lu_lambdas``,
    ``use_flow_sigmas``, ``use_dynamic_shifting``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[Sequence[float], Tensor]] = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ) -> None:
        fn = type(self).__name__
        config = _arguments(locals())
        config.pop("fn")
        for name in _NOT_IMPLEMENTED_FLAGS:
            if config[name]:
                raise NotImplementedError(f"{fn}(): argument '{name}=True' is not implemented")
        if _checks.integer(fn, "solver_order", solver_order, minimum=1) == 3:
            raise NotImplementedError(f"{fn}(): argument 'solver_order=3' is not implemented; use 1 or 2")
        if solver_order > 3:
            raise ValueError(f"{fn}(): argument 'solver_order' must be 1 or 2, got {solver_order}")
        for name, value, others in (("algorithm_type", algorithm_type, ("dpmsolver", "sde-dpmsolver")),
                                    ("prediction_type", prediction_type, ("flow_prediction",))):
            if value in others:
                raise NotImplementedError(f"{fn}(): argument '{name}={value!r}' is not implemented")
        _checks.choice(fn, "algorithm_type", algorithm_type, DPM_ALGORITHM_TYPES)
        _checks.choice(fn, "prediction_type", prediction_type, PREDICTION_TYPES)
        _checks.choice(fn, "solver_type", solver_type, DPM_SOLVER_TYPES)
        _checks.choice(fn, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        _checks.choice(fn, "variance_type", variance_type, (None, "learned", "learned_range"))
        if isinstance(lambda_min_clipped, bool) or not isinstance(lambda_min_clipped, (int, float)) or math.isnan(lambda_min_clipped):
            raise TypeError(f"{fn}(): argument 'lambda_min_clipped' must be a real number, got {lambda_min_clipped!r}")
        super().__init__(config)
        if rescale_betas_zero_snr:
            self.schedule = self.schedule._with_terminal_abar(2.0**-24)
        self._reset()

    def _reset(self) -> None:
        order = self.config.solver_order
        self.model_outputs: list[Optional[Tensor]] = [None] * order  # the latest x0 predictions, newest last
        self.lower_order_nums = 0
        self._steps_done = 0
        self._first_timestep: Optional[Timesteps] = None
        self._begin_index: Optional[int] = None

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        # diffusers' rule: one point more than steps, the last (t = 0) dropped, and no timestep
        # whose lambda lies below lambda_min_clipped.
        lam = _half_log_snr(self.schedule._abar64, self.schedule._one_minus_abar64)
        clipped = int((lam < self.config.lambda_min_clipped).sum())
        return super()._spaced_timesteps(num_inference_steps, extra=1, last=len(self.schedule) - clipped)

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[torch.device, str, None] = None,
        mu: Optional[float] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """Chooses the inference timesteps (as ``_Scheduler.set_timesteps``) and starts a new chain."""
        if mu is not None:
            raise NotImplementedError(f"{type(self).__name__}.set_timesteps(): argument 'mu' (dynamic shifting) is not implemented")
        super().set_timesteps(num_inference_steps, device, timesteps)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    @property
    def sigmas(self) -> Tensor:
        """sqrt((1 - abar) / abar) at each inference timestep, then the final sigma (diffusers' table)."""
        t = self.timesteps.cpu()
        abar, one_minus = self.schedule._abar64.cpu(), self.schedule._one_minus_abar64.cpu()
        last = 0.0 if self.config.final_sigmas_type == "zero" else math.sqrt(float(one_minus[0] / abar[0]))
        return torch.cat([(one_minus[t] / abar[t]).sqrt(), torch.tensor([last], dtype=torch.float64)]).float()

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The index in ``timesteps`` of the first step (diffusers' pipelines set it for img2img)."""
        self._begin_index = _checks.integer(f"{type(self).__name__}.set_begin_index", "begin_index", begin_index, minimum=0)

    def index_for_timestep(self, timestep: Timesteps, schedule_timesteps: Optional[Tensor] = None) -> int:
        """The index of ``timestep`` in the schedule (the last index when absent), as diffusers finds it."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        first = torch.as_tensor(timestep).reshape(-1)[0].to(schedule_timesteps.device)
        found = (schedule_timesteps == first).nonzero()
        if len(found) == 0:
            return len(self.timesteps) - 1
        return int(found[1 if len(found) > 1 else 0])

    @property
    def step_index(self) -> Optional[int]:
        """diffusers' step counter: the index of the next step's timestep; None before the first step."""
        if self._steps_done == 0:
            return None
        start = self._begin_index if self._begin_index is not None else self.index_for_timestep(self._first_timestep)
        return start + self._steps_done

    def _without_variance(self, model_output: Union[Tensor, Sequence[Tensor]], sample: Tensor) -> Union[Tensor, Sequence[Tensor]]:
        """With a learned variance the model outputs [mean | variance] along dim 1; the solver takes the mean."""
        if self.config.variance_type is None:
            return model_output
        channels = sample.shape[1] if sample.dim() >= 2 else 0

        def mean(o: Tensor) -> Tensor:
            return o[:, :channels] if isinstance(o, Tensor) and o.dim() >= 2 and o.shape[1] == 2 * channels else o

        if isinstance(model_output, (tuple, list)):
            return type(model_output)(mean(o) for o in model_output)
        return mean(model_output)

    def step(
        self,
        model_output: Union[Tensor, Sequence[Tensor]],
        timestep: Timesteps,
        sample: Tensor,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[Tensor] = None,
        return_dict: bool = True,
        *,
        guidance_scale: Optional[float] = None,
        guidance_rescale: float = 0.0,
    ) -> Union[SchedulerOutput, tuple[Tensor, Tensor]]:
        """x_t -> x_{t_prev}, t_prev the next timestep of the chain; ``timestep`` may be per sample.
        ``sde-dpmsolver++`` draws its noise in the kernel from ``generator``, or takes ``variance_noise``."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step(): call set_timesteps before step")
        c, fn = self.config, "DPMSolverMultistepScheduler.step"
        t = self._timestep(timestep, sample)
        prev_x0 = self.previous_x0()
        plan = _dpm_plan(fn, c.algorithm_type, c.solver_type, c.prediction_type, c.final_sigmas_type, self.euler_at_final,
                         c.clip_sample, c.clip_sample_range, c.thresholding, c.dynamic_thresholding_ratio,
                         c.sample_max_value)
        prev, x0 = _step(fn, plan, self._without_variance(model_output, sample), t, sample, self.schedule,
                         self._coefficients(plan, second_order=prev_x0 is not None), guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, generator=generator, noise=variance_noise, prev_x0=prev_x0)
        self.record(x0, t)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    @property
    def euler_at_final(self) -> bool:
        """Whether the step to the final sigma is first order: asked for, or (``lower_order_final``)
        in a chain of fewer than 15 steps, as diffusers decides it."""
        c = self.config
        return bool(c.euler_at_final or (c.lower_order_final and self.timesteps.shape[0] < 15))  # len() is slow on a tensor

    def previous_x0(self) -> Optional[Tensor]:
        """The previous step's x0 prediction when the next step is second order, else None; it was
        made at ``timestep_before(t)`` of the next step's t."""
        if self.config.solver_order == 2 and self.lower_order_nums >= 1:
            return self.model_outputs[-1]
        return None

    def record(self, x0: Tensor, t: Timesteps) -> None:
        """Keeps a step's x0 prediction ``x0`` made at ``t`` for the next step (``step`` calls it)."""
        self.model_outputs = self.model_outputs[1:] + [x0]
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        if self._steps_done == 0:
            self._first_timestep = t
        self._steps_done += 1
