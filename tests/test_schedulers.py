"""The drop-in schedulers against diffusers' over whole sampling loops."""

from __future__ import annotations

import diffusers
import pytest
import torch

from genkernels import schedulers

from test_diffusion import diffusers_in_float64


def denoiser(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed smooth stand-in for a trained model."""
    return torch.sin(3 * x) * 0.5 + 1e-4 * float(t)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 50])
def test_timesteps_equal_diffusers(spacing, steps):
    for ours, theirs in ((schedulers.DDPMScheduler(timestep_spacing=spacing, steps_offset=1),
                          diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=1)),
                         (schedulers.DDIMScheduler(timestep_spacing=spacing),
                          diffusers.DDIMScheduler(timestep_spacing=spacing))):
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert torch.equal(ours.timesteps, theirs.timesteps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_50_step_loop_equals_diffusers(spacing, prediction_type):
    kwargs = dict(timestep_spacing=spacing, prediction_type=prediction_type, clip_sample=False)
    ours = schedulers.DDIMScheduler(**kwargs, diffusers_compat=True)
    theirs = diffusers_in_float64(diffusers.DDIMScheduler(**kwargs))
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y, z = x.clone(), x.float()
    for t in theirs.timesteps:
        x = theirs.step(denoiser(x, t), t, x, eta=0.0).prev_sample
        y = ours.step(denoiser(y, t), t, y).prev_sample
        z = ours.step(denoiser(z, t), t, z).prev_sample
    # float64 through the loop: the same formulas; float32: 50 steps of rounding fed back
    # through the denoiser (each single step agrees to 1e-6, tests/test_diffusion.py).
    torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z.double(), x, rtol=3e-4, atol=3e-4)


def test_ddpm_loop_with_given_noise_equals_diffusers():
    ours = schedulers.DDPMScheduler()
    theirs = diffusers_in_float64(diffusers.DDPMScheduler())
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y, z = x.clone(), x.float()
    for t in theirs.timesteps:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)), dtype=torch.float64)
        x = theirs.step(denoiser(x, t), t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        y = ours.step(denoiser(y, t), t, y, noise=noise).prev_sample
        z = ours.step(denoiser(z, t), t, z, noise=noise.float()).prev_sample
    torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z.double(), x, rtol=3e-4, atol=3e-4)


def test_ddim_steps_to_the_next_timestep_of_the_schedule():
    """diffusers' t - T // N skips timesteps for trailing spacing; ours follows the schedule."""
    ours = schedulers.DDIMScheduler(timestep_spacing="trailing")
    ours.set_timesteps(7)
    chain = ours.timesteps.tolist()
    assert [int(ours.previous_timestep(t)) for t in chain] == chain[1:] + [-1]
    compat = schedulers.DDIMScheduler(timestep_spacing="trailing", diffusers_compat=True)
    compat.set_timesteps(7)
    assert [int(compat.previous_timestep(t)) for t in chain] == [max(t - 1000 // 7, -1) for t in chain]


def test_step_takes_a_timestep_per_sample_and_guidance():
    s = schedulers.DDIMScheduler(clip_sample=False)
    s.set_timesteps(20)
    x = torch.randn(3, 2, 5)
    uncond, cond = torch.randn_like(x), torch.randn_like(x)
    t = s.timesteps[[0, 5, 19]]
    out = s.step((uncond, cond), t, x, guidance_scale=3.0)
    for i in range(3):
        one = s.step(uncond[i:i + 1] + 3.0 * (cond[i:i + 1] - uncond[i:i + 1]), t[i], x[i:i + 1])
        torch.testing.assert_close(out.prev_sample[i:i + 1], one.prev_sample, rtol=1e-5, atol=1e-5)
    prev, x0 = s.step(uncond, t, x, return_dict=False)
    assert prev.shape == x0.shape == x.shape


def test_add_noise_and_velocity_equal_diffusers():
    ours, theirs = schedulers.DDPMScheduler(beta_schedule="scaled_linear"), diffusers.DDPMScheduler(beta_schedule="scaled_linear")
    x0, noise = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=1e-4, atol=1e-5)
    assert ours.scale_model_input(x0, 3) is x0 and len(ours) == 1000 and ours.init_noise_sigma == 1.0


def test_scheduler_argument_errors():
    with pytest.raises(ValueError, match="timestep_spacing"):
        schedulers.DDIMScheduler(timestep_spacing="uniform")
    s = schedulers.DDPMScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(2000)
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()


@pytest.mark.parametrize("kind", ["DDPM", "DDIM", "DPMSolverMultistep"])
def test_step_equals_the_op_for_its_previous_timestep_after_every_set_timesteps(kind):
    """A scheduler gathers its coefficients from a table made per set_timesteps: steps from the
    same timestep of two schedules equal the op called with each schedule's previous timestep."""
    from genkernels.diffusion import ddim_step, ddpm_step, dpm_solver_step

    scheduler = getattr(schedulers, f"{kind}Scheduler")()
    x, m, noise = torch.randn(3, 2, 4, 4, dtype=torch.float64).unbind(0)
    t = torch.tensor([500, 500])
    for chain in ([900, 500, 100], [700, 500, 300]):
        scheduler.set_timesteps(timesteps=chain)
        prev = scheduler.previous_timestep(t)
        if kind == "DDPM":
            ours = scheduler.step(m, t, x, noise=noise).prev_sample
            expected = ddpm_step(m, t, x, scheduler.schedule, t_prev=prev, noise=noise)[0]
        elif kind == "DDIM":
            ours = scheduler.step(m, t, x).prev_sample
            expected = ddim_step(m, t, prev, x, scheduler.schedule, clip_sample=True)[0]
        else:
            ours = scheduler.step(m, t, x).prev_sample  # first order: the first step of a chain
            expected = dpm_solver_step(m, t, prev, x, scheduler.schedule)[0]
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
