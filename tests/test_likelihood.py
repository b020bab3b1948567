"""The shared estimator: forward noise and targets by prediction type, pair sharing, errors, log-probs."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffalign.likelihood import (
    Schedule,
    denoising_errors,
    gaussian_log_prob,
    pair_noise,
    pair_timesteps,
    per_sample_error,
    sample_timesteps,
)


def _schedule(prediction_type="epsilon"):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="epsilon")
    return Schedule(sched, prediction_type)


def test_forward_noise_and_targets_match_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    s = _schedule()
    ab = s.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = s.add_noise(x0, eps, t)
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-5)
    assert torch.equal(s.target(x0, eps, t), eps)
    v = Schedule(s.scheduler, "v_prediction").target(x0, eps, t)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-5)
    f = Schedule(s.scheduler, "flow")
    sigma = (t.float() / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(f.add_noise(x0, eps, t), (1 - sigma) * x0 + sigma * eps)
    assert torch.equal(f.target(x0, eps, t), eps - x0)
    with pytest.raises(ValueError, match="unknown prediction type"):
        Schedule(s.scheduler, "sample").target(x0, eps, t)


def test_pairs_share_t_and_eps():
    g = torch.Generator().manual_seed(1)
    t = pair_timesteps(4, 1000, g)
    assert t.shape == (8,) and torch.equal(t[:4], t[4:])
    eps = pair_noise(torch.zeros(8, 4, 2, 2), g)
    assert torch.equal(eps[:4], eps[4:]) and not torch.equal(eps[0], eps[1])


def test_timestep_sampling_ranges_and_errors():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(5000, 1000, g, t_min=100, t_max=200)
    assert t.min() >= 100 and t.max() <= 199
    ln = sample_timesteps(5000, 1000, g, distribution="logit_normal")
    assert 0 <= ln.min() and ln.max() <= 999 and abs(ln.float().mean().item() - 500) < 25
    with pytest.raises(ValueError, match="bad timestep range"):
        sample_timesteps(2, 1000, t_min=10, t_max=5)
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        sample_timesteps(2, 1000, distribution="cosine")


def test_per_sample_error_is_mean_over_dims():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert torch.allclose(per_sample_error(pred, target), torch.tensor([1.0, 1.0]))  # 4/4 and 4/4


def test_denoising_errors_reference_and_policy_at_same_xt():
    s = _schedule()
    calls = []

    class Flag:
        on = False

    def denoise(xt, t, cond):
        calls.append((xt.clone(), Flag.on))
        return xt * (2.0 if Flag.on else 1.0)

    class ref:
        def __enter__(self):
            Flag.on = True

        def __exit__(self, *a):
            Flag.on = False

    x0 = torch.randn(4, 3, 4, 4)
    t = pair_timesteps(2, 1000)
    eps = pair_noise(x0)
    out = denoising_errors(denoise, s, x0, {}, t, eps, reference=ref)
    assert len(calls) == 2 and torch.equal(calls[0][0], calls[1][0])  # same x_t for both
    assert calls[0][1] and not calls[1][1]
    xt = s.add_noise(x0, eps, t)
    assert torch.allclose(out.ref_err, per_sample_error(2 * xt, eps))
    assert torch.allclose(out.err, per_sample_error(xt, eps))
    assert out.ref_err.requires_grad is False


def test_gaussian_log_prob_matches_torch_distributions_mean_over_dims():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = 0.7
    ref = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(gaussian_log_prob(x, mean, std), ref, atol=1e-5)
    assert math.isclose(gaussian_log_prob(mean[:1], mean[:1], 1.0).item(), -0.5 * math.log(2 * math.pi), rel_tol=1e-6)


def test_prediction_and_step_kl_by_hand():
    """prediction_kl: mean over dims of the squared difference; step_kl: that over 2 s^2 (equal-variance Gaussians),
    with no gradient into the reference."""
    from diffalign.likelihood import prediction_kl, step_kl

    pred = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]], requires_grad=True)  # (2, 1, 2)
    ref = torch.tensor([[[0.0, 0.0]], [[0.0, 3.0]]], requires_grad=True)
    torch.testing.assert_close(prediction_kl(pred, ref), torch.tensor([2.5, 4.5]))  # (1 + 4) / 2, 9 / 2
    kl = step_kl(pred, ref, 0.5)  # / (2 * 0.25)
    torch.testing.assert_close(kl, torch.tensor([5.0, 9.0]))
    kl.sum().backward()
    assert ref.grad is None and pred.grad is not None
