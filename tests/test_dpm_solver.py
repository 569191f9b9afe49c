"""DPM-Solver++ (first order and multistep second order, ODE and SDE): the fused step against the
float64 reference and diffusers' DPMSolverMultistepScheduler evaluated in float64."""

from __future__ import annotations

import itertools
import math

import diffusers
import numpy as np
import pytest
import torch

import genkernels
from genkernels import reference
from genkernels.diffusion import NoiseSchedule, dpm_solver_step

from test_diffusion import abar64, assert_close_to
from tolerances import low_precision_tol

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
ALGORITHMS = ["dpmsolver++", "sde-dpmsolver++"]
SOLVERS = ["midpoint", "heun"]


class _Float64Names:
    """A module whose ``float32`` is ``float64``: what diffusers' DPM-Solver module sees below."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, "float64" if name == "float32" else name)


@pytest.fixture
def diffusers_dpm(monkeypatch):
    """diffusers' DPMSolverMultistepScheduler with every float32 of its module read as float64:
    its tables, sigmas and the sample it upcasts are float64, so it evaluates its own formulas in
    float64 (in float32 it differs from them by ~1e-4 relative at small t)."""
    module = diffusers.schedulers.scheduling_dpmsolver_multistep
    monkeypatch.setattr(module, "torch", _Float64Names(torch))
    monkeypatch.setattr(module, "np", _Float64Names(np))
    return module.DPMSolverMultistepScheduler


def denoiser(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed smooth stand-in for a trained model."""
    return torch.sin(3 * x) * 0.5 + 1e-4 * float(t)


def _case(batch=3, shape=(4, 5), dtype=torch.float64, device="cpu"):
    x = torch.randn(batch, *shape, dtype=dtype, device=device)
    return x, torch.randn_like(x), torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)


T = torch.tensor([981, 501, 21])
T_PREV = torch.tensor([961, 481, -1])
T_X0 = torch.tensor([999, 521, 41])


# ------------------------------------------------------------------------------ single steps


@pytest.mark.parametrize("prediction_type, solver_type, order, algorithm_type, limit, guided",
                         list(itertools.product(PREDICTION_TYPES, SOLVERS, [1, 2], ALGORITHMS,
                                                ["none", "clip", "threshold"], [False, True])))
def test_step_matrix_matches_reference(prediction_type, solver_type, order, algorithm_type, limit, guided):
    s = NoiseSchedule()
    x, uncond, cond, prev_x0, noise = _case()
    model_output = (uncond, cond) if guided else uncond
    e = reference.guided(uncond, cond, 4.0) if guided else uncond
    kwargs = dict(algorithm_type=algorithm_type, solver_type=solver_type, prediction_type=prediction_type,
                  final_sigmas_type="sigma_min")
    second = dict(prev_x0=prev_x0, prev_x0_t=T_X0) if order == 2 else {}
    prev, x0 = dpm_solver_step(model_output, T, T_PREV, x, s, **kwargs, **second, clip_sample=limit == "clip",
                               thresholding=limit == "threshold", dynamic_thresholding_ratio=0.9,
                               sample_max_value=2.0, guidance_scale=4.0 if guided else None, noise=noise)
    ref_prev, ref_x0 = reference.dpm_solver_step(
        e, T, T_PREV, x, abar64(s), noise, **kwargs, **second, clip=1.0 if limit == "clip" else None,
        threshold=(0.9, 2.0) if limit == "threshold" else None)
    assert_close_to(x0, ref_x0, 1e-12)
    assert_close_to(prev, ref_prev, 1e-12, scale=ref_x0.abs().max().item())


@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
@pytest.mark.parametrize("solver_type", SOLVERS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("thresholding", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_steps_equal_diffusers_float64(diffusers_dpm, algorithm_type, solver_type, prediction_type, thresholding, guided):
    """The op, called step by step as a multistep loop would, against diffusers' step: the first
    step is first order, the next two second order, with the x0 that the op returned."""
    theirs = diffusers_dpm(algorithm_type=algorithm_type, solver_type=solver_type, prediction_type=prediction_type,
                           thresholding=thresholding, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    theirs.set_timesteps(20)
    chain = theirs.timesteps.tolist()
    x, uncond, cond, _, _ = _case(batch=2, shape=(3, 8))
    s = NoiseSchedule()
    prev_x0 = prev_t = None
    for i, t in enumerate(chain[:3]):
        noise = torch.randn_like(x)
        cond_t = cond * math.cos(i)
        e = uncond + 7.5 * (cond_t - uncond)
        expected = theirs.step(e, t, x, variance_noise=noise).prev_sample
        prev, x0 = dpm_solver_step((uncond, cond_t) if guided else e, t, chain[i + 1], x, s, prev_x0=prev_x0,
                                   prev_x0_t=prev_t, algorithm_type=algorithm_type, solver_type=solver_type,
                                   prediction_type=prediction_type, thresholding=thresholding,
                                   dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                                   guidance_scale=7.5 if guided else None, noise=noise)
        assert_close_to(x0, theirs.model_outputs[-1], 1e-11)
        assert_close_to(prev, expected, 1e-11)
        x, prev_x0, prev_t = expected, x0, t


def test_step_equals_diffusers_in_float32():
    """The unpatched diffusers, float32 throughout, at a timestep where its float32 is accurate."""
    theirs = diffusers.DPMSolverMultistepScheduler()
    theirs.set_timesteps(20)
    chain = theirs.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8)
    s = NoiseSchedule()
    prev_x0 = prev_t = None
    for i, t in enumerate(chain[:3]):
        m = denoiser(x, t)
        expected = theirs.step(m, t, x).prev_sample
        prev, prev_x0 = dpm_solver_step(m, t, chain[i + 1], x, s, prev_x0=prev_x0, prev_x0_t=prev_t)
        torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5)
        x, prev_t = expected, t


@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
@pytest.mark.parametrize("solver_type", SOLVERS)
def test_final_step(algorithm_type, solver_type):
    """To sigma 0 the step is first order and lands on x0 (diffusers' final_sigmas_type="zero");
    to sigma_min it is second order unless euler_at_final."""
    s = NoiseSchedule()
    x, m, _, prev_x0, noise = _case()
    t, t_prev, t_x0 = torch.tensor([21, 41, 3]), torch.tensor([-1, 21, -1]), torch.tensor([41, 61, 5])
    kwargs = dict(algorithm_type=algorithm_type, solver_type=solver_type, noise=noise)
    prev, x0 = dpm_solver_step(m, t, t_prev, x, s, prev_x0=prev_x0, prev_x0_t=t_x0, **kwargs)
    assert torch.isfinite(prev).all()
    torch.testing.assert_close(prev[[0, 2]], x0[[0, 2]], rtol=1e-14, atol=1e-14)
    first, _ = dpm_solver_step(m, t, t_prev, x, s, **kwargs)
    assert not torch.allclose(prev[1], first[1])  # the sample not at the end stays second order
    for euler in (False, True):
        prev, _ = dpm_solver_step(m, t, t_prev, x, s, prev_x0=prev_x0, prev_x0_t=t_x0, final_sigmas_type="sigma_min",
                                  euler_at_final=euler, **kwargs)
        ref, _ = reference.dpm_solver_step(m, t, t_prev, x, abar64(s), noise, prev_x0=prev_x0, prev_x0_t=t_x0,
                                           final_sigmas_type="sigma_min", euler_at_final=euler,
                                           algorithm_type=algorithm_type, solver_type=solver_type)
        assert_close_to(prev, ref, 1e-12, scale=100.0)
        first, _ = dpm_solver_step(m, t, t_prev, x, s, final_sigmas_type="sigma_min", **kwargs)
        assert torch.equal(prev[[0, 2]], first[[0, 2]]) == euler


def test_first_order_is_ddim():
    """First-order DPM-Solver++ is DDIM (Lu et al. 2022)."""
    s = NoiseSchedule()
    x, m, _, _, _ = _case()
    prev, x0 = dpm_solver_step(m, T, T_PREV, x, s, final_sigmas_type="zero")
    ddim_prev, ddim_x0 = genkernels.ddim_step(m, T, T_PREV, x, s, clip_sample=False)
    assert_close_to(prev, ddim_prev, 1e-12)
    assert_close_to(x0, ddim_x0, 1e-12)


def test_per_sample_timesteps(backend):
    s = NoiseSchedule()
    x, m, _, prev_x0, noise = _case(batch=4, shape=(3, 9), dtype=torch.float32, device=backend.device)
    t, t_prev, t_x0 = (torch.tensor(v, device=backend.device) for v in ([990, 3, 37, 500], [950, -1, 0, 480], [999, 20, 60, 520]))
    for algorithm_type in ALGORITHMS:
        kwargs = dict(algorithm_type=algorithm_type, final_sigmas_type="sigma_min")
        prev, x0 = dpm_solver_step(m, t, t_prev, x, s, prev_x0=prev_x0, prev_x0_t=t_x0, noise=noise, **kwargs)
        for i in range(4):
            one = slice(i, i + 1)
            p_i, x0_i = dpm_solver_step(m[one], int(t[i]), int(t_prev[i]), x[one], s, prev_x0=prev_x0[one],
                                        prev_x0_t=int(t_x0[i]), noise=noise[one], **kwargs)
            assert torch.equal(prev[one], p_i) and torch.equal(x0[one], x0_i)
        assert torch.isfinite(prev).all()


@pytest.mark.parametrize("shape", [(1, 1), (5, 3, 7), (3, 1030), (0, 4)])
def test_backends_and_dtypes_match_reference(backend, shape):
    s = NoiseSchedule()
    t = torch.randint(1, 1000, (shape[0],))
    t_prev, t_x0 = t - torch.randint(1, 50, t.shape) - 1, (t + 30).clamp(max=999)
    t_prev = torch.where(torch.arange(shape[0]) == 0, -1, t_prev.clamp(min=0))
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
        x, m, _, prev_x0, noise = (v.to(dtype) for v in _case(shape[0], shape[1:], device=backend.device))
        for algorithm_type, solver_type in itertools.product(ALGORITHMS, SOLVERS):
            kwargs = dict(algorithm_type=algorithm_type, solver_type=solver_type, prediction_type="v_prediction")
            prev, x0 = dpm_solver_step(m, t.to(backend.device), t_prev.to(backend.device), x, s, prev_x0=prev_x0,
                                       prev_x0_t=t_x0.to(backend.device), noise=noise, **kwargs)
            assert prev.dtype == x0.dtype == dtype and prev.shape == x.shape and prev.device == x.device
            ref_prev, ref_x0 = reference.dpm_solver_step(m.cpu(), t, t_prev, x.cpu(), abar64(s), noise.cpu(),
                                                         prev_x0=prev_x0.cpu(), prev_x0_t=t_x0, **kwargs)
            # The reference takes the same rounded inputs: 16-bit outputs differ by their rounding.
            tol = 2 * low_precision_tol(dtype) or (1e-12 if dtype == torch.float64 else 1e-6)
            assert_close_to(x0, ref_x0, tol)
            assert_close_to(prev, ref_prev, tol)


def test_in_kernel_noise_is_randn_and_same_on_every_backend(backend):
    s = NoiseSchedule()
    x, m, _, prev_x0, _ = _case(batch=3, shape=(4, 50), dtype=torch.float32)
    args = (torch.tensor([980, 10, 1]), torch.tensor([900, 5, -1]))
    kwargs = dict(prev_x0_t=torch.tensor([999, 20, 3]), algorithm_type="sde-dpmsolver++")
    on = [v.to(backend.device) for v in (m, *args, x)]
    prev, _ = dpm_solver_step(*on, s, prev_x0=prev_x0.to(backend.device), generator=torch.Generator().manual_seed(11), **kwargs)
    noise = genkernels.randn(x.shape, generator=torch.Generator().manual_seed(11))
    expected, _ = dpm_solver_step(m, *args, x, s, prev_x0=prev_x0, noise=noise, **kwargs)
    torch.testing.assert_close(prev.cpu(), expected, rtol=1e-6, atol=1e-6)
    # The ODE draws nothing: the generator is left alone.
    g = torch.Generator().manual_seed(5)
    dpm_solver_step(m, *args, x, s, generator=g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())


def test_step_compiles_fullgraph():
    s = NoiseSchedule()
    x, m, _, prev_x0, noise = _case(batch=2, shape=(3, 8), dtype=torch.float32)
    t, t_prev, t_x0 = torch.tensor([500, 20]), torch.tensor([480, -1]), torch.tensor([520, 40])

    def step(x, m, prev_x0, noise):
        prev, x0 = dpm_solver_step((m, prev_x0), t, t_prev, x, s, prev_x0=prev_x0, prev_x0_t=t_x0, guidance_scale=3.0,
                                   algorithm_type="sde-dpmsolver++", solver_type="heun", noise=noise)
        return prev, x0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for ours, expected in zip(compiled(x, m, prev_x0, noise), step(x, m, prev_x0, noise)):
        torch.testing.assert_close(ours, expected)


def test_argument_errors():
    s = NoiseSchedule()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="'algorithm_type' must be one of"):
        dpm_solver_step(x, 10, 5, x, s, algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="'solver_type'"):
        dpm_solver_step(x, 10, 5, x, s, solver_type="bh2")
    with pytest.raises(ValueError, match="'final_sigmas_type'"):
        dpm_solver_step(x, 10, 5, x, s, final_sigmas_type="one")
    with pytest.raises(ValueError, match="'prediction_type'"):
        dpm_solver_step(x, 10, 5, x, s, prediction_type="flow")
    with pytest.raises(ValueError, match="both 'prev_x0' and 'prev_x0_t'"):
        dpm_solver_step(x, 10, 5, x, s, prev_x0=x)
    with pytest.raises(ValueError, match="both 'prev_x0' and 'prev_x0_t'"):
        dpm_solver_step(x, 10, 5, x, s, prev_x0_t=20)
    with pytest.raises(ValueError, match="'prev_x0' must have the shape"):
        dpm_solver_step(x, 10, 5, x, s, prev_x0=torch.randn(2, 4), prev_x0_t=20)
    with pytest.raises(TypeError, match="'prev_x0' must be of the same dtype"):
        dpm_solver_step(x, 10, 5, x, s, prev_x0=x.double(), prev_x0_t=20)
    with pytest.raises(TypeError, match="'prev_x0' must be a torch.Tensor"):
        dpm_solver_step(x, 10, 5, x, s, prev_x0=[1.0], prev_x0_t=20)
    with pytest.raises(ValueError, match=r"'prev_x0_t' must be in \[0, 1000\)"):
        dpm_solver_step(x, 10, 5, x, s, prev_x0=x, prev_x0_t=-1)
    with pytest.raises(ValueError, match=r"'t_prev' must be in \[-1, 1000\)"):
        dpm_solver_step(x, 10, -2, x, s)
    with pytest.raises(TypeError, match="'euler_at_final' must be a bool"):
        dpm_solver_step(x, 10, 5, x, s, euler_at_final=1)
    with pytest.raises(ValueError, match="needs 'guidance_scale'"):
        dpm_solver_step((x, x), 10, 5, x, s)
    with pytest.raises(TypeError, match="'schedule'"):
        dpm_solver_step(x, 10, 5, x, "linear")
