"""The explicit sampler on the tiny real SD1.5 pipeline: parity with diffusers, trajectories, per-step log-probs."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from numerics import assert_close_to_scale

from diffalign.lora import add_lora
from diffalign.models import load_family
from diffalign.sampling import (
    DDIMSampler,
    encode_guided,
    guided_prediction,
    inference_scheduler,
    sample,
    sample_trajectories,
    step_log_prob,
    step_mean_std,
)

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny"
PROMPTS = ["a photo of a cat", "red dog"]


@pytest.fixture(scope="module")
def sd15():
    return load_family(str(TINY / "sd15"))


@pytest.mark.numerics
def test_eta0_matches_the_diffusers_pipeline(sd15):
    """Same seeds, DDIM eta 0, CFG: our latents equal StableDiffusionPipeline(output_type="latent")."""
    scheduler = DDIMScheduler.from_config(sd15.pipe.scheduler.config)
    sd15.pipe.scheduler = DDIMScheduler.from_config(sd15.pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    want = sd15.pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=gens, output_type="latent").images
    got = sample(sd15, PROMPTS, [3, 4], steps=4, guidance=5.0, scheduler=scheduler)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_recomputed_log_probs_equal_the_sampled_ones(sd15):
    """Training recomputes log p(x_{t-1} | x_t) from the stored trajectory with the same function."""
    traj = sample_trajectories(sd15, PROMPTS, [1, 2], steps=3, guidance=3.0, eta=1.0, noise_seed=7)
    assert traj.latents.shape == (4, 2, 4, 8, 8) and traj.log_probs.shape == (3, 2)
    assert torch.isfinite(traj.log_probs).all()
    scheduler = inference_scheduler(sd15, eta=1.0)
    scheduler.set_timesteps(3)
    cond = encode_guided(sd15, PROMPTS, 3.0)
    with torch.no_grad():
        for k, t in enumerate(traj.timesteps):
            xt, x_prev = traj.latents[k], traj.latents[k + 1]
            pred = guided_prediction(sd15, xt, t, cond, 3.0)
            lp = step_log_prob(scheduler, pred, t, xt, x_prev, 1.0)
            torch.testing.assert_close(lp, traj.log_probs[k], rtol=1e-5, atol=1e-5)
            # and the stored x_{t-1} is the step's mean plus std times a unit-Gaussian draw
            mean, std = step_mean_std(scheduler, pred, t, xt, 1.0)
            z = (x_prev - mean) / std
            assert 0.5 < z.std() < 1.5 and std > 0


def test_ddim_window_noises_and_records_only_its_steps(sd15):
    """Window [1, 3) of 4 steps: eta 0 before it (latents[0] = the eta-0 path's x after step 0), eta's noise and
    log-probs inside, only its two steps recorded, eta 0 after it (x0 in `final`). The on-line DDIMSampler's default
    window leaves out the last step, whose std is a fraction of the others'."""
    eta0 = sample_trajectories(sd15, PROMPTS, [1, 2], steps=4, guidance=3.0, eta=0.0)
    traj = sample_trajectories(sd15, PROMPTS, [1, 2], steps=4, guidance=3.0, eta=1.0, noise_seed=7, window=(1, 3))
    assert traj.latents.shape == (3, 2, 4, 8, 8) and traj.log_probs.shape == (2, 2)
    scheduler = inference_scheduler(sd15, eta=1.0)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(traj.timesteps, scheduler.timesteps[1:3].long())
    torch.testing.assert_close(traj.latents[0], eta0.latents[1])
    assert traj.final is not None and not torch.allclose(traj.x0, eta0.x0)  # the window's noise changed x0
    whole = sample_trajectories(sd15, PROMPTS, [1, 2], steps=4, guidance=3.0, eta=1.0, noise_seed=7)
    assert whole.final is None and whole.latents.shape[0] == 5  # no window: every step, as before
    sampler = DDIMSampler(scheduler, 1.0)
    default = sampler.sample(sd15, PROMPTS, [1, 2], 3.0, noise_seed=7)
    assert sampler.recorded_steps == 3 and default.log_probs.shape == (3, 2)
    torch.testing.assert_close(default.timesteps, scheduler.timesteps[:3].long())
    _, last_std = step_mean_std(
        scheduler, torch.zeros(1, 4, 8, 8), scheduler.timesteps[-1], torch.zeros(1, 4, 8, 8), 1.0
    )
    _, first_std = step_mean_std(
        scheduler, torch.zeros(1, 4, 8, 8), scheduler.timesteps[0], torch.zeros(1, 4, 8, 8), 1.0
    )
    assert last_std < 0.25 * first_std  # why the default leaves it out


def test_log_prob_prefers_the_mean_and_is_a_per_dim_mean(sd15):
    scheduler = inference_scheduler(sd15, eta=1.0)
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[1]
    g = torch.Generator().manual_seed(0)
    xt, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mean, std = step_mean_std(scheduler, pred, t, xt, 1.0)
    at_mean = step_log_prob(scheduler, pred, t, xt, mean, 1.0)
    expected = -torch.log(std) - 0.5 * torch.log(torch.tensor(2 * torch.pi))  # log N(mean; mean, std²) per dim
    torch.testing.assert_close(at_mean, expected.expand(2), rtol=1e-5, atol=1e-5)
    assert (step_log_prob(scheduler, pred, t, xt, mean + std, 1.0) < at_mean).all()
    with pytest.raises(ValueError, match="eta"):
        step_log_prob(scheduler, pred, t, xt, mean, 0.0)


@pytest.mark.numerics
def test_groups_share_initial_noise_but_not_step_noise(sd15):
    traj = sample_trajectories(sd15, [PROMPTS[0]] * 3, [5, 5, 5], steps=2, guidance=1.0, eta=1.0, noise_seed=0)
    x_T = traj.latents[0]  # (3, 4, 8, 8)
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[0], x_T[2])
    assert not torch.allclose(traj.x0[0], traj.x0[1])
    again = sample_trajectories(sd15, [PROMPTS[0]] * 3, [5, 5, 5], steps=2, guidance=1.0, eta=1.0, noise_seed=0)
    assert torch.equal(again.latents, traj.latents)  # seeded: reproducible
    eta0 = sample_trajectories(sd15, [PROMPTS[0]] * 2, [5, 5], steps=2, guidance=1.0, eta=0.0)
    # two rows of one batch may round differently (row position picks the kernel path): equal to the scale
    assert_close_to_scale(eta0.x0[0], eta0.x0[1])
    assert eta0.log_probs is None
    assert (traj.x0[0] - traj.x0[1]).abs().max() > 1e-2 * traj.x0.abs().max()  # step noise: far beyond rounding


def test_log_prob_gradient_reaches_lora(sd15):
    """Training-time recompute is differentiable through the CFG prediction into the LoRA weights."""
    family = load_family(str(TINY / "sd15"))
    # B = 0 but A random, so gradients reach B
    params = add_lora(family.denoiser, 4, 4, family.lora_target_modules, init=True)
    traj = sample_trajectories(family, PROMPTS, [1, 2], steps=2, guidance=2.0, eta=1.0)
    scheduler = inference_scheduler(family, eta=1.0)
    scheduler.set_timesteps(2)
    cond = encode_guided(family, PROMPTS, 2.0)
    t = traj.timesteps[0]
    pred = guided_prediction(family, traj.latents[0], t, cond, 2.0)
    step_log_prob(scheduler, pred, t, traj.latents[0], traj.latents[1], 1.0).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
