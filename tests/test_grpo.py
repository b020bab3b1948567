"""GRPO (diffalign/objectives/grpo.py): hand-computed losses, PPO clipping, gradient direction, and `diffalign online`
rounds on a flow family (tiny SD3, flow SDE sampler) and a DDPM family (tiny SD1.5, DDIM-eta): one objective, two
samplers. Slow: the toy learning check and its sign-flipped twin."""

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.objectives import OBJECTIVES
from diffalign.objectives.grpo import GRPO
from diffalign.paths import TOY_HELDOUT, TOY_MODEL

REPO = Path(__file__).resolve().parents[1]


def test_registered_with_paper_defaults():
    g = GRPO()
    assert OBJECTIVES["grpo"] is GRPO and GRPO.sources == ("policy_steps",)
    assert (g.clip_range, g.beta, g.adv_clip, g.global_std) == (1e-4, 0.04, 5.0, True)


def test_hand_computed_clipped_loss():
    """ε = 0.2, A = [1, -1], rho = [1.5, 0.5]: L = [max(-1.5, -1.2), max(0.5, 0.8)] = [-1.2, 0.8]; both clipped."""
    lp = torch.tensor([math.log(1.5), math.log(0.5)])
    loss, m = GRPO(clip_range=0.2, beta=0.0)(lp, torch.zeros(2), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(loss, torch.tensor([-1.2, 0.8]))
    assert m["clip_frac"].tolist() == [1.0, 1.0]
    # inside the trust region the ratio itself counts: rho = [1.1, 0.9] -> L = [-1.1, 0.9]
    loss, m = GRPO(clip_range=0.2, beta=0.0)(
        torch.log(torch.tensor([1.1, 0.9])), torch.zeros(2), torch.tensor([1.0, -1.0])
    )
    torch.testing.assert_close(loss, torch.tensor([-1.1, 0.9]))
    assert m["clip_frac"].tolist() == [0.0, 0.0]


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    lp = torch.tensor([-1.3, 0.2, 0.7])
    a = torch.tensor([0.5, -2.0, 1.0])
    loss, m = GRPO(beta=0.0)(lp, lp.clone(), a)
    assert m["ratio"].tolist() == [1.0, 1.0, 1.0]
    assert math.isclose(float(loss.mean()), -float(a.mean()), rel_tol=1e-6)


def test_kl_term_by_hand():
    """mean = [1, 3] vs ref [0, 0] over 2 dims, s = 0.5: KL = mean(1, 9) / (2 * 0.25) = 10; beta 0.04 adds 0.4."""
    mean, ref = torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)
    loss, m = GRPO(beta=0.04)(
        torch.zeros(1), torch.zeros(1), torch.zeros(1), mean=mean, ref_mean=ref, kl_std=torch.tensor(0.5)
    )
    torch.testing.assert_close(m["kl"], torch.tensor([10.0]))
    torch.testing.assert_close(loss, torch.tensor([0.4]))


def test_flow_kl_is_flow_grpos_line():
    """β means Flow-GRPO's β: GRPO's KL through grpo_inputs on the tiny SD3 (policy: LoRA with random B; reference:
    LoRA off) equals yifan123/flow_grpo scripts/train_sd3.py's line, written out below on the same velocities at
    every trained step (σ = 1 included), with std_dev_t and prev_sample_mean as its sde_step_with_logprob computes
    them. The step's own std, std_dev_t sqrt(-dt), would give 1/(-dt) times it (x7.0, x3.9, x1.7 on this 4-step
    grid)."""
    from diffalign.lora import add_lora, reference_mode
    from diffalign.models import load_family
    from diffalign.sampling import encode_guided, guided_prediction
    from diffalign.sampling.flow_sde import FlowSDESampler
    from diffalign.sources.policy_steps import grpo_inputs

    sd3 = load_family(str(REPO / "assets/tiny/sd3"))
    add_lora(sd3.denoiser, 4, 4, sd3.lora_target_modules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in sd3.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    noise_level, guidance, prompts = 0.7, 2.0, ["a photo of a cat", "red dog"]
    sampler = FlowSDESampler.for_family(sd3, 4, noise_level)
    traj = sampler.sample(sd3, prompts, [1, 2], guidance, noise_seed=3)
    cond = encode_guided(sd3, prompts, guidance)
    reference = lambda: reference_mode(sd3.denoiser)  # noqa: E731
    assert traj.num_steps == 3
    for j in range(traj.num_steps):
        timestep, sample = traj.timesteps[j], traj.latents[j]
        _, _, mean, ref_mean, s = grpo_inputs(sd3, sd3.denoise, sampler, traj, cond, torch.arange(2), j, reference)
        zeros = torch.zeros(2)
        _, metrics = GRPO(beta=0.04)(zeros, zeros, zeros, mean=mean, ref_mean=ref_mean, kl_std=s)
        with torch.no_grad():  # the official code, on the same velocities
            model_output = guided_prediction(sd3, sample, timestep, cond, guidance)
            with reference_mode(sd3.denoiser):
                model_output_ref = guided_prediction(sd3, sample, timestep, cond, guidance)
        i = sampler.index(timestep)
        sigma, sigma_prev, sigma_max = sampler.sigmas[i], sampler.sigmas[i + 1], sampler.sigmas[1].item()
        dt = sigma_prev - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        prev_sample_mean, prev_sample_mean_ref = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
            for v in (model_output, model_output_ref)
        )
        kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (
            2 * std_dev_t**2
        )
        assert kl_loss.min() > 0
        torch.testing.assert_close(metrics["kl"], kl_loss.flatten(), rtol=1e-3, atol=0)


def test_ddim_kl_is_the_exact_kl_of_the_steps():
    """On DDIM-eta (no official KL) the KL divides by the step's own std: the exact per-dimension KL of the policy's
    and the reference's step Gaussians (torch.distributions), at every step."""
    from diffalign.models import load_family
    from diffalign.sampling import build_sampler

    sampler = build_sampler(load_family(str(REPO / "assets/tiny/sd15"), load_encoders=False), "", 4, 1.0)
    g = torch.Generator().manual_seed(0)
    for t in sampler.scheduler.timesteps[:-1]:
        pred, xt, ref_mean = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        mean, std = sampler.mean_std(pred, t, xt)
        _, metrics = GRPO(beta=0.04)(*torch.zeros(3, 2), mean=mean, ref_mean=ref_mean, kl_std=sampler.kl_std(t))
        exact = torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, std), torch.distributions.Normal(ref_mean, std)
        )
        torch.testing.assert_close(metrics["kl"], exact.flatten(1).mean(1))


def test_one_image_per_prompt_is_normalised_over_the_round_as_flow_grpo():
    """G = 1: a group of one is its own mean (every A was 0, so only the KL trained, silently). Flow-GRPO then turns
    its per-prompt tracker off and normalises over the batch (scripts/train_sd3.py, numpy's population std), written
    out below: rewards [0.2, 0.9, 0.5] -> A = [-1.16, 1.28, -0.12]; then clipped to 5 like every advantage."""
    rewards = torch.tensor([[0.2], [0.9], [0.5]])  # (P, G = 1)
    r = rewards.flatten().numpy()
    advantages = (r - r.mean()) / (r.std() + 1e-4)
    for global_std in (True, False):
        got = GRPO(global_std=global_std).advantages(rewards)
        torch.testing.assert_close(got.flatten(), torch.as_tensor(advantages, dtype=torch.float32))
    assert [round(a, 2) for a in advantages.tolist()] == [-1.16, 1.28, -0.12]
    assert GRPO(adv_clip=1.0).advantages(rewards).abs().max() == 1.0


def test_zero_advantage_chains_are_dropped_as_flow_grpo_unless_asked_to_keep():
    """Flow-GRPO trains only on samples whose advantage is not 0 (train_sd3.py's mask): group 0 scores alike (all 0),
    in group 1 the middle reward is its group's mean (A = 0); so of chains 0..5 only 3 and 5 remain by default."""
    from diffalign.config import OnlineConfig, PairingConfig, SamplingConfig
    from diffalign.sources import SOURCES

    rows = SOURCES["policy_steps"]().rows
    rewards = torch.tensor([[0.7, 0.7, 0.7], [0.0, 0.5, 1.0]])  # (P, G)
    cfg = OnlineConfig(sampling=SamplingConfig(images_per_prompt=3))
    first, second = rows(rewards, cfg, None, 0, torch.zeros(6))
    assert first.tolist() == [3, 5] and second is rewards
    assert GRPO().advantages(rewards).flatten()[first].abs().min() > 0
    keep = OnlineConfig(
        sampling=SamplingConfig(images_per_prompt=3), pairing=PairingConfig(drop_zero_advantages=False)
    )
    first, _ = rows(rewards, keep, None, 0, torch.zeros(6))
    assert first.tolist() == [0, 1, 2, 3, 4, 5]


def test_gradient_raises_logp_of_positive_advantage_and_stops_when_clipped():
    """d L / d logp = -A rho inside the trust region (descent raises logp where A > 0, lowers it where A < 0), and 0
    once the ratio left the region on the advantage's side."""
    lp = torch.zeros(2, requires_grad=True)
    loss, _ = GRPO(clip_range=0.2, beta=0.0)(lp, torch.zeros(2), torch.tensor([2.0, -1.0]))
    loss.sum().backward()
    assert lp.grad.tolist() == [-2.0, 1.0]
    lp = torch.tensor([math.log(1.5), math.log(0.5)], requires_grad=True)
    loss, _ = GRPO(clip_range=0.2, beta=0.0)(lp, torch.zeros(2), torch.tensor([2.0, -1.0]))
    loss.sum().backward()
    assert lp.grad.tolist() == [0.0, 0.0]


# ---- `diffalign online` rounds on both eras --------------------------------------------------------------------

TINY = [
    "lora.rank=4",
    "lora.alpha=4",
    "objective.name=grpo",
    "sampling.prompts_per_round=2",
    "sampling.images_per_prompt=3",
    "sampling.shared_noise=false",
    "sampling.steps=3",
    "sampling.guidance=2.0",
    "train.steps_per_round=2",
    "train.batch_size=4",
    "reward.scorer=toy_aesthetic",
    "reward.monitor=[]",
    "online.rounds=1",
    "train.tensorboard=false",
    "eval.prompts=",
]


@pytest.mark.parametrize("model,eta", [("sd3", 0.7), ("sd15", 1.0)])
def test_online_grpo_round_first_step_is_on_policy(tmp_path, monkeypatch, model, eta):
    """One round: the first optimizer step is on-policy (ratio 1 up to float rounding, loss = -mean A of its rows,
    KL 0 at LoRA init); the second, after an update, is not."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\nblue bird\n")
    out = tmp_path / "run"
    cfg = [*TINY, f"model.path=assets/tiny/{model}", f"sampling.eta={eta}", f"sampling.prompts={prompts}"]
    run(None, [*cfg, "train.steps_per_round=1", "train.lr=1e-2", f"train.output_dir={out}"])
    row = json.loads((out / "rounds.jsonl").read_text())
    assert abs(row["train/ratio"] - 1) < 1e-5 and row["train/kl"] == 0
    assert math.isclose(row["train/loss"], -row["train/advantage"], abs_tol=1e-5)
    assert row["skipped_steps"] == 0 and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


# ---- learning checks on the toy world (slow) --------------------------------------------------------------------

needs_toy = pytest.mark.skipif(
    not (TOY_MODEL / "model_index.json").is_file() or not TOY_HELDOUT.is_file(),
    reason="assets/toy_model or the held-out prompts are not built yet",
)
NEGATED = ["reward.scorer=multi", "reward.args={components: {toy_aesthetic: {weight: -1.0}}, normalize: none}"]


@needs_toy
@pytest.mark.slow(minutes=3)
@pytest.mark.parametrize("negate", [False, True], ids=["reward", "negated_reward"])
def test_toy_grpo_moves_aesthetic_the_rewarded_way(tmp_path, monkeypatch, negate):
    """configs/toy_grpo.yaml (DDIM-eta steps on the DDPM toy), cut to 3 rounds (CI time), raises toy_aesthetic on
    held-out prompts; trained on -toy_aesthetic for 1 round it lowers it (fails if the advantage or ratio sign were
    flipped anywhere). Halving the round instead (8 prompts, batch 16) does not learn: -0.19 after 4 rounds."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    extra = [*NEGATED, "online.rounds=1"] if negate else ["online.rounds=3"]  # CI time: the negated one is fast
    out = run(
        str(REPO / "configs/toy_grpo.yaml"),
        [*extra, "eval.images_per_prompt=2", f"train.output_dir={tmp_path / 'run'}",
         "train.tensorboard=false", "guards.every=0"],  # the method's learning check, not the drift guard's
    )  # fmt: skip
    report = json.loads((out / "summary.json").read_text())["eval"]["scorers"]
    delta, wins = report["toy_aesthetic"]["mean_delta"], report["toy_aesthetic"]["win_rate"]
    if negate:  # 1 round (16 prompts x 2 seeds): -0.84, 0% wins (2 rounds: -1.47, 0%)
        assert delta < 0 and wins < 0.5
    else:  # 3 rounds (16 x 2): +0.47, 81.2% wins (2 rounds: +0.21, 62.5%); curve (16 x 4) after round 4: +0.81, 90.6%
        assert delta > 0.2 and wins >= 0.75
        assert report["toy_fidelity"]["mean_delta"] > -0.05  # no reward hacking beyond 5 points of fidelity


@pytest.mark.skipif(not (REPO / "assets/toy_flow_model/model_index.json").is_file(), reason="no flow toy model")
@pytest.mark.slow(minutes=6)
def test_toy_flow_grpo_beats_the_base(tmp_path, monkeypatch):
    """configs/toy_flow_grpo.yaml (Flow-GRPO's SDE on the flow toy), cut to 3 rounds (CI time): a held-out win rate
    the base cannot have (it ties itself: 50%; 70% of 32 same-seed pairs has p < 0.02 under it) and no reward
    hacking. Halving the round instead (8 prompts, batch 16) does not learn: -0.47 after 8 rounds."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    out = run(
        str(REPO / "configs/toy_flow_grpo.yaml"),
        ["online.rounds=3", "eval.images_per_prompt=2", f"train.output_dir={tmp_path / 'run'}",
         "train.tensorboard=false", "guards.every=0"],  # the method's learning check, not the drift guard's
    )  # fmt: skip
    report = json.loads((out / "summary.json").read_text())["eval"]["scorers"]
    # 3 rounds (16 prompts x 2 seeds): +0.22, 81% wins (4 rounds: the same); held-out curve (16 x 4): 72-77% wins
    # over rounds 2-6, 93.8% (+0.70) after round 8; 12 rounds (8 seeds): +1.07, 96.9% wins, fidelity -0.4 points
    assert report["toy_aesthetic"]["win_rate"] >= 0.7 and report["toy_aesthetic"]["mean_delta"] > 0.1
    assert report["toy_fidelity"]["mean_delta"] > -0.05  # no reward hacking beyond 5 points of fidelity
