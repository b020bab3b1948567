"""Flow-DPPO (diffalign/objectives/flow_dppo.py): the hand-computed mask, the official loss function written out on
the same flow steps, the invariants (on-policy = -A, corrective far updates pass, dropped rows carry no gradient),
and a `diffalign online` round on the tiny SD3 through the old_policy_steps source."""

import json
import math
from pathlib import Path

import torch
from online_factory import tiny_round
from test_grpo_guard import flow_sampler

from diffalign.likelihood import gaussian_log_prob
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.flow_dppo import FlowDPPO

REPO = Path(__file__).resolve().parents[1]


def test_registered_with_the_official_defaults():
    d = FlowDPPO()
    assert OBJECTIVES["flow_dppo"] is FlowDPPO and FlowDPPO.sources == ("old_policy_steps",)
    assert (d.kl_threshold, d.beta, d.adv_clip, d.global_std) == (1e-5, 0.0, math.inf, True)
    rewards = torch.full((30, 2), 0.5)
    rewards[0] = torch.tensor([0.0, 1.0])  # over the round's std: A = ±0.5 / sqrt(0.5 / 60) = ±sqrt(30) = ±5.48
    a = d.advantages(rewards)
    assert math.isclose(
        float(a[0, 1]), math.sqrt(30), rel_tol=2e-3
    )  # std + 1e-4 and float(a[0, 0]) == -float(a[0, 1])
    assert OBJECTIVES["grpo"]().advantages(rewards)[0, 1] == 5.0  # what Flow-GRPO's clip would make of it


def test_hand_computed_mask():
    """τ = 0.1, std = 0.5, mean_dims Δmu² = [0.1, 0.01, 0.1, 0.1] (KL = [0.2, 0.02, 0.2, 0.2]), rho = [1.5, 1.5, 0.5,
    1.5], A = [1, 1, 1, -1]: chain 0 is far and over-pushing (dropped), chain 1 near, chain 2 far but corrective
    (rho < 1 with A > 0), chain 3 far but corrective (rho > 1 with A < 0): L = [0, -1.5, -0.5, 1.5]."""
    old_mean = torch.zeros(4, 1)
    mean = torch.sqrt(torch.tensor([[0.1], [0.01], [0.1], [0.1]]))
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.5]))
    a = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, m = FlowDPPO(kl_threshold=0.1)(lp, torch.zeros(4), a, mean, old_mean, torch.tensor(0.5))
    torch.testing.assert_close(m["kl_old"], torch.tensor([0.2, 0.02, 0.2, 0.2]))
    torch.testing.assert_close(loss, torch.tensor([0.0, -1.5, -0.5, 1.5]))
    assert m["far_frac"].tolist() == [1.0, 0.0, 1.0, 1.0] and m["masked_frac"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_loss_is_the_official_function_on_the_same_flow_steps():
    """Tencent-Hunyuan/UniRL unirl/algorithms/flowdppo.py `_flowdppo_kl_adv_loss` (+ `_gaussian_kl_div`) with the
    σ_t of `FlowDPPO._compute_sigma_t` (add_kl_coefficient: true), written out below on the same steps of a 4-step
    SD3 grid, with τ between the rows' KLs so both branches of the mask run. At σ = 1 (step 0) the official σ_t clamps
    σ to 0.99 in 1 - σ where Flow-GRPO's sampler (diffalign's) uses σ_1; diffalign divides by the std the sampler
    drew with, so steps 1 and 2 are compared."""
    sampler, g = flow_sampler(), torch.Generator().manual_seed(0)
    eta = 0.7
    for j in (1, 2):
        t = sampler.timesteps[j]
        x, v_old = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
        v = v_old + torch.tensor([0.01, 0.3, 0.01, 0.3, 0.01, 0.3]).view(6, 1, 1, 1) * torch.randn(
            6, 4, 8, 8, generator=g
        )
        old_means, std = sampler.mean_std(v_old, t, x)
        x_next = old_means + std * torch.randn(6, 4, 8, 8, generator=g)
        new_means, _ = sampler.mean_std(v, t, x)
        new_logp, old_logp = gaussian_log_prob(x_next, new_means, std), gaussian_log_prob(x_next, old_means, std)
        advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5, -0.5])
        kl = ((new_means - old_means) ** 2 / (2 * std**2)).flatten(1).mean(1)
        kl_mask_threshold = float(kl.median())
        loss, m = FlowDPPO(kl_threshold=kl_mask_threshold)(new_logp, old_logp, advantages, new_means, old_means, std)
        # the official code: (B,) rows for its [B, S'], one step
        sigmas = sampler.sigmas
        s, s_next = sigmas[j], sigmas[j + 1]
        dt = s_next - s
        std_dev_t = torch.sqrt(s / (1.0 - torch.clamp(s, max=0.99))) * eta
        sigma_t = std_dev_t * torch.sqrt(-dt)
        log_diff = new_logp - old_logp
        ratio = torch.exp(log_diff)
        adv = advantages.detach()
        unclipped_loss = -adv * ratio
        kl_per_elem = (new_means - old_means) ** 2 / (2 * sigma_t**2)
        kl_per_sample = kl_per_elem.mean(dim=tuple(range(1, kl_per_elem.ndim)))
        kl_mask = kl_per_sample < kl_mask_threshold
        pos_rm_mask = (~kl_mask) & (ratio > 1.0) & (adv > 0)
        neg_rm_mask = (~kl_mask) & (ratio < 1.0) & (adv < 0)
        rm_mask = pos_rm_mask | neg_rm_mask
        keep_adv_mask = (~rm_mask).detach()
        zero = torch.zeros((), dtype=unclipped_loss.dtype, device=unclipped_loss.device)
        loss_per_elem = torch.where(keep_adv_mask, unclipped_loss, zero)
        torch.testing.assert_close(loss, loss_per_elem, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m["kl_old"], kl_per_sample, rtol=1e-5, atol=0)
        assert m["far_frac"].tolist() == (~kl_mask).float().tolist()
        assert m["masked_frac"].tolist() == rm_mask.float().tolist() and 0 < rm_mask.sum() < 3  # some, not all far


def test_on_policy_is_the_plain_policy_gradient_loss():
    """mu_θ = mu_old: KL 0 < τ, nothing masked, rho = 1, L = -A."""
    lp, a = torch.tensor([-1.3, 0.2, 0.7]), torch.tensor([0.5, -2.0, 1.0])
    mean = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    loss, m = FlowDPPO()(lp, lp.clone(), a, mean, mean.clone(), torch.tensor(0.1))
    assert m["masked_frac"].tolist() == [0.0, 0.0, 0.0] and m["ratio"].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(loss, -a)


def test_dropped_rows_have_no_gradient_and_the_others_the_policy_gradient():
    """Far rows: A > 0 with rho > 1 (over-pushing) gets no gradient; A > 0 with rho < 1 (corrective) gets -A rho."""
    lp = torch.log(torch.tensor([1.5, 0.5])).requires_grad_()
    mean, old_mean = torch.ones(2, 3), torch.zeros(2, 3)  # KL = 1 / (2 * 0.01) = 50: both far
    loss, m = FlowDPPO(kl_threshold=1.0)(
        lp, torch.zeros(2), torch.tensor([2.0, 2.0]), mean, old_mean, torch.tensor(0.1)
    )
    loss.sum().backward()
    assert m["masked_frac"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, -2.0 * 0.5]))


def test_online_round_on_the_tiny_sd3(tmp_path, monkeypatch):
    """One round on the tiny SD3 (flow SDE, CFG 2): the first optimizer step is on-policy (KL to the sampler's step 0,
    ratio 1 up to float rounding), so nothing is masked and the loss is -mean A of its rows."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    run(None, tiny_round(tmp_path, "flow_dppo", "sampling.steps=3", "sampling.eta=0.7", "sampling.guidance=2.0"))
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text())
    assert abs(row["train/ratio"] - 1) < 1e-6 and row["train/kl_old"] < 1e-10 and row["train/masked_frac"] == 0
    assert math.isclose(row["train/loss"], -row["train/advantage"], abs_tol=1e-5) and row["skipped_steps"] == 0
