"""The flow-matching SDE sampler (diffalign.sampling.flow_sde) on the tiny SD3 pipeline, and the sampler registry."""

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.models import load_family
from diffalign.sampling import DDIMSampler, build_sampler, initial_noise
from diffalign.sampling.flow_sde import FlowSDESampler, sample_flow, sde_step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny"
PROMPTS = ["a photo of a red cat", "a blue square"]


@pytest.fixture(scope="module")
def sd3():
    return load_family(str(TINY / "sd3"))


def test_noise_level_zero_reproduces_the_diffusers_pipeline(sd3):
    """a = 0: the flow sampler is diffusers' FlowMatchEulerDiscreteScheduler loop, CFG included; so is `sample_flow`,
    the generation path (toy flow family), which samples on this same grid."""
    seeds, steps, guidance = [1, 2], 5, 4.5
    ours = FlowSDESampler.for_family(sd3, steps, 0.0).sample(sd3, PROMPTS, seeds, guidance, keep_trajectory=False)
    h = sd3.resolution // sd3.vae_scale_factor
    x1 = initial_noise(seeds, (sd3.latent_channels, h, h))
    theirs = sd3.pipe(
        prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x1, output_type="latent"
    ).images
    assert theirs.abs().max() > 1  # a real sample, not zeros
    torch.testing.assert_close(ours.x0, theirs, rtol=1e-5, atol=1e-5)
    generated = sample_flow(sd3, PROMPTS, seeds, steps, guidance)
    torch.testing.assert_close(generated, theirs, rtol=1e-5, atol=1e-5)


def test_step_log_probs_match_a_direct_gaussian(sd3):
    """Each recorded log-prob = torch.distributions.Normal(mean, s sqrt(-dt)) of the step actually taken, mean over
    dims, with mean and s written out from Flow-GRPO's formula (its x (1 + s² dt / 2σ) + v (1 + s²(1-σ)/2σ) dt form)."""
    a, steps = 0.7, 4
    sampler = FlowSDESampler.for_family(sd3, steps, a)
    traj = sampler.sample(sd3, PROMPTS, [3, 4], 3.0, noise_seed=5, keep_predictions=True)
    assert traj.num_steps == steps - 1 and traj.log_probs.shape == (steps - 1, 2)  # last step deterministic
    sig = sampler.sigmas.tolist()
    for k in range(traj.num_steps):
        s, s_next = sig[k], sig[k + 1]
        dt = s_next - s
        std_t = a * math.sqrt(s / (1 - (sig[1] if s == 1 else s)))
        x, v = traj.latents[k], traj.predictions[k]
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        lp = torch.distributions.Normal(mean, std_t * math.sqrt(-dt)).log_prob(traj.latents[k + 1]).flatten(1).mean(1)
        torch.testing.assert_close(traj.log_probs[k], lp, rtol=1e-4, atol=1e-4)
        # the training kernel (stored x_t, x_t', t) gives the same number
        torch.testing.assert_close(
            sampler.log_prob(v, traj.timesteps[k], x, traj.latents[k + 1]), lp, rtol=1e-4, atol=1e-4
        )
    assert torch.equal(traj.final, traj.x0) and not torch.equal(traj.x0, traj.latents[-1])


def test_sde_step_std_by_hand_and_euler_at_noise_level_zero():
    """std = a sqrt(sigma / (1 - sigma)) sqrt(-dt) = 0.7 * 2 * 0.4472 = 0.6261; a = 0: std 0, mean = x + dt v."""
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mean, std = sde_step(x, v, 0.8, 0.6, 0.9, 0.7)
    expected = 0.7 * math.sqrt(0.8 / 0.2) * math.sqrt(0.2)
    assert math.isclose(float(std), expected, rel_tol=1e-6)
    mean0, std0 = sde_step(x, v, 0.8, 0.6, 0.9, 0.0)
    assert float(std0) == 0 and torch.equal(mean0, x + (torch.tensor(0.6) - torch.tensor(0.8)) * v)


def test_sde_window_noises_and_records_only_its_steps(sd3):
    """Window [1, 3) of 4 steps: the ODE before it (latents[0] = the a = 0 path's x at step 1), noise inside, only
    its two steps recorded; x0 still comes after the ODE steps that follow."""
    ode = FlowSDESampler.for_family(sd3, 4, 0.0, window=(0, 4)).sample(sd3, PROMPTS, [1, 2], 1.0)
    sde = FlowSDESampler.for_family(sd3, 4, 0.7, window=(1, 3))
    traj = sde.sample(sd3, PROMPTS, [1, 2], 1.0, noise_seed=0)
    assert traj.latents.shape[0] == 3 and traj.log_probs.shape == (2, 2)
    torch.testing.assert_close(traj.timesteps, sde.timesteps[1:3])
    torch.testing.assert_close(traj.latents[0], ode.latents[1])
    assert not torch.allclose(traj.x0, ode.x0)  # the noise inside the window changed the image
    assert sde.recorded_steps == 2


def test_registry_picks_the_family_sampler_and_refuses_the_wrong_one(sd3):
    assert isinstance(build_sampler(sd3, "", 3, 0.7), FlowSDESampler)
    sd15 = load_family(str(TINY / "sd15"))
    assert isinstance(build_sampler(sd15, "", 3, 1.0), DDIMSampler)
    with pytest.raises(DiffalignError, match="family 'sd3' .* has no 'ddim' sampler"):
        build_sampler(sd3, "ddim", 3, 1.0)
    assert build_sampler(sd15, "", 3, 1.0, [0, 2]).recorded_steps == 2  # DDIM takes a window too
    with pytest.raises(DiffalignError, match="sde_window"):
        build_sampler(sd3, "", 3, 0.7, [2, 5])


def test_online_sd3_asked_for_ddim_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """Formerly an AttributeError (eta > 0) or silent garbage (eta 0): now one line naming the family, exit code 2."""
    from diffalign.pipelines.cli import main

    monkeypatch.chdir(REPO)
    args = ["model.path=assets/tiny/sd3", "sampling.sampler=ddim", "online.rounds=1", f"train.output_dir={tmp_path}/r"]
    assert main(["online", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "family 'sd3'" in line]  # (loading progress bars aside)
    assert len(lines) == 1 and "no 'ddim' sampler" in lines[0] and "Traceback" not in err
    assert err.rstrip().endswith(lines[0].strip())


# ---- the other on-line methods on a flow family, through the flow sampler ----------------------------------------


@pytest.mark.parametrize(
    "objective,extra",
    [
        ("d3po", ["pairing.split=all_pairs", "sampling.guidance=2.0"]),
        ("dpo", ["pairing.split=best_worst", "sampling.guidance=2.0"]),  # DRAGON with the Diffusion-DPO surrogate
        ("dro", ["sampling.guidance=1.0", "online.max_experts=8"]),
    ],
    ids=["d3po", "dragon", "dro"],
)
def test_online_methods_run_a_round_on_sd3(tmp_path, monkeypatch, objective, extra):
    """At LoRA init the policy is the reference (and DRO's snapshot): D3PO ln 2, DRAGON-DPO ln 2, DRO the hinge's
    -m = 0.001 with a zero policy error (its target is the snapshot's own velocity at the stored step)."""
    import json

    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    args = ["model.path=assets/tiny/sd3", "lora.rank=4", "lora.alpha=4", f"objective.name={objective}"]
    args += ["sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=3", "sampling.eta=0.7"]
    args += ["train.steps_per_round=1", "train.batch_size=2", "reward.scorer=toy_aesthetic", "reward.monitor=[]"]
    args += ["online.rounds=1", "train.tensorboard=false", "eval.prompts=", f"sampling.prompts={prompts}"]
    out = tmp_path / "run"
    run(None, [*args, *extra, f"train.output_dir={out}"])
    row = json.loads((out / "rounds.jsonl").read_text())
    expected = {"d3po": math.log(2), "dpo": math.log(2), "dro": 0.001}[objective]
    assert math.isclose(row["train/loss"], expected, rel_tol=1e-4) and row["skipped_steps"] == 0
    if objective == "dro":
        assert row["train/err_policy"] < 1e-10  # 0 up to float rounding: the round's prompts are encoded once, in
        # a batch of distinct prompts, not in the sampler's chunks (a few 1e-15 with T5 on the CPU)


def test_random_sde_window_is_keyed_and_stays_in_its_range():
    """Flow-GRPO-Fast: start uniform on lo..hi - size; the same key draws the same window; every start is reachable;
    a window that does not fit is one line naming both settings."""
    from diffalign.engine.step import WINDOW_STREAM, keyed_generator
    from diffalign.sampling import random_window, window_range

    span = window_range(2, [1, 6], 10)
    starts = [random_window(2, span, keyed_generator(0, r, WINDOW_STREAM))[0] for r in range(200)]
    assert set(starts) == {1, 2, 3, 4}  # 1..6-2
    assert random_window(2, span, keyed_generator(0, 7, WINDOW_STREAM)) == (starts[7], starts[7] + 2)
    assert window_range(3, [], 10) == (0, 9)  # default: every step but the last
    with pytest.raises(DiffalignError, match=r"sde_window_size 4 in sampling.sde_window_range \[0, 3\]"):
        window_range(4, [0, 3], 10)


def test_online_random_sde_window_per_round_on_the_tiny_sd3(tmp_path, monkeypatch):
    """A GRPO run with sde_window_size 1 over 3 rounds logs each round's window start (keyed: a second run logs the
    same) and trains a finite loss every round."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    cfg = ["model.path=assets/tiny/sd3", "lora.rank=4", "lora.alpha=4", "objective.name=grpo", "online.rounds=3",
           "sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=4", "sampling.eta=0.7",
           "train.steps_per_round=1", "train.batch_size=4", "reward.monitor=[]", "train.tensorboard=false",
           "reward.scorer=toy_aesthetic", f"sampling.prompts={prompts}", "eval.prompts=",
           "sampling.sde_window_size=1", "sampling.sde_window_range=[0,3]"]  # fmt: skip
    logs = []
    for name in ("a", "b"):
        run(None, [*cfg, f"train.output_dir={tmp_path / name}"])
        rows = [json.loads(x) for x in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]
        logs.append([r["sde_window_start"] for r in rows])
        assert all(0 <= s <= 2 for s in logs[-1]) and all(math.isfinite(r["train/loss"]) for r in rows)
    assert logs[0] == logs[1]
