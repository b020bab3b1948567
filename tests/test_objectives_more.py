"""InPO, SmPO, Diffusion-KTO, MaPO, Diffusion-DRO, SFT: hand-computed values, init invariants, w/l swap, gradients."""

import dataclasses
import math

import pytest
import torch

from diffalign.objectives import OBJECTIVES
from diffalign.objectives.dpo import DiffusionDPO
from diffalign.objectives.dro import DiffusionDRO
from diffalign.objectives.inpo import InPO
from diffalign.objectives.kto import DiffusionKTO
from diffalign.objectives.mapo import MaPO, bounded_link
from diffalign.objectives.sft import SFT
from diffalign.objectives.smpo import SmPO, smpo_preference

ERR, REF = torch.tensor([0.5, 0.8]), torch.tensor([0.6, 0.6])  # Δ_w = −0.1, Δ_l = 0.2
swap = lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731  [w; l] -> [l; w]
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def test_registry_and_estimator_settings():
    assert {"dpo", "inpo", "smpo", "kto", "mapo", "dro", "sft"} <= set(OBJECTIVES)
    assert OBJECTIVES["inpo"]().xt_source == "ddim_inversion" and OBJECTIVES["smpo"]().xt_source == "renoise_inversion"
    assert not MaPO.needs_reference and not SFT.needs_reference and DiffusionKTO.needs_reference
    assert not DiffusionKTO.paired and not DiffusionDRO.paired and SmPO.paired
    for cls in OBJECTIVES.values():
        assert dataclasses.is_dataclass(cls)


def test_inpo_is_dpo_at_inverted_latents():
    loss, m = InPO(beta=2.0)(ERR, REF, torch.ones(1))
    assert math.isclose(loss.item(), 0.554355, abs_tol=1e-6)  # DPO's hand value: inside 0.3
    g = torch.Generator().manual_seed(0)
    err, ref, p = torch.rand(8, generator=g), torch.rand(8, generator=g), torch.rand(4, generator=g)
    a, _ = InPO(beta=300.0, sft_weight=0.5)(err, ref, p)
    b, _ = DiffusionDPO(beta=300.0, sft_weight=0.5)(err, ref, p)
    assert torch.equal(a, b)


def test_smpo_hand_computed_preference_and_loss():
    p = smpo_preference(torch.tensor([0.25]), torch.tensor([0.20]), 0.11544, 0.28202)
    assert math.isclose(p.item(), 0.574481, abs_tol=1e-6)  # σ(0.05 / 0.16658)
    loss, m = SmPO(beta=2.0, gamma=10.0)(ERR, REF, torch.tensor([0.6]))
    assert math.isclose(loss.item(), math.log(1 + math.exp(-0.6)), rel_tol=1e-6)  # inside = 0.6
    assert math.isclose(loss.item(), 0.437488, abs_tol=1e-6)
    assert m["implicit_acc"].item() == 1.0


def test_smpo_invariants_ln2_and_swap():
    g = torch.Generator().manual_seed(1)
    err, ref, p = torch.rand(8, generator=g), torch.rand(8, generator=g), 0.5 + 0.3 * torch.rand(4, generator=g)
    obj = SmPO(beta=500.0)
    at_init, _ = obj(err, err.clone(), p)
    assert torch.allclose(at_init, torch.full((4,), math.log(2.0)))
    half, _ = obj(err, ref, torch.full((4,), 0.5))  # p = ½: no preference, no gradient signal
    assert torch.allclose(half, torch.full((4,), math.log(2.0)))
    loss, m = obj(err, ref, p)
    swapped, m2 = obj(swap(err), swap(ref), 1 - p)  # swapping w/l with p -> 1 − p is the same pair
    assert torch.allclose(loss, swapped) and torch.allclose(m["reward_margin"], m2["reward_margin"])


def test_kto_hand_computed_and_baseline():
    loss, m = DiffusionKTO(beta=2.0)(ERR, REF, torch.ones(1))
    assert math.isclose(loss.item(), (1 - sig(0.2) + 1 - sig(0.4)) / 2, rel_tol=1e-6)
    assert math.isclose(loss.item(), 0.425739, abs_tol=1e-6) and m["kl_baseline"].item() == 0
    # g = [0.2, −0.1] -> z = mean = 0.05 > 0: both samples at distance 0.15 from the baseline
    per_sample, m = DiffusionKTO(beta=2.0)(torch.tensor([0.4, 0.7]), REF, None, desirable=torch.tensor([True, False]))
    assert per_sample.shape == (2,) and torch.allclose(per_sample, torch.full((2,), 1 - sig(0.3)))
    assert math.isclose(m["kl_baseline"][0].item(), 0.05, rel_tol=1e-5)
    override, _ = DiffusionKTO(beta=2.0)(ERR, REF, torch.ones(1), z=torch.tensor(0.1))
    assert math.isclose(override.item(), (1 - sig(0.0) + 1 - sig(0.6)) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        DiffusionKTO()(ERR, REF, torch.ones(1), desirable=torch.tensor([True, False]))


def test_kto_half_at_init_swap_and_z_is_detached():
    err = torch.rand(8)
    loss, _ = DiffusionKTO(beta=5000.0)(err, err.clone(), torch.ones(4))
    assert torch.allclose(loss, torch.full((4,), 0.5))
    g = torch.Generator().manual_seed(2)
    err, ref = torch.rand(8, generator=g), torch.rand(8, generator=g)
    a, _ = DiffusionKTO(beta=10.0)(err, ref, torch.ones(4))
    b, _ = DiffusionKTO(beta=10.0)(swap(err), swap(ref), torch.zeros(4))  # l first, label 0: same samples
    assert torch.allclose(a, b)
    # z = mean(g) is detached: sample 0's loss has no gradient through the other samples' errors
    e = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    d, _ = DiffusionKTO(beta=10.0)(e, torch.tensor([0.6, 0.4, 0.5, 0.5]), None, desirable=torch.tensor([1, 1, 1, 0]))
    (grad,) = torch.autograd.grad(d[0], e)
    assert grad[0] != 0 and torch.equal(grad[1:], torch.zeros(3))


def test_mapo_hand_computed_and_zero_margin():
    loss, m = MaPO(beta=0.1, snr_value=0.5, num_train_timesteps=10.0)(torch.tensor([0.2, 0.6]), None, torch.ones(1))
    assert math.isclose(m["reward_margin"].item(), 0.933444, abs_tol=1e-5)
    assert math.isclose(loss.item(), 0.233160, abs_tol=1e-6)
    same, _ = MaPO()(torch.tensor([0.3, 0.3]), None, torch.ones(1))
    assert math.isclose(same.item(), 0.3 + 0.1 * math.log(2), rel_tol=1e-6)
    _, m2 = MaPO()(torch.tensor([0.6, 0.2]), None, torch.ones(1))
    _, m1 = MaPO()(torch.tensor([0.2, 0.6]), None, torch.ones(1))
    assert math.isclose(m1["reward_margin"].item(), -m2["reward_margin"].item(), rel_tol=1e-6)


def test_mapo_link_is_safe_at_zero():
    x = torch.tensor([0.0, 1e-6, 1e-4, 0.5], requires_grad=True)
    f = bounded_link(x)
    assert torch.allclose(f, torch.tensor([1.0, 1 - 5e-7, 1 - 5e-5, 0.5 / math.expm1(0.5)]), atol=1e-7)
    f.sum().backward()
    assert torch.isfinite(x.grad).all() and math.isclose(x.grad[0].item(), -0.5, rel_tol=1e-6)


def test_dro_hand_computed_and_hinge():
    obj = DiffusionDRO()
    loss, m = obj(torch.tensor([0.7, 0.5]), REF, None)  # expert worse than policy, relative to the reference
    assert math.isclose(loss.item(), 0.201, rel_tol=1e-6)
    loss, m = obj(torch.tensor([0.5, 0.7]), REF, None)  # expert ranked above: hinge closed
    assert loss.item() == 0 and m["implicit_acc"].item() == 1
    err = torch.rand(6)
    at_init, _ = obj(err, err.clone(), None)
    assert torch.allclose(at_init, torch.full((3,), 0.001))


def test_sft_hand_computed():
    loss, _ = SFT()(torch.tensor([0.3, 0.5]), None, torch.ones(1))
    assert math.isclose(loss.item(), 0.3, rel_tol=1e-6)
    soft, _ = SFT()(torch.tensor([0.3, 0.5]), None, torch.tensor([0.75]))
    assert math.isclose(soft.item(), 0.35, rel_tol=1e-6)


@pytest.mark.parametrize("name", ["inpo", "smpo", "kto", "mapo", "dro", "sft"])
def test_gradient_lowers_first_error_relative_to_second(name):
    """Descending the loss lowers err_w (err_expert for DRO) relative to err_l (err_policy), from equal errors."""
    obj = OBJECTIVES[name](**({"beta": 10.0} if name in ("inpo", "smpo", "kto") else {}))
    err = torch.tensor([0.5, 0.5], requires_grad=True)
    ref = torch.tensor([0.5, 0.5]) if obj.needs_reference else None
    label = torch.tensor([0.7]) if name == "smpo" else torch.ones(1)
    loss, _ = obj(err, ref, label)
    loss.sum().backward()
    assert err.grad[0] > err.grad[1], err.grad
    assert err.grad[0] > 0 or name == "sft"  # SFT: only the winner's error moves
