"""The on-line options the field now takes for granted (issue 31): CPS, MixGRPO's sliding SDE window, CFG-free
rounds. Each against the official expression written out here, on the same tensors, and through `diffalign online`
on the tiny SD3."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.models import load_family
from diffalign.sampling import build_sampler, sliding_window, window_range
from diffalign.sampling.flow_sde import FlowCPSSampler, cps_step

REPO = Path(__file__).resolve().parents[1]
TINY_SD3 = REPO / "assets" / "tiny" / "sd3"


# ---- CPS ----------------------------------------------------------------------------------------------------------


def official_cps(sample, model_output, sigma, sigma_prev, noise_level, variance_noise):
    """yifan123/flow_grpo flow_grpo/diffusers_patch/sd3_sde_with_logprob.py `sde_step_with_logprob`, the
    sde_type == 'cps' branch (commit 54809b5), transcribed: sigma_prev is the next (smaller) sigma."""
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)  # sigma_t in paper
    pred_original_sample = sample - sigma * model_output  # predicted x_0 in paper
    noise_estimate = sample + model_output * (1 - sigma)  # predicted x_1 in paper
    prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
        sigma_prev**2 - std_dev_t**2
    )
    prev_sample = prev_sample_mean + std_dev_t * variance_noise
    log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)  # remove all constants
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def test_cps_step_is_flow_grpos_cps_branch():
    """On the same x, v, sigma = 0.8 -> sigma' = 0.6, a = 0.8 and noise: s = 0.6 sin(0.4 pi) = 0.57063; mean, s,
    the drawn x' and the log-prob -mean((x' - mean)²) equal the official branch; a = 0 is the Euler step
    x + (sigma' - sigma) v (sqrt(sigma'²) = sigma', so (1 - sigma') (x - sigma v) + sigma' (x + (1 - sigma) v) =
    x + (sigma' - sigma) v); the KL's s is the official std_dev_t."""
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    sigma, sigma_next, a = torch.tensor(0.8), torch.tensor(0.6), 0.8
    mean, std = cps_step(x, v, sigma, sigma_next, a)
    x_next, lp, mean_ref, std_ref = official_cps(x, v, sigma, sigma_next, a, noise)
    assert math.isclose(float(std), 0.6 * math.sin(0.4 * math.pi), rel_tol=1e-6) and math.isclose(
        float(std), float(std_ref), rel_tol=1e-6
    )
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(mean + std * noise, x_next)
    sampler = FlowCPSSampler(torch.tensor([1.0, 0.8, 0.6, 0.0]), torch.tensor([1000.0, 800.0, 600.0]), a)
    torch.testing.assert_close(sampler.density(x_next, mean, std), lp)
    torch.testing.assert_close(sampler.log_prob(v, torch.tensor(800.0), x, x_next), lp)  # step 1: 0.8 -> 0.6
    assert math.isclose(float(sampler.kl_std(torch.tensor(800.0))), float(std_ref), rel_tol=1e-6)
    euler, s0 = cps_step(x, v, sigma, sigma_next, 0.0)
    torch.testing.assert_close(euler, x + (sigma_next - sigma) * v)
    assert float(s0) == 0.0


def test_cps_sampler_is_chosen_by_name_and_matches_sde_at_noise_zero():
    """`sampling.sampler=flow_cps` builds the CPS sampler on a flow family; at a = 0 it draws the same ODE
    trajectory as flow_sde (both are Euler then)."""
    sd3 = load_family(str(TINY_SD3))
    cps = build_sampler(sd3, "flow_cps", 3, 0.0)
    assert isinstance(cps, FlowCPSSampler)
    sde = build_sampler(sd3, "flow_sde", 3, 0.0)
    a = cps.sample(sd3, ["a red cat"], [1], 1.0, keep_trajectory=False).x0
    b = sde.sample(sd3, ["a red cat"], [1], 1.0, keep_trajectory=False).x0
    torch.testing.assert_close(a, b)


# ---- MixGRPO's sliding window -----------------------------------------------------------------------------------


def official_progressive(iters_per_group, group_size, max_timesteps, prog_overlap_step, iterations, init=0):
    """Tencent-Hunyuan/MixGRPO fastvideo/utils/grpo_states.py `GRPOTrainingStates` (commit e5cdd6a), transcribed
    for sample_strategy "progressive", prog_overlap=True, roll_back=True (scripts/finetune/
    finetune_flux_grpo_MixGRPO.sh): train_grpo_flux.py takes get_current_timesteps() then update_iteration()."""
    cur_timestep, cur_iter_in_group, windows = init, 0, []
    for _ in range(iterations):
        windows.append(list(range(cur_timestep, min(cur_timestep + group_size, max_timesteps))))
        cur_iter_in_group += 1
        if cur_iter_in_group >= iters_per_group:
            cur_iter_in_group = 0
            cur_timestep += prog_overlap_step
        if cur_timestep > max_timesteps:
            cur_timestep, cur_iter_in_group = init, 0  # roll_back_start
    return windows


@pytest.mark.parametrize(
    "size,every,stride,steps,lo",
    [(4, 25, 1, 25, 0), (4, 3, 2, 25, 0), (2, 1, 3, 10, 1), (1, 2, 1, 4, 0)],
    ids=["mixgrpo", "stride2", "from1", "tiny"],
)
def test_sliding_window_is_mixgrpos_progressive_schedule(size, every, stride, steps, lo):
    """Round r's window equals theirs at iteration r for 1500 iterations (MixGRPO's recipe: size 4, every 25,
    stride 1, max_timesteps = 25 - 2 = 23: windows [0,4) x 25, [1,5) x 25, ..., [20,23), ..., [23,23) (empty), then
    [0,4) again at iteration 24 * 25 = 600)."""
    hi = steps - 2
    ours = [list(range(*sliding_window(r, size, every, stride, (lo, hi)))) for r in range(1500)]
    assert ours == official_progressive(every, size, hi, stride, 1500, init=lo)
    if (size, every, stride, steps) == (4, 25, 1, 25):
        assert ours[0] == [0, 1, 2, 3] and ours[25] == [1, 2, 3, 4] and ours[575] == [] and ours[600] == [0, 1, 2, 3]
    assert window_range(size, [lo, hi], steps) == (lo, hi)  # the span the pipeline checks


def online_args(tmp_path, objective, extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    args = ["model.path=assets/tiny/sd3", "lora.rank=4", "lora.alpha=4", f"objective.name={objective}"]
    args += ["sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=4", "sampling.eta=0.7"]
    args += ["train.steps_per_round=1", "train.batch_size=4", "reward.scorer=toy_aesthetic", "reward.monitor=[]"]
    args += ["train.tensorboard=false", "eval.prompts=", f"sampling.prompts={prompts}"]
    return [*args, *extra]


def test_online_sliding_window_over_rounds_on_the_tiny_sd3(tmp_path, monkeypatch):
    """GRPO, window size 1 sliding 1 step every round in [0, 1] (4 steps): starts 0, 1, 0; round 2's window
    [1, 1) is empty, as MixGRPO's last position, so it samples the ODE and trains nothing (no loss logged). A run
    stopped after round 2 and resumed takes the same windows and ends with the same LoRA."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    extra = ["sampling.sde_window_size=1", "sampling.sde_window_range=[0,1]", "sampling.sde_window_shift_every=1"]
    out = tmp_path / "run"
    run(None, [*online_args(tmp_path, "grpo", extra), "online.rounds=3", f"train.output_dir={out}"])
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["sde_window_start"] for r in rows] == [0, 1, 0]
    assert math.isfinite(rows[0]["train/loss"]) and math.isfinite(rows[2]["train/loss"])
    assert "train/loss" not in rows[1] and rows[1]["skipped_steps"] == 0
    resumed = tmp_path / "resumed"  # the window is a function of the round: 2 rounds + --resume == 3 rounds
    run(None, [*online_args(tmp_path, "grpo", extra), "online.rounds=2", f"train.output_dir={resumed}"])
    run(
        None,
        [*online_args(tmp_path, "grpo", extra), "online.rounds=3", f"train.output_dir={resumed}"],
        resume="latest",
    )
    again = [json.loads(x) for x in (resumed / "rounds.jsonl").read_text().splitlines()]
    assert [r["sde_window_start"] for r in again] == [0, 1, 0] and again[2]["train/loss"] == rows[2]["train/loss"]
    lora = "lora/pytorch_lora_weights.safetensors"
    a, b = load_file(str(out / lora)), load_file(str(resumed / lora))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- CFG-free rounds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective,extra",
    [
        ("grpo", ["sampling.sampler=flow_cps", "sampling.eta=0.8", "objective.beta=0.04"]),  # CPS, with the KL
        ("d3po", ["pairing.split=all_pairs"]),
        ("nft", []),
    ],
    ids=["grpo_cps", "d3po", "nft"],
)
def test_cfg_free_round_has_no_unconditional_forward(tmp_path, monkeypatch, objective, extra):
    """sampling.guidance=1 is a CFG-free round for every source: the transformer only ever sees the round's 4
    chains (2 prompts x 2 images; train.batch_size 4), never the 8 rows of a [cond; uncond] batch, in sampling,
    the policy's, the reference's or the old policy's forward; the round trains a finite loss."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    rows = []

    def hook(module, args, output):
        if type(module).__name__ == "SD3Transformer2DModel":
            rows.append(output[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        out = tmp_path / "run"
        run(None, [*online_args(tmp_path, objective, ["sampling.guidance=1.0", *extra]), f"train.output_dir={out}",
                   "online.rounds=1"])  # fmt: skip
    finally:
        handle.remove()
    row = json.loads((out / "rounds.jsonl").read_text())
    assert rows and set(rows) <= {2, 4}, rows  # 8 would be a CFG batch
    assert math.isfinite(row["train/loss"]) and row["skipped_steps"] == 0
