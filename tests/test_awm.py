"""AWM: the loss by hand, against a transcription of the official code, and by invariant; the old-adapter decay;
one round on the tiny SD3 pipeline, sampled by the trained policy."""

import json
import math
from pathlib import Path

import pytest
import torch
from online_factory import tiny_round

from diffalign.objectives import OBJECTIVES
from diffalign.objectives.awm import AWM
from diffalign.online.old_policy import OLD_DECAY

REPO = Path(__file__).resolve().parents[1]


def _one(x):
    return torch.tensor([[[[x]]]], dtype=torch.float32)


def test_registered_with_the_official_defaults():
    obj = OBJECTIVES["awm"]()
    assert (obj.ghuber_power, obj.kl_weight, obj.old_weight, obj.adv_clip, obj.old_decay) == (
        0.25,
        1e-4,
        1.0,
        5.0,
        "awm",
    )


def test_hand_computed():
    """p ¼, s ½, v_θ 0.5, target 1 (one dim), A = 5: m = ¼, a = 1, loss = −a = −1 (v_old = v_θ: no old term);
    dloss/dv_θ = a s m^(p−1) · 2 (v_θ − target) = ½ · 4^¾ · (−1) = −√2 (a descent step moves v_θ to the target).
    A = −10 clips to −5: a = −1, loss 1, gradient +√2. v_old = 0: + 1 · 0.25 to the loss."""
    for adv, sign in ((5.0, 1), (-10.0, -1)):
        pred = _one(0.5).requires_grad_(True)
        loss, metrics = AWM()(pred, _one(0.5), None, _one(1.0), torch.tensor([0.5]), torch.tensor([adv]))
        assert loss.item() == pytest.approx(-sign) and metrics["mse"].item() == pytest.approx(0.25)
        loss.sum().backward()
        assert pred.grad.item() == pytest.approx(-sign * math.sqrt(2), rel=1e-6)
    loss, metrics = AWM()(_one(0.5), _one(0.0), None, _one(1.0), torch.tensor([0.5]), torch.tensor([5.0]))
    assert loss.item() == pytest.approx(-0.75) and metrics["old_kl"].item() == pytest.approx(0.25)


def _official(model_output, model_output_ref, model_output_ema, random_noise, clean_latents, timestep, adv, cfg):
    """scxue/advantage_weighted_matching advantage_weighted_matching/scripts/train_sd3_awm.py at 12b1397:
    `compute_log_prob_awm` lines 236-249 (weighting 'ghuber') and the loss, lines 1293-1352 (loss_type
    'exp_first', on-policy: `old_log_probs = log_prob.detach()`, kl_weight and kl_ema_weight 'Uniform'),
    written out on one timestep per sample (train_timesteps 1; the official repeats the advantages over them)."""
    model_output = model_output.double()
    log_prob = -((model_output - (random_noise.double() - clean_latents.double())) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    log_prob = (
        -(
            torch.pow(-log_prob + 1e-10, cfg["ghuber_power"])
            - torch.pow(torch.tensor(1e-10, device=log_prob.device, dtype=log_prob.dtype), cfg["ghuber_power"])
        )
        * timestep.view(-1)
        / cfg["ghuber_power"]
    )
    old_log_probs = log_prob.detach()
    advantages = torch.clamp(adv, -cfg["adv_clip_max"], cfg["adv_clip_max"])
    advantages = advantages / cfg["adv_clip_max"] * cfg["advantage_max"]
    ratio = torch.exp(log_prob - old_log_probs.detach())
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - cfg["clip_range"], 1.0 + cfg["clip_range"])
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    kl_loss = ((model_output - model_output_ref.double()) ** 2).mean(dim=(1, 2, 3), keepdim=True).mean()
    ema_kl_loss = ((model_output - model_output_ema.double()) ** 2).mean(dim=(1, 2, 3), keepdim=True).mean()
    return policy_loss + cfg["beta"] * kl_loss + cfg["ema_beta"] * ema_kl_loss


@pytest.mark.parametrize("power,beta", [(0.25, 1e-4), (0.25, 3e-3), (1.0, 1e-3)])
def test_matches_the_official_loss_and_gradient(power, beta):
    """Same tensors: the mean of AWM's per-sample loss is the official scalar, and both give the same gradient in
    v_θ (flow: target = ε − x0, s_t = σ_t = the official timestep)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    sigma = torch.rand(6, generator=g) * 0.9 + 0.05
    pred = (eps - x0 + 0.5 * torch.randn(6, 4, 4, 4, generator=g)).requires_grad_(True)
    ref = pred.detach() + 0.1 * torch.randn(pred.shape, generator=g)  # every draw seeded: the test is repeatable
    old = pred.detach() + 0.05 * torch.randn(pred.shape, generator=g)
    adv = torch.randn(6, generator=g) * 4
    cfg = dict(ghuber_power=power, adv_clip_max=5, advantage_max=1, clip_range=1, beta=beta, ema_beta=1)
    official = _official(pred, ref, old, eps, x0, sigma, adv, cfg)
    (grad_official,) = torch.autograd.grad(official, pred)
    loss, _ = AWM(ghuber_power=power, kl_weight=beta)(pred, old, ref, eps - x0, sigma, adv)
    (grad,) = torch.autograd.grad(loss.mean(), pred)
    assert loss.mean().item() == pytest.approx(official.item(), rel=1e-6)
    torch.testing.assert_close(grad, grad_official.float(), rtol=1e-5, atol=1e-7)  # float32 rounding


def test_zero_advantage_gives_no_policy_gradient_and_the_sign_sets_the_direction():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(4, 3, 4, 4, generator=g)
    pred = (target + 0.3 * torch.randn(4, 3, 4, 4, generator=g)).requires_grad_(True)
    obj, scale = AWM(old_weight=0.0), torch.rand(4, generator=g) + 0.1
    (grad,) = torch.autograd.grad(obj(pred, pred.detach(), None, target, scale, torch.zeros(4))[0].sum(), pred)
    assert torch.equal(grad, torch.zeros_like(grad))
    for adv, sign in ((2.0, 1), (-2.0, -1)):
        (grad,) = torch.autograd.grad(
            obj(pred, pred.detach(), None, target, scale, torch.full((4,), adv))[0].sum(), pred
        )
        step = -grad  # gradient descent direction, per sample
        assert (sign * (step * (target - pred.detach())).flatten(1).sum(1) > 0).all()  # A > 0: towards the target


def test_old_adapter_decay():
    assert [OLD_DECAY["awm"](s) for s in (0, 100, 300, 10**4)] == [0.0, pytest.approx(0.1), pytest.approx(0.3), 0.3]


def test_online_awm_on_tiny_sd3_runs_one_round_sampled_by_the_trained_policy(tmp_path, monkeypatch):
    """Flow family, Euler ODE rounds; at LoRA init the old adapter equals θ (old_kl 0); the old adapter exists and
    is checkpointed, though the trained one samples (source awm)."""
    from diffalign.pipelines.online import run
    from safetensors.torch import load_file

    from diffalign.sources import SOURCES

    assert SOURCES["awm"].old_policy and not SOURCES["awm"].old_samples
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    args = tiny_round(
        tmp_path, "awm", "sampling.steps=2", "sampling.eta=0", "sampling.guidance=1.0", "train.batch_size=4"
    )  # ODE rounds, CFG 1
    run(None, args)
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train/loss"]) and row["train/old_kl"] == 0.0 and row["train/mse"] > 0
    state = load_file(out / "checkpoints" / "step-000001" / "trainable.safetensors")
    assert any(".old." in k for k in state)
