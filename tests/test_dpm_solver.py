"""DPM-Solver++ (first order and multistep second order, ODE and SDE): the fused step against the
float64 reference and diffusers' DPMSolverMultistepScheduler evaluated in float64, the drop-in
scheduler over whole loops, and sampling quality with an exact denoiser."""

from __future__ import annotations

import itertools
import math

import diffusers
import numpy as np
import pytest
import torch

import genkernels
from genkernels import reference, schedulers
from genkernels.diffusion import NoiseSchedule, dpm_solver_step

from test_diffusion import abar64, assert_close_to
from tolerances import low_precision_tol

# diffusers' set_timesteps calls np.array on a tensor, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

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


# ------------------------------------------------------------------------------ the scheduler


def _chain(scheduler, x, model, noises):
    """The states of a sampling loop from x: x, then each step's prev_sample."""
    states = [x]
    for t, noise in zip(scheduler.timesteps, noises):
        states.append(scheduler.step(model(states[-1], t), t, states[-1], variance_noise=noise).prev_sample)
    return states


@pytest.mark.parametrize("steps, config", [
    (10, dict()),
    (20, dict(timestep_spacing="leading", steps_offset=1, solver_type="heun")),
    (25, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    (20, dict(final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++")),
    (10, dict(final_sigmas_type="sigma_min", lower_order_final=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    (25, dict(algorithm_type="sde-dpmsolver++", solver_type="heun", euler_at_final=True, prediction_type="sample")),
    (20, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    (20, dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)),
    (10, dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)),
    (10, dict(solver_order=1, timestep_spacing="leading")),
])
def test_loop_equals_diffusers_float64(diffusers_dpm, steps, config):
    theirs, ours = diffusers_dpm(**config), schedulers.DPMSolverMultistepScheduler(**config)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.num_inference_steps == theirs.num_inference_steps
    torch.testing.assert_close(ours.sigmas.double(), theirs.sigmas, rtol=1e-6, atol=0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    noises = [torch.randn_like(x) for _ in range(steps)]
    expected = _chain(theirs, x, denoiser, noises)
    ours64 = _chain(ours, x, denoiser, noises)[-1]
    assert ours.step_index == theirs.step_index == steps and ours.lower_order_nums == theirs.lower_order_nums
    assert_close_to(ours64, expected[-1], 1e-11)
    assert_close_to(ours.model_outputs[-1], theirs.model_outputs[-1], 1e-11)
    # float32, each step from the float64 chain's state: the step's own rounding. (A float32 loop
    # feeds it back through sin(3x), which on rare inputs grows it a hundredfold, diffusers' too.)
    ours.set_timesteps(steps)
    for t, noise, before, after in zip(ours.timesteps, noises, expected, expected[1:]):
        state = before.float()
        prev = ours.step(denoiser(state, t), t, state, variance_noise=noise.float()).prev_sample
        assert prev.dtype == torch.float32
        assert_close_to(prev, after, 2e-6, scale=before.abs().max().item())  # a few float32 ulps


def test_scheduler_timesteps_and_sigmas_equal_diffusers():
    for spacing, steps in itertools.product(["linspace", "leading", "trailing"], [1, 7, 20, 50, 999]):
        ours = schedulers.DPMSolverMultistepScheduler(timestep_spacing=spacing, final_sigmas_type="sigma_min")
        theirs = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, final_sigmas_type="sigma_min")
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert torch.equal(ours.timesteps, theirs.timesteps), (spacing, steps)
        torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-4, atol=0)
    ours = schedulers.DPMSolverMultistepScheduler()
    ours.set_timesteps(timesteps=[900, 500, 100])
    assert ours.timesteps.tolist() == [900, 500, 100] and ours.num_inference_steps == 3


def test_scheduler_state_per_sample_timesteps_and_guidance():
    s = schedulers.DPMSolverMultistepScheduler()
    s.set_timesteps(20)
    x = torch.randn(3, 2, 5)
    uncond, cond = torch.randn_like(x), torch.randn_like(x)
    assert s.step_index is None and s.lower_order_nums == 0
    # Three samples at different points of the chain, two steps each.
    t0 = s.timesteps[[0, 5, 18]]
    out0 = s.step((uncond, cond), t0, x, guidance_scale=3.0)
    out1 = s.step((uncond, cond), s.previous_timestep(t0), out0.prev_sample, guidance_scale=3.0)
    assert s.lower_order_nums == 2 and s.step_index == 2
    for i in range(3):
        one = schedulers.DPMSolverMultistepScheduler()
        one.set_timesteps(20)
        e = uncond[i:i + 1] + 3.0 * (cond[i:i + 1] - uncond[i:i + 1])
        a = one.step(e, t0[i], x[i:i + 1])
        b = one.step(e, one.previous_timestep(t0[i]), a.prev_sample)
        assert_close_to(out0.pred_original_sample[i:i + 1], a.pred_original_sample.double(), 1e-5)
        assert_close_to(out1.prev_sample[i:i + 1], b.prev_sample.double(), 1e-5)
    # set_timesteps starts a new chain; begin_index sets where step_index counts from.
    s.set_timesteps(10)
    assert s.step_index is None and s.model_outputs == [None, None] and s.lower_order_nums == 0
    s.set_begin_index(4)
    prev, x0 = s.step(uncond, s.timesteps[4], x, return_dict=False)
    assert s.step_index == 5 and s.begin_index == 4 and prev.shape == x0.shape == x.shape


def test_scheduler_learned_variance_and_add_noise():
    ours = schedulers.DPMSolverMultistepScheduler(variance_type="learned_range")
    theirs = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range")
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    m = torch.randn(2, 6, 4, 4)
    for t in ours.timesteps[:3]:
        expected = theirs.step(m, t, x).prev_sample
        torch.testing.assert_close(ours.step(m, t, x).prev_sample, expected, rtol=1e-5, atol=1e-5)
        x = expected
    x0, noise = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    t = ours.timesteps[[0, 3, 5, 9]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    assert ours.scale_model_input(x0, 3) is x0 and len(ours) == 1000 and ours.init_noise_sigma == 1.0 and ours.order == 1


def test_scheduler_sde_draws_from_the_generator():
    s = schedulers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    x = torch.randn(2, 3, 8)

    def run(seed):
        s.set_timesteps(5)
        y = x
        for t in s.timesteps:
            y = s.step(denoiser(y, t), t, y, generator=torch.Generator().manual_seed(seed)).prev_sample
        return y

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_scheduler_argument_errors():
    cls = schedulers.DPMSolverMultistepScheduler
    with pytest.raises(NotImplementedError, match="'solver_order=3'"):
        cls(solver_order=3)
    with pytest.raises(ValueError, match="'solver_order' must be 1 or 2"):
        cls(solver_order=4)
    with pytest.raises(ValueError, match="'solver_order' must be an int >= 1"):
        cls(solver_order=0)
    with pytest.raises(NotImplementedError, match="'algorithm_type='dpmsolver''"):
        cls(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="'algorithm_type' must be one of"):
        cls(algorithm_type="deis2")
    with pytest.raises(NotImplementedError, match="'use_karras_sigmas=True'"):
        cls(use_karras_sigmas=True)
    with pytest.raises(NotImplementedError, match="'prediction_type='flow_prediction''"):
        cls(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="'solver_type'"):
        cls(solver_type="logrho")
    with pytest.raises(ValueError, match="'final_sigmas_type'"):
        cls(final_sigmas_type="one")
    with pytest.raises(ValueError, match="'variance_type'"):
        cls(variance_type="fixed_small")
    with pytest.raises(ValueError, match="'timestep_spacing'"):
        cls(timestep_spacing="uniform")
    with pytest.raises(TypeError, match="'lambda_min_clipped'"):
        cls(lambda_min_clipped="low")
    s = cls()
    with pytest.raises(ValueError, match="call set_timesteps before step"):
        s.step(torch.randn(1, 2), 10, torch.randn(1, 2))
    with pytest.raises(NotImplementedError, match="'mu'"):
        s.set_timesteps(10, mu=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()


# ------------------------------------------------------------------------------ sampling quality


@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
def test_exact_denoiser_samples_the_data_distribution(algorithm_type):
    """Data N(mu, s^2) per element: x_t = a x0 + b eps is Gaussian and the optimal noise prediction
    is E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). Twenty steps from N(0, I) follow x_t's
    marginals down to the last timestep t_L; the final step to sigma 0 returns E[x0 | x_{t_L}],
    of mean mu and standard deviation s sqrt(a^2 s^2 / (a^2 s^2 + b^2)) at t_L."""
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).reshape(1, 3, 1)
    std = torch.tensor([0.3, 1.0, 0.05], dtype=torch.float64).reshape(1, 3, 1)
    scheduler = schedulers.DPMSolverMultistepScheduler(algorithm_type=algorithm_type)
    scheduler.set_timesteps(20)
    abar = scheduler.schedule._abar64

    def optimal_eps(x, t):
        a, b = abar[t].sqrt(), (1 - abar[t]).sqrt()
        return b * (x - a * mu) / (a**2 * std**2 + b**2)

    x = genkernels.randn(4096, 3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(optimal_eps(x, t), t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
    signal = abar[scheduler.timesteps[-1]] * std**2
    expected_std = (std * (signal / (signal + 1 - abar[scheduler.timesteps[-1]])).sqrt()).flatten()
    mean, spread = x.mean(dim=(0, 2)), x.std(dim=(0, 2))
    # 32768 draws per channel (fixed seeds): the sample mean within 4 standard errors; the std's
    # sampling error is 0.4%, the rest is the solver's: at 20 steps up to ~1.7% for the ODE and
    # ~5.5% for the SDE, both within 1.5% at 200 steps.
    n = x.shape[0] * x.shape[2]
    torch.testing.assert_close(mean, mu.flatten(), rtol=0, atol=4 * float(expected_std.max()) / math.sqrt(n))
    torch.testing.assert_close(spread, expected_std, rtol=0.025 if algorithm_type == "dpmsolver++" else 0.08, atol=0)


def test_scheduler_clips_x0_when_asked():
    """clip_sample (beyond diffusers) clips the x0 prediction as dpm_solver_step's clip_sample does."""
    scheduler = schedulers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=2.0)
    scheduler.set_timesteps(10)
    x, m = torch.randn(2, 2, 3, 3, dtype=torch.float64).unbind(0)
    t = scheduler.timesteps[0]
    out = scheduler.step(m, t, x)
    expected = dpm_solver_step(m, t, scheduler.previous_timestep(t), x, scheduler.schedule, clip_sample=True, clip_sample_range=2.0)
    torch.testing.assert_close(out.prev_sample, expected[0], rtol=0, atol=0)
    assert out.pred_original_sample.abs().max() <= 2.0
