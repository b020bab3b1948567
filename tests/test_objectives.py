"""Diffusion-DPO: hand-computed values, ln 2 at init, w/l swap, gradient direction."""

import math

import torch

from diffalign.objectives import OBJECTIVES
from diffalign.objectives.dpo import DiffusionDPO


def test_registry_has_dpo():
    assert OBJECTIVES["dpo"] is DiffusionDPO


def test_dpo_hand_computed():
    # docstring arithmetic: beta 2, Δw = -0.1, Δl = 0.2 -> inside 0.3 -> loss log(1 + e^-0.3)
    obj = DiffusionDPO(beta=2.0)
    loss, m = obj(torch.tensor([0.5, 0.8]), torch.tensor([0.6, 0.6]), torch.tensor([1.0]))
    assert math.isclose(loss.item(), math.log(1 + math.exp(-0.3)), rel_tol=1e-6)
    assert math.isclose(loss.item(), 0.554355, abs_tol=1e-6)
    assert m["implicit_acc"].item() == 1.0
    assert math.isclose(m["reward_margin"].item(), 0.3, rel_tol=1e-6)


def test_dpo_ln2_when_policy_equals_reference():
    err = torch.rand(8)
    loss, m = DiffusionDPO(beta=5000.0)(err, err.clone(), torch.ones(4))
    assert torch.allclose(loss, torch.full((4,), math.log(2.0)))
    assert m["implicit_acc"].sum() == 0


def test_swap_flips_margin():
    g = torch.Generator().manual_seed(0)
    err, ref = torch.rand(8, generator=g), torch.rand(8, generator=g)
    obj = DiffusionDPO(beta=100.0)
    _, m = obj(err, ref, torch.ones(4))
    swap = lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731  [w; l] -> [l; w]
    _, m2 = obj(swap(err), swap(ref), torch.ones(4))
    assert torch.allclose(m["reward_margin"], -m2["reward_margin"])


def test_soft_label_half_is_symmetric_and_hard_label_matches_paper():
    err, ref = torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.4])
    obj = DiffusionDPO(beta=10.0)
    inside = -5.0 * ((0.3 - 0.4) - (0.5 - 0.4))
    hard, _ = obj(err, ref, torch.tensor([1.0]))
    assert math.isclose(hard.item(), -math.log(1 / (1 + math.exp(-inside))), rel_tol=1e-6)
    half, _ = obj(err, ref, torch.tensor([0.5]))
    half_swapped, _ = obj(err.flip(0), ref.flip(0), torch.tensor([0.5]))
    assert torch.allclose(half, half_swapped)


def test_gradient_lowers_winner_error_relative_to_loser():
    err = torch.tensor([0.5, 0.5], requires_grad=True)
    loss, _ = DiffusionDPO(beta=10.0)(err, torch.tensor([0.5, 0.5]), torch.ones(1))
    loss.sum().backward()
    assert err.grad[0] > 0 > err.grad[1]  # descent lowers err_w, raises err_l


def test_sft_term_adds_winner_error():
    err, ref = torch.tensor([0.3, 0.5]), torch.tensor([0.3, 0.5])
    base, _ = DiffusionDPO(beta=1.0)(err, ref, torch.ones(1))
    with_sft, _ = DiffusionDPO(beta=1.0, sft_weight=2.0)(err, ref, torch.ones(1))
    assert math.isclose((with_sft - base).item(), 0.6, rel_tol=1e-6)
