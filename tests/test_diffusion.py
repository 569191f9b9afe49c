"""Noise schedules, q_sample and the fused DDPM/DDIM steps against diffusers and the float64
reference (diffusers' own float32 arithmetic is off by ~1e-3 relative at small t)."""

from __future__ import annotations

import itertools

import diffusers
import pytest
import torch

import genkernels
from genkernels import reference
from genkernels.diffusion import NoiseSchedule, ddim_step, ddpm_step, q_sample

from tolerances import low_precision_tol


SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def abar64(schedule: NoiseSchedule) -> torch.Tensor:
    """alphas_cumprod recomputed independently in float64 from the stored betas' definition."""
    return torch.cumprod(1 - schedule._betas64.cpu(), 0)


def assert_close_to(ours: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6, scale: float = 0.0) -> None:
    """Relative to the scale of the terms that made the output (at least its own)."""
    scale = max(scale, expected.abs().max().item() if expected.numel() else 0.0)
    torch.testing.assert_close(ours.cpu().double(), expected.cpu().double(), rtol=rtol, atol=rtol * max(scale, 1.0))


def diffusers_in_float64(scheduler):
    """A diffusers scheduler whose tables are float64, so its step evaluates its formulas in float64."""
    betas = scheduler.betas.double()
    if scheduler.config.beta_schedule == "linear" and scheduler.config.trained_betas is None:
        c = scheduler.config
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
    scheduler.betas = betas
    scheduler.alphas = 1 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        one = scheduler.config.set_alpha_to_one
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if one else scheduler.alphas_cumprod[0]
    return scheduler


def unclipped_scale(m: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prediction_type: str) -> float:
    """The magnitude of the x0 prediction before clipping: the size of the terms rounded."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t.cpu()]
    abar = abar.reshape((-1,) + (1,) * (x.dim() - 1))
    return reference._predict_x0(m.cpu().double(), x.cpu().double(), abar, prediction_type).abs().max().item()


# ------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_equals_diffusers(beta_schedule, zero_snr):
    ours = NoiseSchedule(1000, beta_schedule, 0.00085, 0.012, rescale_betas_zero_snr=zero_snr)
    theirs = diffusers.DDPMScheduler(1000, 0.00085, 0.012, beta_schedule, rescale_betas_zero_snr=zero_snr)
    for t in (ours.betas, ours.alphas_cumprod):
        assert t.dtype == torch.float32
    # diffusers computes in float32: its product is ~1e-5 relative off by t = 999, and its
    # zero-SNR rescale ~1e-3; the same rescale run in float64 agrees to float32 rounding.
    loose = 5e-3 if zero_snr else 3e-5
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=loose, atol=1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=loose, atol=1e-9)
    if zero_snr:
        plain = NoiseSchedule(1000, beta_schedule, 0.00085, 0.012)
        rescaled = diffusers.schedulers.scheduling_ddpm.rescale_zero_terminal_snr(plain._betas64)
        torch.testing.assert_close(ours.betas.double(), rescaled, rtol=3e-7, atol=1e-12)
    # Against the same definitions in float64: one float32 rounding.
    exact = torch.cumprod(1 - ours.betas.double(), 0)
    torch.testing.assert_close(ours.alphas_cumprod.double(), exact, rtol=3e-7, atol=1e-12)
    torch.testing.assert_close(ours.sqrt_one_minus_alphas_cumprod.double(), (1 - exact).sqrt(), rtol=1e-6, atol=0)


def test_schedule_posterior_tables_and_trained_betas():
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    s = NoiseSchedule(trained_betas=betas)
    assert len(s) == 50
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    torch.testing.assert_close(s.posterior_variance.double(), betas * (1 - abar_prev) / (1 - abar), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef1.double(), betas * abar_prev.sqrt() / (1 - abar), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef2.double(), (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cubic")
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(trained_betas=[0.1, 1.5])


# ------------------------------------------------------------------------------ q_sample


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 3, 7, 9), (2, 1025)])
def test_q_sample_matches_reference(backend, shape):
    s = NoiseSchedule()
    x0 = torch.randn(shape, dtype=torch.float64, device=backend.device)
    t = torch.randint(0, 1000, (shape[0],), device=backend.device)
    noise = torch.randn_like(x0)
    for dtype in backend.float_dtypes():
        x_t, eps, v = q_sample(x0.to(dtype), t, s, noise.to(dtype), return_velocity=True)
        assert eps is not None and x_t.dtype == dtype and x_t.shape == x0.shape
        ref_xt, ref_v = reference.q_sample(x0.to(dtype).cpu(), t.cpu(), abar64(s), noise.to(dtype).cpu())
        tol = low_precision_tol(dtype) or 1e-6
        assert_close_to(x_t, ref_xt, tol)
        assert_close_to(v, ref_v, tol)


def test_q_sample_draws_randn_noise(backend):
    s = NoiseSchedule()
    x0 = torch.randn(3, 4, 33, device=backend.device)
    x_t, eps = q_sample(x0, torch.tensor([0, 500, 999]), s, generator=torch.Generator().manual_seed(7))
    expected = genkernels.randn(x0.shape, generator=torch.Generator().manual_seed(7), device=backend.device)
    assert torch.equal(eps, expected)
    ref, _ = reference.q_sample(x0.cpu(), torch.tensor([0, 500, 999]), abar64(s), eps.cpu())
    assert_close_to(x_t, ref)


def test_q_sample_equals_diffusers_add_noise():
    s, theirs = NoiseSchedule(), diffusers.DDPMScheduler()
    x0, noise = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    t = torch.randint(0, 1000, (8,))
    x_t, _, v = q_sample(x0, t, s, noise, return_velocity=True)
    torch.testing.assert_close(x_t, theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, theirs.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_q_sample_half_precision_keeps_noise_at_small_t():
    """float16 data with the float32 schedule: at t < 5 diffusers' fp16 add_noise drops the noise."""
    s = NoiseSchedule()
    x0 = torch.zeros(5, 64, dtype=torch.float16)
    noise = torch.ones(5, 64, dtype=torch.float16)
    x_t, _ = q_sample(x0, torch.arange(5), s, noise)
    expected = s.sqrt_one_minus_alphas_cumprod[:5].double()
    torch.testing.assert_close(x_t[:, 0].double(), expected, rtol=1e-3, atol=0)
    assert (x_t > 0).all()


def test_q_sample_gradients():
    s = NoiseSchedule(100)
    x0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 50, 99])
    torch.autograd.gradcheck(lambda a, b: q_sample(a, t, s, b, return_velocity=True), (x0, noise))
    # Drawn noise: the same stream on every call, through a freshly seeded generator.
    torch.autograd.gradcheck(lambda a: q_sample(a, t, s, generator=torch.Generator().manual_seed(1))[0], (x0,))


def test_q_sample_opcheck():
    s = NoiseSchedule()
    x0 = torch.randn(4, 6, requires_grad=True)
    coeffs = torch.rand(4, 2, dtype=torch.float64)
    seed = torch.tensor([1, 2])
    torch.library.opcheck(torch.ops.genkernels.q_sample, (x0, None, coeffs, seed, True))
    torch.library.opcheck(torch.ops.genkernels.q_sample, (x0, torch.randn(4, 6, requires_grad=True), coeffs, seed, False))
    assert s is not None


def test_q_sample_argument_errors():
    s = NoiseSchedule(10)
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="'t' must be in"):
        q_sample(x0, 10, s)
    with pytest.raises(ValueError, match=r"'t' must have values in \[0, 10\)"):
        q_sample(x0, torch.tensor([0, -1]), s)
    with pytest.raises(ValueError, match="'t' must be a scalar or of shape"):
        q_sample(x0, torch.tensor([0, 1, 2]), s)
    with pytest.raises(TypeError, match="'t' must be an integer tensor"):
        q_sample(x0, torch.tensor([0.5, 1.0]), s)
    with pytest.raises(TypeError, match="'schedule'"):
        q_sample(x0, 1, "linear")
    with pytest.raises(ValueError, match="'noise' must have the shape"):
        q_sample(x0, 1, s, torch.randn(2, 4))
    with pytest.raises(TypeError, match="'x0'"):
        q_sample(x0.int(), 1, s)


# ------------------------------------------------------------------------------ DDPM


def _ddpm_case(prediction_type, variance_type, limit, t, *, shape=(3, 4, 5, 6), dtype=torch.float32, device="cpu"):
    s = NoiseSchedule()
    learned = variance_type in ("learned", "learned_range")
    x = torch.randn(shape, dtype=dtype, device=device)
    out_shape = (shape[0], 2 * shape[1], *shape[2:]) if learned else shape
    m = torch.randn(out_shape, dtype=dtype, device=device)
    if variance_type == "learned":
        m[:, shape[1]:] = m[:, shape[1]:].abs() * 1e-3
    noise = torch.randn(shape, dtype=dtype, device=device)
    clip = 1.0 if limit == "clip" else None
    threshold = (0.9, 2.0) if limit == "threshold" else None
    prev, x0 = ddpm_step(m, t, x, s, prediction_type=prediction_type, variance_type=variance_type,
                         clip_sample=limit == "clip", thresholding=limit == "threshold", dynamic_thresholding_ratio=0.9,
                         sample_max_value=2.0, noise=noise)
    tt = torch.as_tensor(t).expand(shape[0]).cpu()
    ref = reference.ddpm_step(m[:, :shape[1]].cpu(), tt, tt - 1, x.cpu(), abar64(s), noise.cpu(),
                              prediction_type=prediction_type, variance_type=variance_type, clip=clip,
                              threshold=threshold, predicted_variance=m[:, shape[1]:].cpu() if learned else None)
    return (prev, x0), ref, (m, x, noise)


@pytest.mark.parametrize("prediction_type, variance_type, limit",
                         list(itertools.product(["epsilon", "v_prediction", "sample"],
                                                ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"],
                                                ["none", "clip", "threshold"])))
def test_ddpm_step_matrix_matches_reference(prediction_type, variance_type, limit):
    t = torch.tensor([999, 500, 3])
    (prev, x0), (ref_prev, ref_x0), (m, x, _) = _ddpm_case(prediction_type, variance_type, limit, t)
    scale = unclipped_scale(m[:, :x.shape[1]], x, t, prediction_type)
    assert_close_to(x0, ref_x0, scale=scale)
    assert_close_to(prev, ref_prev, scale=scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("t", [999, 500, 10, 1, 0])
@pytest.mark.parametrize("thresholding", [False, True])
def test_ddpm_step_equals_diffusers_float64(prediction_type, variance_type, t, thresholding):
    theirs = diffusers_in_float64(diffusers.DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type,
                                                          thresholding=thresholding, sample_max_value=1.5))
    shape = (2, 3, 8, 8)
    channels = 6 if variance_type == "learned_range" else 3
    x = torch.randn(shape, dtype=torch.float64)
    m = torch.randn(2, channels, 8, 8, dtype=torch.float64)
    expected = theirs.step(m, t, x, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    prev, x0 = ddpm_step(m.float(), t, x.float(), NoiseSchedule(), prediction_type=prediction_type,
                         variance_type=variance_type, thresholding=thresholding, sample_max_value=1.5, noise=noise.float())
    scale = unclipped_scale(m[:, :3], x, torch.tensor([t]), prediction_type)
    assert_close_to(x0, expected.pred_original_sample, scale=scale)
    assert_close_to(prev, expected.prev_sample, scale=scale)
    prev64, _ = ddpm_step(m, t, x, NoiseSchedule(), prediction_type=prediction_type, variance_type=variance_type,
                          thresholding=thresholding, sample_max_value=1.5, noise=noise)
    assert_close_to(prev64, expected.prev_sample, 1e-12)


def test_dynamic_threshold_of_float64_is_found_in_float64():
    """With a threshold below sample_max_value the quantile itself sets the scale: float64
    inputs must not round it to float32 (that costs ~1e-7 relative)."""
    theirs = diffusers_in_float64(diffusers.DDPMScheduler(thresholding=True, sample_max_value=100.0))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = torch.randn_like(x)
    for t in (500, 10):
        expected = theirs.step(m, t, x, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        prev, x0 = ddpm_step(m, t, x, NoiseSchedule(), thresholding=True, sample_max_value=100.0, noise=noise)
        assert_close_to(x0, expected.pred_original_sample, 1e-12)
        assert_close_to(prev, expected.prev_sample, 1e-12)


def test_ddpm_step_fixed_large_log_is_finite_where_diffusers_gives_nan():
    x, m = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    noise = torch.randn(2, 3, 4)
    a, _ = ddpm_step(m, 500, x, NoiseSchedule(), variance_type="fixed_large_log", noise=noise)
    b, _ = ddpm_step(m, 500, x, NoiseSchedule(), variance_type="fixed_large", noise=noise)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_ddpm_step_per_sample_timesteps(backend):
    s = NoiseSchedule()
    x = torch.randn(4, 3, 9, device=backend.device)
    m, noise = torch.randn_like(x), torch.randn_like(x)
    t = torch.tensor([999, 0, 37, 1], device=backend.device)
    prev, x0 = ddpm_step(m, t, x, s, noise=noise)
    for i in range(4):
        p_i, x0_i = ddpm_step(m[i:i + 1], int(t[i]), x[i:i + 1], s, noise=noise[i:i + 1])
        assert_close_to(prev[i:i + 1], p_i.double())
        assert_close_to(x0[i:i + 1], x0_i.double())
    # t = 0 adds no noise.
    p0, _ = ddpm_step(m[1:2], 0, x[1:2], s, noise=noise[1:2] * 100)
    torch.testing.assert_close(p0, prev[1:2])


def test_ddpm_step_to_t_minus_one_gathers_the_rows_it_would_compute(backend):
    """Steps to the default t - 1 take their rows from a table of every t kept by the schedule
    (one per plan); an explicit t_prev computes them."""
    s = NoiseSchedule(device=backend.device)
    x = torch.randn(4, 3, 9, device=backend.device)
    m, noise = torch.randn_like(x), torch.randn_like(x)
    t = torch.tensor([999, 0, 37, 1], device=backend.device)
    plans = [dict(), dict(prediction_type="v_prediction", variance_type="fixed_large", clip_sample=False)]
    for kwargs in plans + plans:
        by_table = ddpm_step(m, t, x, s, noise=noise, **kwargs)
        computed = ddpm_step(m, t, x, s, t_prev=t - 1, noise=noise, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(by_table, computed))
    assert len(s._step_tables) == len(plans)
    assert s.to("meta")._step_tables == {}  # a copy on another device builds its own


@pytest.mark.parametrize("shape", [(1, 1), (5, 3, 7), (3, 1030), (0, 4)])
def test_ddpm_step_backends_match_reference(backend, shape):
    for dtype in backend.float_dtypes():
        t = torch.randint(0, 1000, (shape[0],))
        (prev, x0), (ref_prev, ref_x0), (_m, _x, _) = _ddpm_case("epsilon", "fixed_small", "clip", t.to(backend.device), shape=shape,
                                                       dtype=dtype, device=backend.device)
        tol = 8 * low_precision_tol(dtype) or 1e-6
        assert prev.dtype == dtype
        scale = unclipped_scale(_m, _x, t, "epsilon") if shape[0] else 0.0
        assert_close_to(x0, ref_x0, tol, scale)
        assert_close_to(prev, ref_prev, tol, scale)


def test_ddpm_in_kernel_noise_is_randn_and_same_on_every_backend(backend):
    s = NoiseSchedule()
    x = torch.randn(3, 4, 50)
    m = torch.randn_like(x)
    t = torch.tensor([999, 10, 1])
    prev, x0 = ddpm_step(m.to(backend.device), t.to(backend.device), x.to(backend.device), s,
                         generator=torch.Generator().manual_seed(11))
    noise = genkernels.randn(x.shape, generator=torch.Generator().manual_seed(11))
    expected, _ = ddpm_step(m, t, x, s, noise=noise)
    torch.testing.assert_close(prev.cpu(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ DDIM


@pytest.mark.parametrize("prediction_type, eta, clip, use_clipped, final_one, threshold",
                         [(p, e, c, u, f, th) for p, e, c, u, f, th in itertools.product(
                             ["epsilon", "v_prediction", "sample"], [0.0, 0.5, 1.0], [False, True], [False, True],
                             [True, False], [False, True]) if not (c and th)])
def test_ddim_step_matrix_matches_reference(prediction_type, eta, clip, use_clipped, final_one, threshold):
    s = NoiseSchedule()
    x, m, noise = (torch.randn(3, 4, 10) for _ in range(3))
    t, t_prev = torch.tensor([981, 501, 21]), torch.tensor([961, -1, 1])
    prev, x0 = ddim_step(m, t, t_prev, x, s, eta=eta, prediction_type=prediction_type, clip_sample=clip,
                         thresholding=threshold, dynamic_thresholding_ratio=0.9, sample_max_value=2.0,
                         use_clipped_model_output=use_clipped, set_alpha_to_one=final_one, noise=noise)
    final = 1.0 if final_one else abar64(s)[0].item()
    ref_prev, ref_x0 = reference.ddim_step(m, t, t_prev, x, abar64(s), noise, eta=eta, prediction_type=prediction_type,
                                           clip=1.0 if clip else None, threshold=(0.9, 2.0) if threshold else None,
                                           use_clipped_model_output=use_clipped, final=final)
    scale = unclipped_scale(m, x, t, prediction_type)
    assert_close_to(x0, ref_x0, scale=scale)
    assert_close_to(prev, ref_prev, scale=scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddim_step_equals_diffusers_float64(prediction_type, eta, clip_sample):
    theirs = diffusers_in_float64(diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample))
    theirs.set_timesteps(50)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = torch.randn_like(x)
    for t in (981, 501, 1):
        noise = torch.randn(x.shape, dtype=torch.float64)
        expected = theirs.step(m, t, x, eta=eta, variance_noise=noise)
        prev, x0 = ddim_step(m.float(), t, max(t - 20, -1), x.float(), NoiseSchedule(), eta=eta,
                             prediction_type=prediction_type, clip_sample=clip_sample, noise=noise.float())
        scale = unclipped_scale(m, x, torch.tensor([t]), prediction_type)
        assert_close_to(x0, expected.pred_original_sample, scale=scale)
        assert_close_to(prev, expected.prev_sample, scale=scale)


def test_ddim_step_backends(backend):
    s = NoiseSchedule()
    x = torch.randn(4, 2, 37, device=backend.device)
    m = torch.randn_like(x)
    t, t_prev = torch.tensor([999, 500, 40, 0]), torch.tensor([979, 480, 20, -1])
    for dtype in backend.float_dtypes():
        prev, x0 = ddim_step(m.to(dtype), t.to(backend.device), t_prev.to(backend.device), x.to(dtype), s)
        ref_prev, ref_x0 = reference.ddim_step(m.to(dtype).cpu(), t, t_prev, x.to(dtype).cpu(), abar64(s), torch.zeros(1))
        tol = 8 * low_precision_tol(dtype) or 1e-6
        assert_close_to(prev, ref_prev, tol)
        assert_close_to(x0, ref_x0, tol)


# ------------------------------------------------------------------------------ guidance


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_fused_into_steps(backend, rescale):
    s = NoiseSchedule()
    x = torch.randn(3, 4, 16, device=backend.device)
    uncond, cond, noise = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    t = torch.tensor([900, 400, 5], device=backend.device)
    eps = reference.guided(uncond.cpu(), cond.cpu(), 7.5, rescale)
    prev, x0 = ddim_step((uncond, cond), t, (t - 100).clamp(min=-1), x, s, guidance_scale=7.5, guidance_rescale=rescale, eta=0.3, noise=noise)
    ref_prev, ref_x0 = reference.ddim_step(eps, t.cpu(), (t - 100).clamp(min=-1).cpu(), x.cpu(), abar64(s), noise.cpu(), eta=0.3)
    assert_close_to(x0, ref_x0, 2e-6)
    assert_close_to(prev, ref_prev, 2e-6)
    prev, x0 = ddpm_step((uncond, cond), t, x, s, guidance_scale=7.5, guidance_rescale=rescale, noise=noise)
    ref_prev, ref_x0 = reference.ddpm_step(eps, t.cpu(), t.cpu() - 1, x.cpu(), abar64(s), noise.cpu())
    assert_close_to(prev, ref_prev, 2e-6)


def test_step_argument_errors():
    s = NoiseSchedule()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm_step(x, 1, x, s, prediction_type="eps")
    with pytest.raises(ValueError, match="needs 'guidance_scale'"):
        ddpm_step((x, x), 1, x, s)
    with pytest.raises(ValueError, match="needs model_output=\\(uncond, cond\\)"):
        ddim_step(x, 1, 0, x, s, guidance_scale=2.0)
    with pytest.raises(ValueError, match="'model_output' must have the shape"):
        ddim_step(torch.randn(2, 4), 1, 0, x, s)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        ddpm_step(x, 1, x, s, variance_type="learned")
    learned = torch.randn(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    short = learned[:, : x.shape[1] + 1]  # eps and one channel of variance: must not be read past
    with pytest.raises(ValueError, match="'model_output\\[1\\]' must have the shape of 'model_output'"):
        ddpm_step((learned, short), 1, x, s, variance_type="learned", guidance_scale=2.0)
    with pytest.raises(ValueError, match="'eta' must be >= 0"):
        ddim_step(x, 1, 0, x, s, eta=-1.0)
    with pytest.raises(TypeError, match="same dtype"):
        ddim_step(x.double(), 1, 0, x, s)
    with pytest.raises(ValueError, match="'guidance_rescale' must be in"):
        ddim_step((x, x), 1, 0, x, s, guidance_scale=2.0, guidance_rescale=2.0)


def test_diffusion_step_opcheck():
    x = torch.randn(3, 8)
    k = torch.rand(3, genkernels._C.STEP_COEFFS, dtype=torch.float64)
    args = (x, torch.randn(3, 8), torch.randn(3, 8), None, 0, torch.randn(3, 8), None, k, torch.tensor([3, 4]), True)
    torch.library.opcheck(torch.ops.genkernels.diffusion_step, args)
    assert genkernels._C.Q_SAMPLE_COEFFS == 2


def test_steps_compile_fullgraph():
    s = NoiseSchedule()
    x = torch.randn(2, 3, 8)
    m = torch.randn_like(x)
    t = torch.tensor([500, 20])

    def loop(x, m, t):
        x_t, eps = q_sample(x, t, s, m)
        prev, _ = ddim_step(eps, t, t - 10, x_t, s)
        return ddpm_step(eps, t - 10, prev, s, noise=m)[0]

    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, m, t), loop(x, m, t))
