"""DiffusionNFT: the loss by hand and by invariant, the x0 slope of every prediction type, the old-policy EMA, the
round loop on the toy and the tiny SD3 pipeline, and (slow) learning checks on the toy world."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffalign.likelihood import Schedule
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.nft import DiffusionNFT, adaptive_x0_loss, x0_scale
from diffalign.online.old_policy import OLD_DECAY, update_old
from diffalign.paths import TOY_HELDOUT, TOY_MODEL

REPO = Path(__file__).resolve().parents[1]
ONE = torch.ones(1)


def _nft_loss(v, v_old, target, adv, beta=1.0, **kw):
    """Loss of one sample with one latent dim, scale 1, no reference."""
    obj = DiffusionNFT(beta=beta, **kw)
    t = lambda x: torch.tensor([[[[x]]]], dtype=torch.float32)  # noqa: E731
    loss, metrics = obj(t(v), t(v_old), None, t(target), ONE, torch.tensor([adv]))
    return loss, metrics


def test_registered_with_paper_defaults():
    obj = OBJECTIVES["nft"]()
    assert (obj.beta, obj.kl_weight, obj.adv_clip, obj.old_decay) == (1.0, 1e-4, 5.0, "linear")


def test_hand_computed():
    """β 1, c 5, v_θ 0.5, v_old 0, target 1. A = 5: r = 1, v⁺ = 0.5, d = -0.5, L⁺ = 0.25 / 0.5 = 0.5, loss 2.5.
    A = -5: r = 0, v⁻ = 2·0 − 0.5 = −0.5, d = −1.5, L⁻ = 2.25 / 1.5 = 1.5, loss 7.5.
    β 0.5, A = 0: r = ½, v⁺ = 0.25 (d −0.75, L 0.75), v⁻ = −0.25 (d −1.25, L 1.25), loss 5 (½·0.75 + ½·1.25) / 0.5 = 10."""
    assert _nft_loss(0.5, 0.0, 1.0, 5.0)[0].item() == pytest.approx(2.5)
    assert _nft_loss(0.5, 0.0, 1.0, -5.0)[0].item() == pytest.approx(7.5)
    assert _nft_loss(0.5, 0.0, 1.0, 0.0, beta=0.5)[0].item() == pytest.approx(10.0)
    assert _nft_loss(0.5, 0.0, 1.0, -5.0, negate_advantages=True)[0].item() == pytest.approx(2.5)


def test_kl_term_and_adaptive_weight():
    """KL: kl_weight · mean (v_θ − v_ref)²; the adaptive weight divides by mean |d| (no gradient through it)."""
    pred, old, target = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, 1, 2, 2)
    ref = torch.zeros(2, 1, 2, 2)
    obj = DiffusionNFT(kl_weight=0.1)
    loss, metrics = obj(pred, old, ref, target, torch.ones(2), torch.zeros(2))
    # at v_θ = v_old: L± = 0.25 / 0.5 = 0.5, policy part 5 · 0.5 = 2.5; KL 0.1 · 0.25 = 0.025
    assert torch.allclose(loss, torch.full((2,), 2.525)) and torch.allclose(metrics["kl"], torch.full((2,), 0.25))
    x = torch.tensor([[[[0.3, -0.1]]]], requires_grad=True)
    adaptive_x0_loss(x, torch.zeros_like(x), torch.tensor([2.0])).backward()
    # d = [0.6, -0.2], w = 0.4: L = mean(d²) / w, dL/dx = 2 · 2 d / 2 / w = [3, -1]
    assert torch.allclose(x.grad, torch.tensor([[[[3.0, -1.0]]]]))


def test_at_init_both_policies_are_v_theta_and_the_loss_is_weighted_flow_matching():
    """v_θ = v_old: v⁺ = v⁻ = v_θ for any β, so the loss is c · L(v_θ) / β whatever the advantages."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    scale, adv = torch.rand(4, generator=g) + 0.1, torch.randn(4, generator=g) * 3
    for beta in (1.0, 0.1):
        loss, _ = DiffusionNFT(beta=beta)(pred, pred.clone(), None, target, scale, adv)
        assert torch.allclose(loss, 5.0 * adaptive_x0_loss(pred, target, scale) / beta)


@pytest.mark.parametrize("adv,sign", [(5.0, -1), (-5.0, 1)])
def test_gradient_direction(adv, sign):
    """At init, r = 1 pulls v_θ towards the target (gradient of sign pred − target), r = 0 pushes it away."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 4, 4, generator=g)
    pred = (target + 0.3 * torch.randn(2, 3, 4, 4, generator=g)).requires_grad_(True)
    loss, _ = DiffusionNFT()(pred, pred.detach().clone(), None, target, torch.ones(2), torch.full((2,), adv))
    loss.sum().backward()
    step = -pred.grad  # gradient descent direction
    assert sign * ((step * (target - pred.detach())).sum()) < 0  # r = 1: towards the target; r = 0: away


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), "flow"),
        Schedule(DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), "v_prediction"),
        Schedule(DDPMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon"), "epsilon"),
    ],
    ids=["flow", "v_prediction", "epsilon"],
)
def test_x0_scale_is_the_slope_of_each_families_x0_estimate(schedule):
    """x̂0(pred) − x0 = scale · (target − pred) with each parameterisation's own x0 formula."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 500, 900])
    xt, target = schedule.add_noise(x0, eps, t), schedule.target(x0, eps, t)
    pred = target + 0.1 * torch.randn(3, 2, 4, 4, generator=g)
    if schedule.prediction_type == "flow":
        x0_hat = xt - schedule.sigma(t).view(-1, 1, 1, 1) * pred
    else:
        a = schedule.alpha_bar(t).view(-1, 1, 1, 1)
        x0_hat = a.sqrt() * xt - (1 - a).sqrt() * pred  # v-prediction
        if schedule.prediction_type == "epsilon":
            x0_hat = (xt - (1 - a).sqrt() * pred) / a.sqrt()
    expected = x0_scale(schedule, t).view(-1, 1, 1, 1) * (target - pred)
    assert torch.allclose(x0_hat - x0, expected, atol=1e-4)


def test_old_policy_decay_and_ema():
    assert [OLD_DECAY["linear"](s) for s in (0, 100, 900)] == [0.0, pytest.approx(0.1), 0.5]
    assert [OLD_DECAY["delayed"](s) for s in (10, 75, 95, 10**4)] == [0.0, 0.0, pytest.approx(0.15), 0.999]
    policy = {"a.lora_A.default.weight": torch.ones(2)}
    old = {"a.lora_A.old.weight": torch.zeros(2)}
    update_old(policy, old, 0.25)  # 0.25 · 0 + 0.75 · 1
    assert torch.allclose(old["a.lora_A.old.weight"], torch.full((2,), 0.75))


def test_adapters_are_fp32_on_a_bf16_base_so_a_small_ema_step_moves_the_old_policy():
    """Tiny SD3 loaded in bf16: the trained adapter (add_lora) and the copies (add_adapter_copy: the "old" policy,
    the refreshed "ref") are fp32; the copies are frozen and equal to "default", which stays the one trained. An EMA
    step (decay 0.9) towards a policy 0.1 % away moves each weight by 1e-4 of itself, under half a bf16 ulp (2^-9 to
    2^-8 of it): it moves every fp32 old weight exactly as the fp32 lerp, and no weight of a bf16 copy (what peft
    made before). The fp32 old adapter runs on the bf16 base and gives bf16."""
    from diffalign.lora import adapter_mode, add_adapter_copy, add_lora
    from diffalign.models import load_family
    from diffalign.online.old_policy import OLD_ADAPTER

    sd3 = load_family(str(REPO / "assets/tiny/sd3"), dtype=torch.bfloat16)
    denoiser = sd3.denoiser
    trained = add_lora(denoiser, 4, 4, sd3.lora_target_modules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained:  # lora_B is 0 at init: give every weight a value an EMA step can scale
            p.copy_(torch.randn(p.shape, generator=g))
    old, ref = add_adapter_copy(denoiser, OLD_ADAPTER), add_adapter_copy(denoiser, "ref")
    policy = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    assert denoiser.dtype == torch.bfloat16 and denoiser.active_adapters() == ["default"]
    assert {id(p) for p in trained} == {id(p) for p in policy.values()} and all(".default." in n for n in policy)
    assert all(p.dtype == torch.float32 for p in trained)
    for name, copies in ((OLD_ADAPTER, old), ("ref", ref)):
        assert len(copies) == len(policy)
        for n, p in policy.items():
            c = copies[n.replace(".default.", f".{name}.")]
            assert c.dtype == torch.float32 and not c.requires_grad and torch.equal(c, p)

    before = {n: o.detach().clone() for n, o in old.items()}
    bf16 = {n: o.detach().to(torch.bfloat16) for n, o in old.items()}  # the old adapter in the base's dtype
    bf16_before = {n: o.clone() for n, o in bf16.items()}
    with torch.no_grad():
        for p in policy.values():
            p.mul_(1.001)
    update_old(policy, old, 0.9)
    update_old(policy, bf16, 0.9)
    for n, p in policy.items():
        o = n.replace(".default.", f".{OLD_ADAPTER}.")
        assert (old[o] != before[o]).all() and torch.equal(bf16[o], bf16_before[o])
        torch.testing.assert_close(old[o], before[o].lerp(p.detach(), 0.1), rtol=0, atol=0)

    h = sd3.resolution // sd3.vae_scale_factor
    xt = torch.randn(1, sd3.latent_channels, h, h, generator=g).to(torch.bfloat16)
    with torch.no_grad(), adapter_mode(denoiser, OLD_ADAPTER):
        out = sd3.denoise(xt, torch.tensor([500.0]), sd3.encode_prompts(["a red cat"]))
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert not any(p.requires_grad for p in old.values()) and all(p.requires_grad for p in policy.values())


# ---- the round loop ---------------------------------------------------------------------------------------------

TOY_NFT = [
    "objective.name=nft",
    "lora.rank=4",
    "lora.alpha=4",
    "sampling.prompts_per_round=2",
    "sampling.images_per_prompt=2",
    "sampling.shared_noise=false",
    "sampling.steps=2",
    "sampling.eta=0",
    "sampling.guidance=1.0",
    "train.steps_per_round=1",
    "train.batch_size=4",
    "reward.scorer=toy_aesthetic",
    "reward.monitor=[]",
    "online.rounds=2",
    "train.tensorboard=false",
    "eval.prompts=",
]


def _rows(out):
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]


def test_online_nft_on_the_toy_runs_resumes_and_keeps_the_old_adapter(tmp_path, monkeypatch):
    """Round 1 starts at LoRA init (old = θ: old_deviate 0); with d = min(0.001 step, 0.5) the old adapter moves
    almost all the way to θ after round 1; resume continues at round 2."""
    from diffalign.pipelines.online import run
    from safetensors.torch import load_file

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    run(None, [*TOY_NFT, "model.path=toy", f"train.output_dir={out}", "online.rounds=1"])
    row = _rows(out)[0]
    assert row["train/old_deviate"] == 0.0 and 0 <= row["train/optimality"] <= 1 and math.isfinite(row["train/loss"])
    run(None, [*TOY_NFT, "model.path=toy", f"train.output_dir={out}"], resume="latest")
    assert [r["round"] for r in _rows(out)] == [1, 2]
    state = load_file(out / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert any(".old." in k for k in state), "the old adapter is part of the resumable state"


def test_online_nft_on_tiny_sd3_flow_runs_one_round(tmp_path, monkeypatch):
    """A flow family: rounds sampled by the Euler ODE (the flow sampler at noise level 0), the loss on the flow target."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    args = [
        *TOY_NFT,
        f"model.path={REPO / 'assets' / 'tiny' / 'sd3'}",
        "model.resolution=0",
        f"sampling.prompts={prompts}",
    ]
    run(None, [*args, f"train.output_dir={out}", "online.rounds=1"])
    row = _rows(out)[0]
    assert math.isfinite(row["train/loss"]) and row["train/old_deviate"] == 0.0


def test_online_nft_rejects_groups_of_one_and_shared_noise(tmp_path, monkeypatch):
    from diffalign.pipelines.online import run

    from diffalign.errors import DiffalignError

    monkeypatch.chdir(REPO)
    with pytest.raises(DiffalignError, match="images_per_prompt must be >= 2"):
        run(None, [*TOY_NFT, "model.path=toy", "sampling.images_per_prompt=1", f"train.output_dir={tmp_path / 'a'}"])
    with pytest.raises(DiffalignError, match="shared_noise must be false"):
        run(None, [*TOY_NFT, "model.path=toy", "sampling.shared_noise=true", f"train.output_dir={tmp_path / 'b'}"])


# ---- learning checks on the toy world ---------------------------------------------------------------------------

needs_toy = pytest.mark.skipif(
    not (TOY_MODEL / "model_index.json").is_file() or not TOY_HELDOUT.is_file(),
    reason="assets/toy_model or the held-out prompts are not built yet",
)


@needs_toy
@pytest.mark.slow(minutes=2)
@pytest.mark.parametrize("config", ["toy_nft", "toy_flow_nft"], ids=["ddpm", "flow"])
@pytest.mark.parametrize("negate", [False, True], ids=["advantages", "negated"])
def test_toy_nft_moves_the_aesthetic_the_way_of_the_advantages(tmp_path, monkeypatch, negate, config):
    """configs/toy_nft.yaml (DDPM toy) and configs/toy_flow_nft.yaml (flow toy) raise the held-out toy aesthetic;
    with the advantages negated they lower it. One objective, both eras."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    # CI time: 3 rounds (2 negated) of the shipped 6; 16 prompts x 2 seeds: ddpm +0.15, flow +0.23, both 100% wins;
    # negated ddpm -0.11, flow -0.15, 3% and 0% wins
    extra = ["objective.negate_advantages=true", "online.rounds=2"] if negate else ["online.rounds=3"]
    out = run(
        str(REPO / "configs" / f"{config}.yaml"),
        [f"train.output_dir={tmp_path / 'run'}", "train.tensorboard=false", "guards.every=0", *extra],
    )
    report = json.loads((out / "summary.json").read_text())["eval"]["scorers"]
    delta = report["toy_aesthetic"]["mean_delta"]
    if negate:
        assert delta < 0 and report["toy_aesthetic"]["win_rate"] < 0.5
    else:
        assert delta > 0 and report["toy_aesthetic"]["win_rate"] >= 0.85
        assert report["toy_fidelity"]["mean_delta"] > -0.05
