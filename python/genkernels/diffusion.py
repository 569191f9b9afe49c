"""Diffusion noise schedules and the fused forward (noising) and reverse (denoising) steps.

Each op is one kernel pass over the tensors. The schedule's per-sample coefficients are gathered
on the data's device from tables placed there once, so a sampling loop never reads a timestep
on the host. Noise is drawn inside the kernels from the Philox stream (element ``e`` gets the same
normal as ``genkernels.randn``'s ``e``-th for the same seed), or taken from ``noise=``.

Conventions are diffusers' (``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``),
with these differences: the timestep is per batch element, the previous timestep (and for the
multistep DPM-Solver++ the previous x0 and its timestep) is explicit, schedules are computed in
float64, ``variance_type="fixed_large_log"`` uses the noise scale sqrt(beta_t) that diffusers
intends (its own gives NaN), and 16-bit inputs are computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks
from ._backend import DTYPE_CODES, custom_op, launch_for
from ._rng import draw_seed

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
DPM_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
DPM_SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# Per-sample coefficient columns, in the order of csrc/diffusion/diffusion.h.
_Q = {"signal": 0, "noise": 1}
_S = {
    name: i
    for i, name in enumerate(
        ("guide_w", "guide_scale", "x0_from_x", "x0_from_e", "clip_lo", "clip_hi", "clip_div", "eps_from_x",
         "eps_from_e", "eps_from_x0", "out_x0", "out_eps", "out_x", "out_prev_x0", "noise_std", "log_var_min",
         "log_var_max")
    )
}
_VARIANCE_INPUT = {None: 0, "learned": 1, "learned_range": 2}
_HALF = (torch.float16, torch.bfloat16)

Timesteps = Union[int, Tensor]


def _alpha_bar_cosine(t: float) -> float:
    # Nichol & Dhariwal 2021, eq. 17, with s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    # Lin et al. 2023, algorithm 1: shift and scale sqrt(abar) so that its last value is 0.
    abar_sqrt = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """The variance schedule of a diffusion model (Ho et al. 2020) and the tables derived from it.

    Computed in float64 and kept as float32 tensors: ``betas``, ``alphas``, ``alphas_cumprod``,
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, and the posterior q(x_{t-1} | x_t, x_0)
    ``posterior_variance``, ``posterior_log_variance_clipped``, ``posterior_mean_coef1`` (of x0) and
    ``posterior_mean_coef2`` (of x_t). The steps compute their coefficients from float64 copies of
    ``alphas_cumprod`` and ``1 - alphas_cumprod``, so no coefficient loses precision to cancellation
    (diffusers' float32 ``1 - alphas_cumprod`` is off by ~1e-3 relative at small t).

    ``beta_schedule``: ``linear``, ``scaled_linear`` (linear in sqrt(beta)), ``squaredcos_cap_v2``
    (the cosine schedule, betas capped at 0.999) or ``sigmoid``; ``trained_betas`` overrides it.
    ``rescale_betas_zero_snr`` rescales to zero terminal SNR (Lin et al. 2023).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Optional[Union[Sequence[float], Tensor]] = None,
        rescale_betas_zero_snr: bool = False,
        *,
        device: Union[torch.device, str, None] = None,
    ) -> None:
        fn = "NoiseSchedule"
        self.num_train_timesteps = _checks.integer(fn, "num_train_timesteps", num_train_timesteps, minimum=1)
        self.beta_schedule = _checks.choice(fn, "beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.beta_start = _checks.real(fn, "beta_start", beta_start)
        self.beta_end = _checks.real(fn, "beta_end", beta_end)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        n = self.num_train_timesteps
        f64 = torch.float64
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=f64).flatten().cpu()
            self.num_train_timesteps = n = betas.numel()
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=f64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=f64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = torch.tensor(
                [min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999) for i in range(n)], dtype=f64
            )
        else:  # sigmoid
            betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=f64)) * (beta_end - beta_start) + beta_start
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"{fn}(): betas must lie in (0, 1], got values in [{betas.min().item()}, {betas.max().item()}]")
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        # 1 - abar as a sum of products, not a difference of numbers near 1: exact to float64 rounding.
        one_minus_abar = -torch.expm1(torch.cumsum(torch.log1p(-betas), 0))
        abar_prev = torch.cat([torch.ones(1, dtype=f64), abar[:-1]])
        one_minus_abar_prev = torch.cat([torch.zeros(1, dtype=f64), one_minus_abar[:-1]])
        posterior_variance = betas * one_minus_abar_prev / one_minus_abar
        q_coeffs = _q_coeffs(abar, one_minus_abar)
        tables64 = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "sqrt_alphas_cumprod": q_coeffs[:, 0],
            "sqrt_one_minus_alphas_cumprod": q_coeffs[:, 1],
            "posterior_variance": posterior_variance,
            # The first posterior variance is 0; its log is clipped to the second's (Ho et al.'s code).
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / one_minus_abar,
            "posterior_mean_coef2": one_minus_abar_prev * alphas.sqrt() / one_minus_abar,
        }
        device = torch.device(device if device is not None else "cpu")
        for name, value in tables64.items():
            setattr(self, name, value.to(device=device, dtype=torch.float32))
        self._betas64 = betas.to(device)
        self._abar64 = abar.to(device)
        self._one_minus_abar64 = one_minus_abar.to(device)
        self._q_coeffs64 = q_coeffs.to(device)
        self._abar0 = float(abar[0])  # DDIM's final abar without set_alpha_to_one, kept on the host
        self._step_tables: dict[tuple, Tensor] = {}  # coefficient rows of t -> t - 1 for every t, per plan

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def to(self, device: Union[torch.device, str]) -> "NoiseSchedule":
        """This schedule with its tables on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = object.__new__(NoiseSchedule)
        for name, value in vars(self).items():
            setattr(moved, name, value.to(device) if isinstance(value, Tensor) else value)
        moved._step_tables = {}
        return moved

    def _with_terminal_abar(self, value: float) -> "NoiseSchedule":
        """A copy whose last abar is ``value``, for the steps' coefficients and ``alphas_cumprod``
        (the posterior tables keep the rescaled betas'). diffusers' DPM-Solver sets 2^-24 after a
        zero-terminal-SNR rescale, so that the first step's sigma is finite."""
        copy = object.__new__(NoiseSchedule)
        copy.__dict__.update(self.__dict__)
        copy._step_tables = {}
        abar = self._abar64.clone()
        abar[-1] = value
        one_minus = self._one_minus_abar64.clone()
        one_minus[-1] = 1.0 - value
        copy._abar64, copy._one_minus_abar64 = abar, one_minus
        copy._q_coeffs64 = _q_coeffs(abar, one_minus)
        copy.alphas_cumprod = abar.float()
        copy.sqrt_alphas_cumprod, copy.sqrt_one_minus_alphas_cumprod = copy._q_coeffs64.T.float().contiguous().unbind(0)
        return copy

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}, device={self.device})")

    def _gather(self, t: Tensor, final: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """(abar, 1 - abar) at timesteps t (float64); t < 0 gives (final, 1 - final)."""
        if final is None:
            return self._abar64[t], self._one_minus_abar64[t]
        valid = t >= 0
        index = t.clamp(min=0)
        abar = torch.where(valid, self._abar64[index], final)
        one_minus = torch.where(valid, self._one_minus_abar64[index], 1.0 - final)
        return abar, one_minus


def _q_coeffs(abar: Tensor, one_minus_abar: Tensor) -> Tensor:
    """q_sample's per-timestep coefficients (sqrt(abar), sqrt(1 - abar)), shape (T, 2)."""
    return torch.stack([abar.sqrt(), one_minus_abar.sqrt()], dim=1)


# ------------------------------------------------------------------------------ argument handling


def _schedule_on(fn: str, schedule: object, device: torch.device) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{fn}(): argument 'schedule' must be a genkernels.diffusion.NoiseSchedule, got {type(schedule).__name__}")
    return schedule.to(device)


def _timesteps(fn: str, name: str, t: object, batch: int, device: torch.device, num_train: int, *, minimum: int) -> Tensor:
    """Timesteps as an int64 tensor of shape (batch,) on `device`; values are checked only when they
    are already on the host, so a CUDA sampling loop never synchronises."""
    if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
        raise TypeError(f"{fn}(): argument '{name}' must be an int or an integer tensor, got {type(t).__name__}")
    if isinstance(t, int):
        if not minimum <= t < num_train:
            raise ValueError(f"{fn}(): argument '{name}' must be in [{minimum}, {num_train}), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{fn}(): argument '{name}' must be an integer tensor, got dtype {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
        raise ValueError(f"{fn}(): argument '{name}' must be a scalar or of shape ({batch},), got shape {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < minimum or hi >= num_train:
            raise ValueError(f"{fn}(): argument '{name}' must have values in [{minimum}, {num_train}), got [{lo}, {hi}]")
    # Only gathered with, so any strides will do (a scheduler's timestep is often expanded).
    if t.dtype == torch.int64 and t.shape == (batch,) and t.device == device:
        return t  # read only
    return t.to(device=device, dtype=torch.int64).reshape(-1).expand(batch)


def _as_kernel_input(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Contiguous, in ``dtype`` or else in a dtype the kernels take on that device (the CPU
    computes 16-bit in float32); ``t`` itself when it already is."""
    if dtype is None:
        half_on_cpu = t.dtype in _HALF and t.device.type == "cpu" and not launch_for(t).half_types
        dtype = torch.float32 if half_on_cpu else t.dtype
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _bcast(coef: Tensor, like: Tensor) -> Tensor:
    return coef.reshape((-1,) + (1,) * (like.dim() - 1))


def _empty() -> Tensor:
    return torch.empty(0)


# ------------------------------------------------------------------------------ q_sample


@custom_op("genkernels::q_sample", mutates_args=())
def _q_sample(x0: Tensor, noise: Optional[Tensor], coeffs: Tensor, seed: Tensor, return_velocity: bool) -> tuple[Tensor, Tensor, Tensor]:
    x0c = _as_kernel_input(x0)
    x_t = torch.empty_like(x0c)
    noise_out = _as_kernel_input(noise, x0c.dtype) if noise is not None else torch.empty_like(x0c)
    velocity = torch.empty_like(x0c) if return_velocity else x0c.new_empty(0)
    batch = x0c.shape[0] if x0c.dim() else 1
    run = launch_for(x_t)
    run.module.q_sample(
        run.where, run.stream, x_t.data_ptr(), noise_out.data_ptr(), velocity.data_ptr() if return_velocity else 0,
        x0c.data_ptr(), coeffs.data_ptr(), batch, x0c.numel() // max(batch, 1), noise is not None,
        DTYPE_CODES[x0c.dtype], seed.data_ptr(),
    )
    # A given noise is the caller's tensor: it is not returned (outputs must not alias inputs).
    noise_ret = noise_out.to(x0.dtype) if noise is None else x0.new_empty(0)
    return x_t.to(x0.dtype), noise_ret, velocity.to(x0.dtype)


@_q_sample.register_fake
def _(x0, noise, coeffs, seed, return_velocity):
    x_t = torch.empty_like(x0, memory_format=torch.contiguous_format)
    noise_ret = torch.empty_like(x_t) if noise is None else x0.new_empty(0)
    return x_t, noise_ret, torch.empty_like(x_t) if return_velocity else x0.new_empty(0)


def _q_sample_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.noise_given = inputs[1] is not None


def _q_sample_backward(ctx, grad_x_t, grad_noise_out, grad_velocity):
    (coeffs,) = ctx.saved_tensors
    a = _bcast(coeffs[:, _Q["signal"]].to(grad_x_t.dtype), grad_x_t)
    s = _bcast(coeffs[:, _Q["noise"]].to(grad_x_t.dtype), grad_x_t)
    # x_t = a x0 + s eps and v = a eps - s x0.
    grad_x0 = a * grad_x_t
    grad_noise = s * grad_x_t if ctx.noise_given else None
    if grad_velocity.numel():
        grad_x0 = grad_x0 - s * grad_velocity
        if grad_noise is not None:
            grad_noise = grad_noise + a * grad_velocity
    return grad_x0, grad_noise, None, None, None


_q_sample.register_autograd(_q_sample_backward, setup_context=_q_sample_setup)


def q_sample(
    x0: Tensor,
    t: Timesteps,
    schedule: NoiseSchedule,
    noise: Optional[Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
    return_velocity: bool = False,
) -> Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Samples q(x_t | x_0): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (Ho et al. 2020, eq. 4).

    ``x0`` is (B, ...); ``t`` an int or an integer tensor of shape (B,) (one timestep per sample).
    Without ``noise`` the noise is drawn inside the kernel. Returns ``(x_t, noise)``, and with
    ``return_velocity=True`` also the v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``.
    Differentiable with respect to ``x0`` and a given ``noise``. Equals diffusers' ``add_noise``
    (and ``get_velocity``) for the same noise.

    Example:
        >>> schedule = NoiseSchedule(1000)
        >>> t = torch.randint(0, 1000, (x0.shape[0],))
        >>> x_t, eps = genkernels.q_sample(x0, t, schedule)
        >>> loss = F.mse_loss(model(x_t, t), eps)
    """
    fn = "q_sample"
    x0 = _checks.float_tensor(fn, "x0", x0, min_dim=1, cpu_extra=(torch.float16, torch.bfloat16))
    schedule = _schedule_on(fn, schedule, x0.device)
    if noise is not None:
        noise = _checks.float_tensor(fn, "noise", noise, cpu_extra=(torch.float16, torch.bfloat16))
        _checks.same_device(fn, {"x0": x0, "noise": noise})
        _checks.same_dtype(fn, {"x0": x0, "noise": noise})
        if noise.shape != x0.shape:
            raise ValueError(f"{fn}(): argument 'noise' must have the shape of 'x0' {tuple(x0.shape)}, got {tuple(noise.shape)}")
    generator = _checks.generator(fn, generator)
    t = _timesteps(fn, "t", t, x0.shape[0], x0.device, len(schedule), minimum=0)
    coeffs = schedule._q_coeffs64[t]
    seed = draw_seed(generator, x0.device) if noise is None else torch.zeros(2, dtype=torch.int64, device=x0.device)
    x_t, eps, v = _q_sample(x0, noise, coeffs, seed, bool(return_velocity))
    eps = noise if noise is not None else eps
    return (x_t, eps, v) if return_velocity else (x_t, eps)


# ------------------------------------------------------------------------------ reverse steps


def _x0_coeffs(prediction_type: str, abar: Tensor, one_minus: Tensor) -> tuple[Tensor, Tensor]:
    """x0 = a_x x + a_e e for the model's prediction type (Salimans & Ho 2022 for v)."""
    if prediction_type == "epsilon":
        return 1.0 / abar.sqrt(), -one_minus.sqrt() / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt(), -one_minus.sqrt()
    return torch.zeros_like(abar), torch.ones_like(abar)


def _guidance(fn: str, model_output: Union[Tensor, Sequence[Tensor]], guidance_scale: Optional[float]):
    """(uncond or the model output, cond or None, w)."""
    if isinstance(model_output, Tensor):
        if guidance_scale is not None:
            raise ValueError(f"{fn}(): 'guidance_scale' needs model_output=(uncond, cond), got a single tensor")
        return model_output, None, 0.0
    if not isinstance(model_output, (tuple, list)) or len(model_output) != 2:
        raise TypeError(f"{fn}(): argument 'model_output' must be a tensor or a pair (uncond, cond), got {type(model_output).__name__}")
    if guidance_scale is None:
        raise ValueError(f"{fn}(): model_output=(uncond, cond) needs 'guidance_scale'")
    return model_output[0], model_output[1], _checks.real(fn, "guidance_scale", guidance_scale)


class _StepInputs:
    """A step's checked tensors, in the dtype and layout the kernel takes."""

    def __init__(self, fn, model_output, sample, guidance_scale, guidance_rescale, noise, variance_type=None, prev_x0=None):
        uncond, cond, w = _guidance(fn, model_output, guidance_scale)
        sample = _checks.float_tensor(fn, "sample", sample, min_dim=1, cpu_extra=_HALF)
        args = {"sample": sample, "model_output": _checks.float_tensor(fn, "model_output", uncond, cpu_extra=_HALF)}
        if cond is not None:
            args["model_output[1]"] = _checks.float_tensor(fn, "model_output[1]", cond, cpu_extra=_HALF)
        for name, value in (("noise", noise), ("prev_x0", prev_x0)):
            if value is not None:
                args[name] = _checks.float_tensor(fn, name, value, cpu_extra=_HALF)
        _checks.same_device(fn, args)
        _checks.same_dtype(fn, args)
        self.variance = None
        if variance_type in ("learned", "learned_range") and uncond.dim() >= 2 and uncond.shape[1] == 2 * sample.shape[1]:
            # diffusers' convention: the model predicts [eps | variance] along the channels; with
            # guidance the variance comes from the conditional output.
            channels = sample.shape[1]
            if cond is not None and cond.shape != uncond.shape:  # the variance is read from cond: it must be whole
                raise ValueError(f"{fn}(): argument 'model_output[1]' must have the shape of 'model_output' {tuple(uncond.shape)}, got {tuple(cond.shape)}")
            self.variance = (uncond if cond is None else cond)[:, channels:]
            for name in ("model_output", "model_output[1]"):
                if name in args:
                    args[name] = args[name][:, :channels]
        for name, value in args.items():
            if value.shape != sample.shape:
                raise ValueError(f"{fn}(): argument '{name}' must have the shape of 'sample' {tuple(sample.shape)}, got {tuple(value.shape)}")
        self.dtype = sample.dtype
        self.device = sample.device
        self.batch = sample.shape[0]
        self.sample = sample
        self.model, self.cond = args["model_output"], args.get("model_output[1]")
        self.w = w
        self.rescale = _checks.real(fn, "guidance_rescale", guidance_rescale)
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"{fn}(): argument 'guidance_rescale' must be in [0, 1], got {self.rescale}")
        self.noise = noise
        self.prev_x0 = prev_x0

    def guide_scale(self) -> Tensor:
        """The per-sample rescale of the guided output (Lin et al. 2023, eq. 15-16), for a guided
        step with guidance_rescale > 0."""
        dims = list(range(1, self.sample.dim()))
        uncond, cond = self.model.double(), self.cond.double()
        cfg = uncond + self.w * (cond - uncond)
        std_cond, std_cfg = cond.std(dim=dims), cfg.std(dim=dims)
        return self.rescale * (std_cond / std_cfg) + (1.0 - self.rescale)


@custom_op("genkernels::diffusion_step", mutates_args=())
def _diffusion_step(
    sample: Tensor, model: Tensor, model_cond: Optional[Tensor], variance: Optional[Tensor], variance_input: int,
    prev_x0: Optional[Tensor], noise: Optional[Tensor], coeffs: Tensor, seed: Optional[Tensor], want_prev: bool,
) -> tuple[Tensor, Tensor]:
    x = _as_kernel_input(sample)
    inputs = [None if t is None else _as_kernel_input(t, x.dtype) for t in (model, model_cond, variance, prev_x0, noise)]
    x0 = torch.empty_like(x)
    prev = torch.empty_like(x) if want_prev else x.new_empty(0)
    batch = x.shape[0]
    run = launch_for(x)
    ptr = [0 if t is None else t.data_ptr() for t in inputs]
    run.module.diffusion_step(
        run.where, run.stream, prev.data_ptr() if want_prev else 0, x0.data_ptr(), x.data_ptr(), ptr[0], ptr[1],
        ptr[2], variance_input, ptr[3], ptr[4], coeffs.data_ptr(), batch, x.numel() // max(batch, 1),
        DTYPE_CODES[x.dtype], 0 if seed is None else seed.data_ptr(),
    )
    if x.dtype != sample.dtype:  # computed in float32 for 16-bit storage
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
    return prev, x0


@_diffusion_step.register_fake
def _(sample, model, model_cond, variance, variance_input, prev_x0, noise, coeffs, seed, want_prev):
    x0 = torch.empty_like(sample, memory_format=torch.contiguous_format)
    return (torch.empty_like(x0) if want_prev else sample.new_empty(0)), x0


CoeffsOf = Callable[[NoiseSchedule, Tensor, "_StepInputs"], Tensor]


@dataclass(frozen=True)
class _Plan:
    """A reverse step with its options checked: ``build(schedule, t, t_prev[, s1])`` makes the
    coefficient rows of steps t -> t_prev (second order from an x0 predicted at s1), ``key`` names
    the options the rows depend on (schedulers keep one table of rows per key)."""

    key: tuple
    build: Callable[..., Tensor]
    limits: tuple[Optional[float], Optional[tuple[float, float]]]
    draw_noise: bool
    variance_type: Optional[str] = None


def _step(fn: str, plan: _Plan, model_output: Union[Tensor, Sequence[Tensor]], t: Timesteps, sample: Tensor,
          schedule: NoiseSchedule, coeffs_of: CoeffsOf, *, guidance_scale: Optional[float], guidance_rescale: float,
          generator: Optional[torch.Generator], noise: Optional[Tensor], prev_x0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """What every reverse step does around its coefficients: checks the tensors and timesteps,
    takes the per-sample coefficient rows ``coeffs_of(schedule, t, inputs)`` (guidance columns
    left at w = 0, scale 1), adds guidance and runs the kernel."""
    inputs = _StepInputs(fn, model_output, sample, guidance_scale, guidance_rescale, noise, plan.variance_type, prev_x0)
    schedule = _schedule_on(fn, schedule, inputs.device)
    generator = _checks.generator(fn, generator)
    t = _timesteps(fn, "t", t, inputs.batch, inputs.device, len(schedule), minimum=0)
    learned = plan.variance_type if plan.variance_type in ("learned", "learned_range") else None
    if learned and inputs.variance is None:
        raise ValueError(f"{fn}(): variance_type={learned!r} needs a model output with twice the sample's channels (dim 1), got {tuple(inputs.model.shape)}")
    coeffs = coeffs_of(schedule, t, inputs)
    if inputs.cond is not None:
        coeffs[:, _S["guide_w"]] = inputs.w
        if inputs.rescale != 0.0:  # without rescale the rows' guide scale of 1 stands
            coeffs[:, _S["guide_scale"]] = inputs.guide_scale()
    return _run_step(inputs, coeffs, thresholding=plan.limits[1], draw_noise=plan.draw_noise, generator=generator,
                     variance_input=learned)


def _run_step(inputs: _StepInputs, coeffs: Tensor, *, thresholding: Optional[tuple[float, float]],
              draw_noise: bool, generator: Optional[torch.Generator], variance_input: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Runs the step kernel; with dynamic thresholding (ratio, max) a first pass predicts x0 to find
    each sample's threshold s (Saharia et al. 2022, sec. 2.3), and the step clamps to [-s, s] / s."""
    if thresholding is not None:
        _, x0 = _diffusion_step(inputs.sample, inputs.model, inputs.cond, None, 0, None, None, coeffs, None, False)
        ratio, max_value = thresholding
        magnitude = x0.reshape(inputs.batch, -1).abs()
        if magnitude.dtype not in (torch.float32, torch.float64):  # quantile takes neither 16-bit type
            magnitude = magnitude.float()
        s = torch.quantile(magnitude, ratio, dim=1).clamp(1.0, max_value).double()
        coeffs = coeffs.clone()
        coeffs[:, _S["clip_lo"]], coeffs[:, _S["clip_hi"]], coeffs[:, _S["clip_div"]] = -s, s, s
    seed = draw_seed(generator, inputs.device) if draw_noise and inputs.noise is None else None
    return _diffusion_step(
        inputs.sample, inputs.model, inputs.cond, inputs.variance, _VARIANCE_INPUT[variance_input], inputs.prev_x0,
        inputs.noise if draw_noise else None, coeffs, seed, True,
    )


def _limits(clip_sample: bool, clip_sample_range: float, thresholding: bool, ratio: float,
            max_value: float) -> tuple[Optional[float], Optional[tuple[float, float]]]:
    """(clip range, (threshold ratio, max)) of a step; thresholding replaces clipping, as in diffusers."""
    if thresholding:
        return None, (ratio, max_value)
    return (clip_sample_range if clip_sample else None), None


def _base_coeffs(abar: Tensor, one_minus: Tensor, prediction_type: str, clip: Optional[float]) -> Tensor:
    """Coefficient rows with the x0 prediction and its clip range filled in, no guidance
    (w = 0, scale 1), the rest zero."""
    k = torch.zeros(abar.shape[0], len(_S), dtype=torch.float64, device=abar.device)
    k[:, _S["guide_scale"]] = 1.0
    k[:, _S["x0_from_x"]], k[:, _S["x0_from_e"]] = _x0_coeffs(prediction_type, abar, one_minus)
    k[:, _S["clip_lo"]], k[:, _S["clip_hi"]] = (-clip, clip) if clip is not None else (-math.inf, math.inf)
    k[:, _S["clip_div"]] = 1.0
    return k


def _table_rows(tables: dict[tuple, Tensor], key: tuple, t: Tensor, build: Callable[[], Tensor]) -> Tensor:
    """Rows t of the coefficient table ``tables[key]``, made by ``build()`` on first use."""
    table = tables.get(key)
    if table is None:
        table = tables[key] = build()
    return table[t]


def _explicit(fn: str, plan: _Plan, t_prev: Optional[Timesteps], s1: Optional[Timesteps] = None) -> CoeffsOf:
    """The coefficients of steps from t to a given t_prev, second order from an x0 predicted at a
    given s1, both checked. Steps to t - 1 (t_prev None) gather their rows from a table of every t,
    built once per schedule and plan, instead of computing them in some twenty small tensor
    operations a call."""
    def coeffs_of(schedule: NoiseSchedule, t: Tensor, inputs: _StepInputs) -> Tensor:
        n = len(schedule)
        if t_prev is None and s1 is None:
            def build() -> Tensor:
                every = torch.arange(n, device=schedule.device)
                return plan.build(schedule, every, every - 1)
            return _table_rows(schedule._step_tables, plan.key, t, build)
        prev = t - 1 if t_prev is None else _timesteps(fn, "t_prev", t_prev, inputs.batch, inputs.device, n, minimum=-1)
        if s1 is None:
            return plan.build(schedule, t, prev)
        return plan.build(schedule, t, prev, _timesteps(fn, "prev_x0_t", s1, inputs.batch, inputs.device, n, minimum=0))
    return coeffs_of


def ddpm_step(
    model_output: Union[Tensor, Sequence[Tensor]],
    t: Timesteps,
    sample: Tensor,
    schedule: NoiseSchedule,
    *,
    t_prev: Optional[Timesteps] = None,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = True,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    guidance_scale: Optional[float] = None,
    guidance_rescale: float = 0.0,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step x_t -> x_{t_prev} (Ho et al. 2020, eq. 7 and algorithm 2).

    ``t`` (and ``t_prev``, default ``t - 1``; -1 means the end of the chain) are ints or integer
    tensors of shape (B,): every sample may be at its own timestep. Returns
    ``(prev_sample, pred_original_sample)`` as diffusers' ``DDPMScheduler.step`` computes them, in
    one pass: the x0 prediction of ``prediction_type``, clipping to ``clip_sample_range`` or dynamic
    thresholding, the posterior mean, and noise of the ``variance_type``'s scale where t > 0 (drawn
    in the kernel unless ``noise`` is given). For ``learned``/``learned_range`` the model output
    carries the predicted variance in its second half of channels.

    Classifier-free guidance: pass ``model_output=(uncond, cond)`` and ``guidance_scale``; the mix
    ``uncond + w (cond - uncond)`` (rescaled by ``guidance_rescale`` as in diffusers) is formed in
    the same pass.
    """
    fn = "ddpm_step"
    plan = _ddpm_plan(fn, prediction_type, variance_type, clip_sample, clip_sample_range, thresholding,
                      dynamic_thresholding_ratio, sample_max_value)
    return _step(fn, plan, model_output, t, sample, schedule, _explicit(fn, plan, t_prev),
                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator, noise=noise)


def _ddpm_plan(fn: str, prediction_type: str, variance_type: str, clip_sample: bool, clip_sample_range: float,
               thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float) -> _Plan:
    prediction_type = _checks.choice(fn, "prediction_type", prediction_type, PREDICTION_TYPES)
    variance_type = _checks.choice(fn, "variance_type", variance_type, VARIANCE_TYPES)
    limits = _limits(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    return _Plan(
        key=("ddpm", prediction_type, variance_type, limits[0]),
        build=lambda schedule, t, t_prev: _ddpm_coeffs(schedule, t, t_prev, prediction_type, variance_type, limits[0]),
        limits=limits, draw_noise=True, variance_type=variance_type,
    )


def _ddpm_coeffs(schedule: NoiseSchedule, t: Tensor, t_prev: Tensor, prediction_type: str, variance_type: str,
                 clip: Optional[float]) -> Tensor:
    """Coefficient rows of DDPM steps t -> t_prev."""
    abar, one_minus = schedule._gather(t)
    abar_prev, one_minus_prev = schedule._gather(t_prev, final=1.0)
    alpha = abar / abar_prev  # of the step t_prev -> t
    beta = 1.0 - alpha
    k = _base_coeffs(abar, one_minus, prediction_type, clip)
    # Posterior mean (Ho et al. 2020, eq. 7).
    k[:, _S["out_x0"]] = abar_prev.sqrt() * beta / one_minus
    k[:, _S["out_x"]] = alpha.sqrt() * one_minus_prev / one_minus
    variance = (one_minus_prev / one_minus * beta).clamp(min=1e-20)
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = variance.sqrt()
    elif variance_type in ("fixed_large", "fixed_large_log"):
        std = beta.sqrt()
    else:  # learned: the kernel takes the std from the predicted variance
        std = torch.ones_like(beta)
        k[:, _S["log_var_min"]], k[:, _S["log_var_max"]] = variance.log(), beta.log()
    k[:, _S["noise_std"]] = torch.where(t > 0, std, 0.0)
    return k


def ddim_step(
    model_output: Union[Tensor, Sequence[Tensor]],
    t: Timesteps,
    t_prev: Timesteps,
    sample: Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    set_alpha_to_one: bool = True,
    guidance_scale: Optional[float] = None,
    guidance_rescale: float = 0.0,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12), ``eta`` scaling its noise.

    ``t`` and ``t_prev`` are ints or integer tensors of shape (B,); ``t_prev = -1`` steps to the
    final abar (1 with ``set_alpha_to_one``, else abar_0). Returns ``(prev_sample,
    pred_original_sample)`` as diffusers' ``DDIMScheduler.step`` computes them for that previous
    timestep, in one pass. Guidance as in ``ddpm_step``.
    """
    fn = "ddim_step"
    plan = _ddim_plan(fn, eta, prediction_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                      sample_max_value, use_clipped_model_output, set_alpha_to_one)
    return _step(fn, plan, model_output, t, sample, schedule, _explicit(fn, plan, t_prev),
                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator, noise=noise)


def _ddim_plan(fn: str, eta: float, prediction_type: str, clip_sample: bool, clip_sample_range: float,
               thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float,
               use_clipped_model_output: bool, set_alpha_to_one: bool) -> _Plan:
    prediction_type = _checks.choice(fn, "prediction_type", prediction_type, PREDICTION_TYPES)
    eta = _checks.real(fn, "eta", eta)
    if eta < 0:
        raise ValueError(f"{fn}(): argument 'eta' must be >= 0, got {eta}")
    limits = _limits(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    options = (eta, prediction_type, limits[0], bool(use_clipped_model_output), bool(set_alpha_to_one))
    return _Plan(
        key=("ddim", *options),
        build=lambda schedule, t, t_prev: _ddim_coeffs(schedule, t, t_prev, *options),
        limits=limits, draw_noise=eta > 0,
    )


def _ddim_coeffs(schedule: NoiseSchedule, t: Tensor, t_prev: Tensor, eta: float, prediction_type: str,
                 clip: Optional[float], use_clipped_model_output: bool, set_alpha_to_one: bool) -> Tensor:
    """Coefficient rows of DDIM steps t -> t_prev."""
    abar, one_minus = schedule._gather(t)
    final = 1.0 if set_alpha_to_one else schedule._abar0
    abar_prev, one_minus_prev = schedule._gather(t_prev, final=final)
    k = _base_coeffs(abar, one_minus, prediction_type, clip)
    # The noise the step follows: the model's, or recomputed from the (clipped) x0.
    if use_clipped_model_output or prediction_type == "sample":
        source = "eps_from_x0" if use_clipped_model_output else "eps_from_e"
        k[:, _S["eps_from_x"]], k[:, _S[source]] = 1.0 / one_minus.sqrt(), -abar.sqrt() / one_minus.sqrt()
    elif prediction_type == "v_prediction":
        k[:, _S["eps_from_x"]], k[:, _S["eps_from_e"]] = one_minus.sqrt(), abar.sqrt()
    else:
        k[:, _S["eps_from_e"]] = 1.0
    # sigma_t (Song et al. 2021, eq. 16).
    std = eta * ((one_minus_prev / one_minus) * (1.0 - abar / abar_prev)).sqrt()
    k[:, _S["out_x0"]] = abar_prev.sqrt()
    k[:, _S["out_eps"]] = (one_minus_prev - std**2).sqrt()
    k[:, _S["noise_std"]] = std
    return k


def _half_log_snr(abar: Tensor, one_minus: Tensor) -> Tensor:
    """lambda = log(alpha_t / sigma_t) = log(sqrt(abar) / sqrt(1 - abar)); +inf where abar = 1."""
    return 0.5 * (abar.log() - one_minus.log())


def dpm_solver_step(
    model_output: Union[Tensor, Sequence[Tensor]],
    t: Timesteps,
    t_prev: Timesteps,
    sample: Tensor,
    schedule: NoiseSchedule,
    *,
    prev_x0: Optional[Tensor] = None,
    prev_x0_t: Optional[Timesteps] = None,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    prediction_type: str = "epsilon",
    final_sigmas_type: str = "zero",
    euler_at_final: bool = False,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    guidance_scale: Optional[float] = None,
    guidance_rescale: float = 0.0,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++ step x_t -> x_{t_prev} (Lu et al. 2022, "DPM-Solver++", algorithm 2),
    as diffusers' ``DPMSolverMultistepScheduler`` takes it, in one pass.

    First order (``prev_x0=None``, equal to DDIM), or second order from the data prediction
    ``prev_x0`` that the previous step made at timestep ``prev_x0_t`` (the multistep method: that
    step's returned ``pred_original_sample``). With lambda = log(alpha_t / sigma_t),
    h = lambda_{t_prev} - lambda_t, r0 = (lambda_t - lambda_{prev_x0_t}) / h and
    D1 = (x0 - prev_x0) / r0, the ``dpmsolver++`` step is
    ``sigma_prev / sigma_t * x + alpha_prev (1 - e^-h) (x0 + D1 / 2)`` (``solver_type="midpoint"``;
    ``"heun"`` weighs D1 by ``alpha_prev (1 - (1 - e^-h) / h)``). ``sde-dpmsolver++``, the SDE
    variant, scales the x term by e^-h, takes 1 - e^-2h for 1 - e^-h (and 2h for h) and adds noise
    of standard deviation ``sigma_prev sqrt(1 - e^-2h)``, drawn in the kernel unless ``noise`` is
    given (``generator`` as in ``ddpm_step``).

    ``t``, ``t_prev`` and ``prev_x0_t`` are ints or integer tensors of shape (B,). ``t_prev = -1``
    is the end of the chain: sigma 0 (``final_sigmas_type="zero"``; that step is always first
    order, as in diffusers, since its second-order term has no limit) or the schedule's smallest
    sigma (``"sigma_min"``). ``euler_at_final=True`` makes every step to the end first order.
    The noise level must fall along the chain, ``prev_x0_t > t > t_prev`` (not checked, so that
    no value is read on the host; a step of zero length gives NaN, as in diffusers).
    Returns ``(prev_sample, pred_original_sample)``; the x0 prediction of ``prediction_type`` is
    clipped or thresholded as in ``ddim_step`` before the step uses it, and guidance is as in
    ``ddpm_step``. The per-sample coefficients are computed in float64 on the data's device.
    """
    fn = "dpm_solver_step"
    if (prev_x0 is None) != (prev_x0_t is None):
        raise ValueError(f"{fn}(): pass both 'prev_x0' and 'prev_x0_t' (second order) or neither (first order)")
    plan = _dpm_plan(fn, algorithm_type, solver_type, prediction_type, final_sigmas_type, euler_at_final, clip_sample,
                     clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    return _step(fn, plan, model_output, t, sample, schedule, _explicit(fn, plan, t_prev, prev_x0_t),
                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator, noise=noise,
                 prev_x0=prev_x0)


def _dpm_plan(fn: str, algorithm_type: str, solver_type: str, prediction_type: str, final_sigmas_type: str,
              euler_at_final: bool, clip_sample: bool, clip_sample_range: float, thresholding: bool,
              dynamic_thresholding_ratio: float, sample_max_value: float) -> _Plan:
    algorithm_type = _checks.choice(fn, "algorithm_type", algorithm_type, DPM_ALGORITHM_TYPES)
    solver_type = _checks.choice(fn, "solver_type", solver_type, DPM_SOLVER_TYPES)
    prediction_type = _checks.choice(fn, "prediction_type", prediction_type, PREDICTION_TYPES)
    final_sigmas_type = _checks.choice(fn, "final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if not isinstance(euler_at_final, bool):
        raise TypeError(f"{fn}(): argument 'euler_at_final' must be a bool, got {type(euler_at_final).__name__}")
    limits = _limits(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)
    options = (algorithm_type, solver_type, prediction_type, final_sigmas_type, euler_at_final, limits[0])
    return _Plan(
        key=("dpm", *options),
        build=lambda schedule, t, t_prev, s1=None: _dpm_coeffs(schedule, t, t_prev, s1, *options),
        limits=limits, draw_noise=algorithm_type == "sde-dpmsolver++",
    )


def _dpm_coeffs(schedule: NoiseSchedule, t: Tensor, t_prev: Tensor, s1: Optional[Tensor], algorithm_type: str,
                solver_type: str, prediction_type: str, final_sigmas_type: str, euler_at_final: bool,
                clip: Optional[float]) -> Tensor:
    """Coefficient rows of DPM-Solver++ steps t -> t_prev: first order, or second order from the
    x0 predicted at s1."""
    abar, one_minus = schedule._gather(t)
    final = 1.0 if final_sigmas_type == "zero" else schedule._abar0
    abar_prev, one_minus_prev = schedule._gather(t_prev, final=final)
    k = _base_coeffs(abar, one_minus, prediction_type, clip)
    h = _half_log_snr(abar_prev, one_minus_prev) - _half_log_snr(abar, one_minus)
    alpha_prev = abar_prev.sqrt()
    sigma_ratio = (one_minus_prev / one_minus).sqrt()  # sigma_{t_prev} / sigma_t
    sde = algorithm_type == "sde-dpmsolver++"
    decay = 2.0 if sde else 1.0
    phi = -torch.expm1(-decay * h)  # 1 - e^-h, or 1 - e^-2h for the SDE
    k[:, _S["out_x"]] = sigma_ratio * torch.exp(-h) if sde else sigma_ratio
    x0_weight = alpha_prev * phi
    if s1 is not None:
        abar1, one_minus1 = schedule._gather(s1)
        h0 = _half_log_snr(abar, one_minus) - _half_log_snr(abar1, one_minus1)
        # The term d1_weight * D1 with D1 = (x0 - prev_x0) h / h0, split between x0 and prev_x0.
        d1_weight = 0.5 * x0_weight if solver_type == "midpoint" else alpha_prev * (1.0 - phi / (decay * h))
        first_order = (t_prev < 0) & (final_sigmas_type == "zero" or euler_at_final)
        d1 = torch.where(first_order, 0.0, d1_weight * (h / h0))
        k[:, _S["out_x0"]] = x0_weight + d1
        k[:, _S["out_prev_x0"]] = -d1
    else:
        k[:, _S["out_x0"]] = x0_weight
    if sde:
        k[:, _S["noise_std"]] = one_minus_prev.sqrt() * phi.sqrt()
    return k
