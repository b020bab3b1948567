"""DGPO: the loss by hand, against a transcription of the official code (by gradient: the official loss is a
surrogate), by invariant, and one `diffalign online` round on the tiny SD3 pipeline."""

import json
import math
from pathlib import Path

import pytest
import torch
from online_factory import tiny_round

from diffalign.objectives import OBJECTIVES
from diffalign.objectives.dgpo import DGPO
from diffalign.sources import SOURCES

REPO = Path(__file__).resolve().parents[1]


def official_dgpo_loss(dsm_loss, ref_dsm_loss, advantages, group_index, num_groups, beta_dpo, group_size):
    """Luo-Yihong/DGPO scripts/train_sd3_dgpo.py lines 162-193 (commit 01ceb4b), compute_group_dgpo_loss_allreduce,
    on one process (the all_reduce of the group sums is then the identity): dsm_loss (N,) with grad."""
    delta_diff = dsm_loss.detach() - ref_dsm_loss.detach()
    per_sample_term = advantages * beta_dpo * delta_diff / group_size
    local_group_sums = torch.zeros(num_groups, dtype=per_sample_term.dtype)
    local_group_sums.scatter_add_(0, group_index, per_sample_term)
    global_group_sums = local_group_sums.clone().detach()
    group_weights = torch.sigmoid(global_group_sums)
    local_weights = group_weights[group_index]
    return (local_weights.detach() * advantages * dsm_loss).mean()


def test_registered_with_the_official_defaults_and_its_source():
    obj = OBJECTIVES["dgpo"]()
    assert isinstance(obj, DGPO) and obj.beta == 100.0 and obj.adv_clip == 5.0 and obj.global_std
    assert obj.sources == ("round_groups",) and "round_groups" in SOURCES and obj.needs_reference


def test_hand_computed():
    """β = 2, one group A = (1, −1), Δ = (−0.1, 0.2): z = 2 / 2 · (−0.1 − 0.2) = −0.3,
    loss = log(1 + e^−0.3) / 2 = 0.554355 / 2 = 0.277178."""
    err, ref = torch.tensor([0.5, 0.8]), torch.tensor([0.6, 0.6])
    loss, metrics = DGPO(beta=2.0)(err, ref, torch.tensor([[1.0, -1.0]]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.277178, abs=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(0.3, abs=1e-6) and metrics["implicit_acc"].item() == 1.0


@pytest.mark.parametrize("beta", [1.0, 100.0])
def test_gradient_equals_the_official_surrogates(beta):
    """Same tensors: B = 3 groups of G = 4, A with zero group mean; the gradient w.r.t. each sample's error of
    mean_groups loss equals that of the official mean_samples sg(σ(z_g)) A err (and the loss values differ)."""
    g = torch.Generator().manual_seed(0)
    b, k = 3, 4
    err = (torch.rand(b * k, generator=g) * 0.2 + 0.3).requires_grad_()
    ref = err.detach() + torch.randn(b * k, generator=g) * 0.05
    a = torch.randn(b, k, generator=g)
    a = a - a.mean(1, keepdim=True)
    loss, _ = DGPO(beta=beta)(err, ref, a)
    (ours,) = torch.autograd.grad(loss.mean(), err)
    err2 = err.detach().clone().requires_grad_()
    official = official_dgpo_loss(err2, ref, a.flatten(), torch.arange(b).repeat_interleave(k), b, beta, k)
    (theirs,) = torch.autograd.grad(official, err2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)


def test_ln2_over_beta_at_init_where_the_policy_is_the_reference():
    err = torch.rand(8)
    loss, metrics = DGPO(beta=50.0)(err, err.clone(), torch.tensor([[1.0, -1.0, 0.5, -0.5], [2.0, 0.0, -1.0, -1.0]]))
    torch.testing.assert_close(loss, torch.full((2,), math.log(2) / 50.0))
    assert (metrics["reward_margin"] == 0).all()


def test_swapping_the_preferred_and_rejected_halves_flips_the_margin():
    """Negating A swaps which half of the group is preferred: the margin −z changes sign."""
    g = torch.Generator().manual_seed(1)
    err, ref = torch.rand(6, generator=g), torch.rand(6, generator=g)
    a = torch.tensor([[1.0, -0.5, -0.5], [0.2, 0.3, -0.5]])
    obj = DGPO(beta=10.0)
    _, m = obj(err, ref, a)
    _, m_swapped = obj(err, ref, -a)
    torch.testing.assert_close(m_swapped["reward_margin"], -m["reward_margin"])
    assert (m["reward_margin"] != 0).all()


def test_sign_of_beta_descending_lowers_the_preferred_error_and_raises_the_rejected():
    """β > 0: d loss / d err is positive for A > 0 (a step lowers its error) and negative for A < 0; with a larger
    β the group's σ(z) saturates, so a group already far ahead (z ≪ 0) gets a smaller push."""
    err = torch.tensor([0.5, 0.5, 0.5]).requires_grad_()
    a = torch.tensor([[1.0, 0.0, -1.0]])
    loss, _ = DGPO(beta=10.0)(err, torch.tensor([0.6, 0.5, 0.4]), a)  # preferred ahead: z = 10 / 3 · (−0.2) < 0
    (grad,) = torch.autograd.grad(loss.sum(), err)
    assert grad[0] > 0 and grad[2] < 0 and grad[1] == 0
    err.grad = None
    loss_big, _ = DGPO(beta=1000.0)(err, torch.tensor([0.6, 0.5, 0.4]), a)
    (grad_big,) = torch.autograd.grad(loss_big.sum(), err)
    assert 0 < grad_big[0] < grad[0]


def test_advantages_are_group_relative_and_clipped():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 30.0]])
    a = DGPO(adv_clip=1.0).advantages(r)
    torch.testing.assert_close(a.sum(1)[:1], torch.zeros(1), atol=1e-6, rtol=0)
    assert a.abs().max() <= 1.0


# ODE rounds (noise level 0), CFG 1, the official KL weight
DGPO_ROUND = ("sampling.steps=2", "sampling.eta=0", "sampling.guidance=1.0", "online.kl_weight=0.02")


def test_online_dgpo_on_tiny_sd3_runs_one_round(tmp_path, monkeypatch):
    """ODE rounds (flow sampler at noise level 0), whole groups per row, the loss at LoRA init is ln 2 / β."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    run(None, tiny_round(tmp_path, "dgpo", *DGPO_ROUND))
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert row["train/loss"] == pytest.approx(math.log(2) / 100.0, rel=1e-4)  # one step, taken at init
    assert row["train/reward_margin"] == 0.0 and row["train/kl"] == 0.0


def test_online_dgpo_rejects_groups_of_one(tmp_path, monkeypatch):
    from diffalign.pipelines.online import run

    from diffalign.errors import DiffalignError

    monkeypatch.chdir(REPO)
    with pytest.raises(DiffalignError, match="images_per_prompt must be >= 2"):
        run(None, tiny_round(tmp_path, "dgpo", *DGPO_ROUND, "sampling.images_per_prompt=1"))
