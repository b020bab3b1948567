"""GRPO-Guard (diffalign/objectives/grpo_guard.py): the hand-computed loss, the official loss lines written out on
the same flow steps, the invariants (on-policy ratio 1, the normalised ratio's gradient), and a `diffalign online`
round on the tiny SD3 through the old_policy_steps source."""

import json
import math
from pathlib import Path

import torch
from online_factory import tiny_round

from diffalign.likelihood import gaussian_log_prob
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.grpo_guard import GRPOGuard

REPO = Path(__file__).resolve().parents[1]


def flow_sampler(steps: int = 4, noise_level: float = 0.7):
    """Flow-GRPO's SDE sampler on SD3's schedule (shift 3), without a model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffalign.sampling.flow_sde import FlowSDESampler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return FlowSDESampler(scheduler.sigmas.float(), scheduler.timesteps.float(), noise_level)


def test_registered_with_the_official_defaults():
    g = GRPOGuard()
    assert OBJECTIVES["grpo_guard"] is GRPOGuard and GRPOGuard.sources == ("old_policy_steps",)
    assert (g.clip_range, g.beta, g.adv_clip, g.global_std) == (2e-6, 0.0, 5.0, False)


def test_hand_computed_loss():
    """s = 0.5, kl_std 1 (-Δt = 0.25), mean_dims Δmu² = 0.02 (b = 0.04), logp - logp_old = [0.16, -0.44], A = [1, -1],
    ε = 0.05: rho = exp([0.1, -0.2]); L = [max(-1.105, -1.05), max(0.819, 0.95)] / 0.25 = [-4.2, 3.8]."""
    mean, old_mean = torch.full((2, 2), 0.1), torch.zeros(2, 2)  # Δmu = (0.1, 0.1) -> mean_dims Δmu² = 0.01
    mean[:, 1] = math.sqrt(0.03)  # mean_dims Δmu² = (0.01 + 0.03) / 2 = 0.02
    lp, a = torch.tensor([0.16, -0.44]), torch.tensor([1.0, -1.0])
    loss, m = GRPOGuard(clip_range=0.05)(
        lp, torch.zeros(2), a, mean, old_mean, torch.tensor(0.5), kl_std=torch.tensor(1.0)
    )
    torch.testing.assert_close(m["ratio"], torch.exp(torch.tensor([0.1, -0.2])))
    torch.testing.assert_close(loss, torch.tensor([-4.2, 3.8]))
    assert m["clip_frac"].tolist() == [1.0, 1.0] and m["step_weight"].tolist() == [4.0, 4.0]


def test_loss_is_the_official_lines_on_the_same_flow_steps():
    """yifan123/flow_grpo scripts/train_sd3_GRPO_Guard.py (the GRPO-Guard training loop, `config.rationorm`) and
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (`return_sqrt_dt`), written out below on the same velocities
    at every step of a 4-step SD3 grid, σ = 1 included: ratio_mean_bias, the normalised ratio, the clip and the
    division by sqrt_dt.mean()². Chain by chain: the official line reduces the bias over tuple(range(1,
    log_prob.ndim)) = () for a (B,) log_prob, which torch reads as every dim (the batch mean of b); the paper's b
    (Eq. 8) and diffalign's are per chain, and the two agree for one chain."""
    sampler, g = flow_sampler(), torch.Generator().manual_seed(0)
    noise_level, clip_range, guard = 0.7, 2e-3, GRPOGuard(clip_range=2e-3)
    for j in range(len(sampler.timesteps) - 1):
        t = sampler.timesteps[j]
        x, v_old = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        v = v_old + 0.05 * torch.randn(3, 4, 8, 8, generator=g)
        old_mean, std = sampler.mean_std(v_old, t, x)
        x_next = old_mean + std * torch.randn(3, 4, 8, 8, generator=g)  # sampled by the old step
        mean, _ = sampler.mean_std(v, t, x)
        lp, old_lp = gaussian_log_prob(x_next, mean, std), gaussian_log_prob(x_next, old_mean, std)
        advantages = torch.tensor([1.5, -0.5, 0.7])
        loss, _ = guard(lp, old_lp, advantages, mean, old_mean, std, kl_std=sampler.kl_std(t))
        for b in range(3):  # the official code on one chain
            sample, model_output, model_output_old = x[b : b + 1], v[b : b + 1], v_old[b : b + 1]
            i = sampler.index(t)
            sigma, sigma_prev, sigma_max = sampler.sigmas[i], sampler.sigmas[i + 1], sampler.sigmas[1].item()
            dt = sigma_prev - sigma
            std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
            prev_sample_mean, sample_prev_sample_mean = (
                sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                + u * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
                for u in (model_output, model_output_old)
            )
            prev_sample = x_next[b : b + 1]
            log_prob, sample_log_probs = (
                (
                    -((prev_sample - m) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                    - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                    - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
                ).mean(dim=(1, 2, 3))
                for m in (prev_sample_mean, sample_prev_sample_mean)
            )
            sqrt_dt = torch.sqrt(-1 * dt)
            sigma_t = std_dev_t.mean()
            ratio_mean_bias = (
                (prev_sample_mean - sample_prev_sample_mean).pow(2).mean(dim=tuple(range(1, log_prob.ndim)))
            )
            ratio_mean_bias = ratio_mean_bias / (2 * (sqrt_dt.mean() * sigma_t) ** 2)
            ratio = torch.exp((log_prob - sample_log_probs + ratio_mean_bias) * (sqrt_dt.mean() * sigma_t))
            unclipped_loss = -advantages[b : b + 1] * ratio
            clipped_loss = -advantages[b : b + 1] * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
            policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
            policy_loss = policy_loss / (sqrt_dt.mean() ** 2)
            torch.testing.assert_close(loss[b], policy_loss, rtol=1e-4, atol=1e-6)


def test_on_policy_ratio_is_one_and_the_loss_is_minus_a_over_dt():
    """mu_θ = mu_old, logp = logp_old: rho = 1 and L = -A / (-Δt) (the step's reweight), for either advantage sign."""
    sampler, g = flow_sampler(), torch.Generator().manual_seed(1)
    t = sampler.timesteps[1]
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mean, std = sampler.mean_std(v, t, x)
    lp = gaussian_log_prob(mean + std * torch.randn(2, 4, 8, 8, generator=g), mean, std)
    a = torch.tensor([0.8, -1.2])
    loss, m = GRPOGuard()(lp, lp.clone(), a, mean, mean.clone(), std, kl_std=sampler.kl_std(t))
    dt = sampler.sigmas[1] - sampler.sigmas[2]
    assert m["ratio"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(loss, -a / dt)


def test_normalised_ratio_gradient_is_the_noise_times_the_mean_gradient():
    """With b's gradient (as the official code), ∂[(logp - logp_old + b) s]/∂mu_θ = (x' - mu_old) / (s D) = eps / D:
    the same scale at every step (no 1/s), which is what lets one ε serve every step."""
    sampler, g = flow_sampler(), torch.Generator().manual_seed(2)
    for j in range(len(sampler.timesteps) - 1):
        t = sampler.timesteps[j]
        x, v_old = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        old_mean, std = sampler.mean_std(v_old, t, x)
        eps = torch.randn(1, 4, 8, 8, generator=g)
        x_next = old_mean + std * eps
        mean = (old_mean + 0.01 * torch.randn(1, 4, 8, 8, generator=g)).requires_grad_()
        lp, old_lp = gaussian_log_prob(x_next, mean, std), gaussian_log_prob(x_next, old_mean, std)
        # -A rho with A = 1 inside the clip: ∂L/∂mu = -rho eps / (D (-Δt))
        loss, m = GRPOGuard(clip_range=10.0)(lp, old_lp, torch.ones(1), mean, old_mean, std, kl_std=sampler.kl_std(t))
        loss.sum().backward()
        dt = sampler.sigmas[j] - sampler.sigmas[j + 1]
        torch.testing.assert_close(mean.grad, -m["ratio"] * eps / (eps.numel() * dt), rtol=1e-3, atol=1e-9)


def test_online_round_on_the_tiny_sd3(tmp_path, monkeypatch):
    """One round on the tiny SD3 (flow SDE, CFG 2): the sampler keeps its guided predictions, the old step means are
    its own; the first optimizer step is on-policy (normalised ratio 1 up to float rounding) and trains."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    run(None, tiny_round(tmp_path, "grpo_guard", "sampling.steps=3", "sampling.eta=0.7", "sampling.guidance=2.0"))
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text())
    assert abs(row["train/ratio"] - 1) < 1e-6 and row["train/step_weight"] > 1
    assert math.isfinite(row["train/loss"]) and row["skipped_steps"] == 0
