"""Video latents (N, C, F, h, w) through the shared maths: every reduction is a mean over dims 1..end, so a 5-D
tensor gives exactly what the same numbers folded to 4-D (N, C·F, h, w) give, and the 4-D results are those of
before (the image families' sampler tests still compare equal with their diffusers pipelines)."""

from pathlib import Path

import torch

from diffalign.likelihood import (
    Schedule,
    gaussian_log_prob,
    pair_noise,
    per_sample_error,
    prediction_kl,
    step_kl,
)
from diffalign.models import load_family
from diffalign.sampling.flow_sde import FlowCPSSampler, cps_step, sde_step

REPO = Path(__file__).resolve().parents[1]


def video_and_folded(seed: int):
    x = torch.randn(4, 3, 2, 4, 4, generator=torch.Generator().manual_seed(seed))  # (N, C, F, h, w)
    return x, x.flatten(1, 2)  # (N, C·F, h, w): the same numbers, one rank less


def test_estimator_and_step_densities_are_the_same_on_5d_and_folded_4d():
    (a5, a4), (b5, b4) = video_and_folded(0), video_and_folded(1)
    for fn in (per_sample_error, prediction_kl):
        assert fn(a5, b5).shape == (4,) and torch.equal(fn(a5, b5), fn(a4, b4))
    assert torch.equal(step_kl(a5, b5, 0.3), step_kl(a4, b4, 0.3))
    assert torch.equal(gaussian_log_prob(a5, b5, torch.tensor(0.5)), gaussian_log_prob(a4, b4, torch.tensor(0.5)))
    mean5, std5 = sde_step(a5, b5, 0.8, 0.6, 0.9, 0.7)
    mean4, std4 = sde_step(a4, b4, 0.8, 0.6, 0.9, 0.7)
    assert torch.equal(mean5.flatten(1, 2), mean4) and torch.equal(std5, std4)
    cps5, _ = cps_step(a5, b5, 0.8, 0.6, 0.7)
    cps4, _ = cps_step(a4, b4, 0.8, 0.6, 0.7)
    sampler = FlowCPSSampler(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1000.0, 500.0]), 0.7)
    assert torch.equal(sampler.density(a5, cps5, None), sampler.density(a4, cps4, None))


def test_pair_noise_and_forward_noising_take_any_rank():
    x5, x4 = video_and_folded(2)
    eps5 = pair_noise(x5, torch.Generator().manual_seed(3))
    eps4 = pair_noise(x4, torch.Generator().manual_seed(3))
    assert eps5.shape == x5.shape and torch.equal(eps5.flatten(1, 2), eps4)  # same draws, winner and loser share
    assert torch.equal(eps5[:2], eps5[2:])
    fam = load_family(str(REPO / "assets" / "tiny" / "sd3"), load_encoders=False)
    schedule, t = Schedule(fam.scheduler, "flow"), torch.tensor([10, 200, 500, 990])
    assert torch.equal(schedule.add_noise(x5, eps5, t).flatten(1, 2), schedule.add_noise(x4, eps4, t))


def test_image_families_latent_shape_is_the_old_c_h_w():
    fam = load_family(str(REPO / "assets" / "tiny" / "sd3"), load_encoders=False)
    assert fam.latent_shape() == (16, fam.resolution // 8, fam.resolution // 8) == (16, 8, 8)
    assert fam.latent_shape(64, 128) == (16, 8, 16) and fam.num_frames is None
