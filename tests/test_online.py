"""On-line alignment: D3PO maths by hand and by invariant, pair / split rules, the round loop on tiny components,
and (slow, once assets/toy_model exists) learning checks on the toy world."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from diffalign.likelihood import Schedule, denoising_errors
from diffalign.lora import add_lora, reference_mode
from diffalign.models import load_family
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.d3po import D3PO, clipped_log_ratio
from diffalign.objectives.kto import DiffusionKTO
from diffalign.online.exemplars import ToyStatsEncoder, toy_vivid_exemplars
from diffalign.online.pairing import all_pairs, best_worst, pairs_from_labels, top_bottom
from diffalign.paths import TOY_HELDOUT, TOY_MODEL
from diffalign.rewards import load_scorer
from diffalign.sampling import DDIMSampler, encode_guided, inference_scheduler, sample_trajectories
from diffalign.sources.trajectory import d3po_inputs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny"


# ---- D3PO maths -------------------------------------------------------------------------------------------------


def test_d3po_registered_with_paper_defaults():
    assert OBJECTIVES["d3po"] is D3PO
    assert (D3PO().beta, D3PO().clip) == (0.1, 0.1) and D3PO.needs_reference and D3PO.paired


def test_d3po_hand_computed():
    """β = 1, logp = [0.05, −0.2], ref = [0, 0]: log r_w = 0.05 (inside the clamp), r_l = e^−0.2 = 0.8187 -> 0.9,
    log r_l = −0.105361; inside = 0.155361; loss = log(1 + e^−0.155361) = 0.618481."""
    loss, m = D3PO(beta=1.0)(torch.tensor([0.05, -0.2]), torch.zeros(2), torch.ones(1))
    assert math.isclose(loss.item(), 0.618481, abs_tol=1e-6)
    assert math.isclose(m["reward_margin"].item(), 0.155361, abs_tol=1e-6)
    assert m["clip_frac"].item() == 0.5  # the loser's ratio was clipped
    torch.testing.assert_close(
        clipped_log_ratio(torch.tensor([1.0, -1.0, 0.01]), torch.zeros(3), 0.1),
        torch.tensor([math.log(1.1), math.log(0.9), 0.01]),
    )


def test_d3po_ln2_at_init_swap_and_gradient_direction():
    lp = torch.tensor([-1.3, -0.7], requires_grad=True)
    loss, _ = D3PO()(lp, lp.detach().clone(), torch.ones(1))  # policy == reference (LoRA init)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    loss.sum().backward()
    assert lp.grad[0] < 0 < lp.grad[1]  # descending raises the winner's log-prob, lowers the loser's
    a, b = torch.tensor([0.02, -0.03]), torch.zeros(2)
    _, m = D3PO()(a, b, torch.ones(1))
    _, m_swapped = D3PO()(a.flip(0), b, torch.ones(1))
    _, m_label = D3PO()(a, b, torch.zeros(1))
    assert math.isclose(m["reward_margin"].item(), -m_swapped["reward_margin"].item(), rel_tol=1e-6)
    assert math.isclose(m_swapped["reward_margin"].item(), m_label["reward_margin"].item(), rel_tol=1e-6)
    far = torch.tensor([0.5, -0.5], requires_grad=True)  # both ratios outside [0.9, 1.1]: no gradient
    D3PO()(far, torch.zeros(2), torch.ones(1))[0].sum().backward()
    assert torch.equal(far.grad, torch.zeros(2))


# ---- pair and split rules ---------------------------------------------------------------------------------------


def test_pair_rules():
    r = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.05]])  # (P=2, G=3)
    iw, il = all_pairs(r, min_gap=0.1)
    assert sorted(zip(iw.tolist(), il.tolist())) == [(1, 0), (1, 2), (2, 0)]  # group 1: all gaps <= 0.1 -> ties
    iw, il = best_worst(r)
    assert iw.tolist() == [1, 5] and il.tolist() == [0, 3]
    iw, il = best_worst(r, min_gap=0.1)
    assert iw.tolist() == [1] and il.tolist() == [0]


def test_top_bottom_is_relative_to_the_group():
    r = torch.tensor([[10.0, 11.0], [0.0, 2.0], [5.0, 5.0]])  # advantages: [-.5, .5], [-1, 1], [0, 0]
    idx, desirable = top_bottom(r, fraction=2 / 6)
    assert dict(zip(idx.tolist(), desirable.tolist())) == {3: True, 1: True, 2: False, 0: False}
    idx, _ = top_bottom(torch.ones(2, 2), fraction=0.5)
    assert len(idx) == 0  # nothing to learn from a flat round


def test_human_labels_skip_ties():
    labels = [
        {"round": 0, "prompt": 1, "a": 0, "b": 2, "choice": "b"},
        {"round": 0, "prompt": 0, "a": 1, "b": 0, "choice": "tie"},
        {"round": 1, "prompt": 0, "a": 0, "b": 1, "choice": "a"},
    ]
    iw, il = pairs_from_labels(labels, round_index=0, group_size=3)
    assert iw.tolist() == [5] and il.tolist() == [3]
    with pytest.raises(ValueError, match="choice"):
        pairs_from_labels([{"round": 0, "prompt": 0, "a": 0, "b": 1, "choice": "left"}], 0, 2)


def test_fd_exemplar_reward_with_the_toy_encoder():
    """Vivid exemplars: in a batch of one vivid and three dull squares, the vivid one brings the set's FD down most."""
    scorer = load_scorer("fd_exemplar", exemplars=toy_vivid_exemplars(64, seed=0), encoder=ToyStatsEncoder())
    images = torch.full((4, 3, 32, 32), 0.9)  # grey background
    images[:, :, 10:20, 10:20] = torch.tensor([0.6, 0.45, 0.45])[:, None, None]  # dull red squares
    images[0, :, 10:20, 10:20] = torch.tensor([0.95, 0.05, 0.05])[:, None, None]  # one vivid red square
    scores = scorer(images)
    assert scores[0] > scores[1:].max()


# ---- library wiring on the tiny SD1.5 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_round():
    family = load_family(str(TINY / "sd15"))
    torch.manual_seed(0)
    params = add_lora(family.denoiser, 4, 4, family.lora_target_modules)
    prompts = ["a photo of a cat"] * 4 + ["red dog"] * 4  # P = 2 groups of G = 4, shared x_T per group
    traj = sample_trajectories(family, prompts, [1] * 4 + [2] * 4, steps=3, guidance=3.0, eta=1.0, noise_seed=0)
    return family, params, prompts, traj


def d3po_loss(family, obj, scheduler, traj, prompts, iw, il, k, reference):
    cond = encode_guided(family, [prompts[i] for i in torch.cat([iw, il]).tolist()], traj.guidance)
    lp, ref_lp, _ = d3po_inputs(family, family.denoise, DDIMSampler(scheduler, 1.0), traj, cond, iw, il, k, reference)
    return obj(lp, ref_lp, torch.ones(len(iw)))


def test_d3po_loss_is_ln2_at_lora_init_on_real_trajectories(tiny_round):
    family, _, prompts, traj = tiny_round
    scheduler = inference_scheduler(family, 1.0)
    scheduler.set_timesteps(3)
    iw, il = all_pairs(torch.tensor([[4.0, 3, 2, 1], [1.0, 2, 3, 4]]))
    loss, m = d3po_loss(family, D3PO(), scheduler, traj, prompts, iw, il, 1, lambda: reference_mode(family.denoiser))
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))
    assert m["log_ratio_w"].abs().max() == 0


def test_d3po_training_raises_winner_log_prob_ratio(tiny_round):
    """Fails if the loss sign is flipped: a few steps on fixed pairs make the recomputed margin positive."""
    family, params, prompts, traj = tiny_round
    start = {id(p): p.detach().clone() for p in params}
    scheduler = inference_scheduler(family, 1.0)
    scheduler.set_timesteps(3)
    iw, il = best_worst(torch.tensor([[4.0, 3, 2, 1], [1.0, 2, 3, 4]]))
    ref = lambda: reference_mode(family.denoiser)  # noqa: E731
    opt = torch.optim.Adam(params, lr=1e-3)
    obj = D3PO(beta=1.0, clip=1e9)  # no trust region: let the margin move freely
    for _ in range(5):
        for k in range(3):
            loss, _ = d3po_loss(family, obj, scheduler, traj, prompts, iw, il, k, ref)
            loss.mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # the log-prob ratios themselves, independent of how the loss combines them
        metrics = [d3po_loss(family, obj, scheduler, traj, prompts, iw, il, k, ref)[1] for k in range(3)]
    gap = torch.cat([m["log_ratio_w"] - m["log_ratio_l"] for m in metrics])  # log(p_w/ref_w) - log(p_l/ref_l)
    assert gap.mean() > 0 and (gap > 0).float().mean() > 0.5
    with torch.no_grad():
        for p in params:
            p.copy_(start[id(p)])


def test_dragon_kto_surrogate_runs_unpaired(tiny_round):
    family, _, prompts, traj = tiny_round
    idx, desirable = top_bottom(torch.arange(8.0).view(2, 4), 0.25)
    x0, gen = traj.x0[idx], torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, 1000, (len(idx),), generator=gen), torch.randn(x0.shape, generator=gen)
    cond = family.encode_prompts([prompts[i] for i in idx.tolist()])
    schedule = Schedule(family.scheduler, family.prediction_type)
    errors = denoising_errors(family.denoise, schedule, x0, cond, t, eps, lambda: reference_mode(family.denoiser))
    loss, m = DiffusionKTO(beta=10.0)(errors.err, errors.ref_err, None, desirable=desirable)
    assert loss.shape == (len(idx),) and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.full_like(loss, 0.5))  # policy == reference at init: 1 - sigma(0)


# ---- the loop end to end on the tiny SD1.5 ----------------------------------------------------------------------

TINY_ONLINE = [
    "model.path=assets/tiny/sd15",
    "lora.rank=4",
    "lora.alpha=4",
    "sampling.prompts_per_round=2",
    "sampling.images_per_prompt=2",
    "sampling.steps=2",
    "sampling.guidance=2.0",
    "train.steps_per_round=1",
    "train.batch_size=2",
    "reward.scorer=toy_aesthetic",
    "reward.monitor=[]",
    "online.rounds=2",
    "eval.prompts=",
]


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a cat\nred dog\nblue bird\n")
    return f"sampling.prompts={path}"


@pytest.mark.parametrize("objective,split", [("d3po", "all_pairs"), ("dpo", "best_worst"), ("kto", "top_bottom")])
def test_online_loop_runs_and_resumes(tmp_path, monkeypatch, objective, split):
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    extra = [f"objective.name={objective}", f"pairing.split={split}", _prompts_file(tmp_path)]
    if objective == "kto":
        extra.append("objective.beta=100")
    if objective == "d3po":
        extra.append("online.ref_refresh=1")  # exercises the "ref" adapter copy
    out = tmp_path / "run"
    run(None, [*TINY_ONLINE, *extra, f"train.output_dir={out}", "online.rounds=1"])
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and (out / "rounds" / "round-0001.png").is_file()
    run(None, [*TINY_ONLINE, *extra, f"train.output_dir={out}"], resume="latest")  # rounds=2: one more
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_online_dro_with_parquet_winners_as_experts(tmp_path, monkeypatch):
    """Diffusion-DRO: experts = winners of a preference parquet, negatives = the round's policy samples."""
    from data_factory import make_rows, write_parquet
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    experts = write_parquet(tmp_path / "prefs.parquet", make_rows(6))
    out = tmp_path / "run"
    cfg = [*TINY_ONLINE, "objective.name=dro", "sampling.guidance=1.0", f"online.experts={experts}"]
    run(None, [*cfg, _prompts_file(tmp_path), f"train.output_dir={out}", "online.rounds=1"])
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isclose(row["train/loss"], 0.001, rel_tol=1e-3)  # policy == reference at init: hinge = -m
    with pytest.raises(Exception, match="guidance must be <= 1"):
        run(None, [*cfg, "sampling.guidance=3.0", f"train.output_dir={tmp_path / 'y'}"])


def _drift(run_dir: Path) -> float:
    """Mean squared difference of the tiny SD1.5's predictions with the run's LoRA and without, at fixed inputs."""
    from diffalign.lora import load_lora

    family = load_family(str(TINY / "sd15"))
    load_lora(family, run_dir / "lora")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, family.denoiser.config.in_channels, 8, 8), generator=gen)
    t = torch.tensor([100, 400, 700, 900])
    cond = family.encode_prompts(["a photo of a cat", "red dog", "blue bird", "a photo of a cat"])
    with torch.no_grad():
        pred = family.denoise(x, t, cond)
        with reference_mode(family.denoiser):
            ref = family.denoise(x, t, cond)
    return float((pred - ref).pow(2).mean())


@pytest.mark.parametrize(
    "objective,extra",
    [("d3po", ["pairing.split=all_pairs"]), ("dpo", ["pairing.split=best_worst"]),
     ("kto", ["pairing.split=top_bottom", "objective.beta=100"]), ("dro", ["sampling.guidance=1.0"])],
)  # fmt: skip
def test_online_kl_weight_is_logged_and_holds_the_policy_near_the_reference(tmp_path, monkeypatch, objective, extra):
    """online.kl_weight (D3PO: the sampled step's closed-form KL; DRAGON-DPO / -KTO and DRO: the squared prediction
    difference) is logged as train/kl, is 0 on the first step (LoRA init) and positive after updates, and a large
    weight keeps the policy's predictions nearer the reference's than the same run without it (fails if the KL's gradient is lost or
    its sign is flipped)."""
    from data_factory import make_rows, write_parquet
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    if objective == "dro":
        extra = [*extra, f"online.experts={write_parquet(tmp_path / 'prefs.parquet', make_rows(6))}"]
    cfg = [*TINY_ONLINE, f"objective.name={objective}", *extra, _prompts_file(tmp_path), "online.rounds=1",
           "train.steps_per_round=8", "train.lr=3e-2"]  # fmt: skip
    run(None, [*cfg, "train.steps_per_round=1", "online.kl_weight=1.0", f"train.output_dir={tmp_path / 'first'}"])
    first = json.loads((tmp_path / "first" / "rounds.jsonl").read_text())
    assert first["train/kl"] == 0.0  # policy == reference at LoRA init
    drift = {}
    for weight in (0.0, 1e4):
        out = tmp_path / f"w{weight}"
        run(None, [*cfg, f"online.kl_weight={weight}", f"train.output_dir={out}"])
        row = json.loads((out / "rounds.jsonl").read_text())
        assert ("train/kl" in row) == (weight > 0)
        if weight > 0:
            assert row["train/kl"] > 0
        drift[weight] = _drift(out)
    assert 0 < drift[1e4] < 0.5 * drift[0.0]


@pytest.mark.parametrize("objective,own", [("grpo", "beta"), ("nft", "kl_weight")])
def test_online_kl_weight_is_refused_where_the_objective_has_its_own(tmp_path, monkeypatch, capsys, objective, own):
    from diffalign.pipelines.cli import main

    monkeypatch.chdir(REPO)
    rc = main(["online", *TINY_ONLINE, f"objective.name={objective}", "online.kl_weight=0.1",
               f"train.output_dir={tmp_path / 'x'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"online.kl_weight: objective '{objective}' has a KL term of its own (objective.{own})" in err[0]


def test_online_rejects_offline_only_objectives(tmp_path):
    from diffalign.pipelines.online import run

    from diffalign.errors import DiffalignError

    with pytest.raises(DiffalignError, match="cannot train on-line"):
        run(None, [*TINY_ONLINE, "objective.name=smpo", f"train.output_dir={tmp_path / 'x'}"])


# ---- learning checks on the toy world ---------------------------------------------------------------------------

needs_toy = pytest.mark.skipif(
    not (TOY_MODEL / "model_index.json").is_file() or not TOY_HELDOUT.is_file(),
    reason="assets/toy_model or the held-out prompts are not built yet",
)


def yaml_load(path):
    return yaml.safe_load(path.read_text())


ONLINE_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "online" in (yaml_load(p) or {}))


@pytest.mark.parametrize("path", ONLINE_CONFIGS, ids=lambda p: p.stem)
def test_online_config_loads_and_fits_its_objective(path):
    from diffalign.config import OnlineConfig, load_config
    from diffalign.engine.common import build_objective
    from diffalign.sources import source_of

    cfg = load_config(OnlineConfig, path)
    objective = build_objective(cfg.objective)
    assert isinstance(objective, OBJECTIVES[cfg.objective.name])
    source = source_of(cfg, "online")  # the split, the objective's arguments and the source's checks fit
    assert source.rules is None or cfg.pairing.split in source.rules


# CI time: fewer rounds, or half a round (half the prompts and the batch: the same optimizer steps on half the
# images); on 16 held-out prompts x 2 seeds: D3PO (3 of 10 half rounds) +0.15, 84.4% wins; DRAGON (5 of 10 half
# rounds) +0.35, 96.9% (10: +0.42, 87.5%); DRO (6 of 30 rounds) +0.06, 81.2% (10: +0.08, 78.1%)
SHORTER = {
    "toy_d3po": ["online.rounds=3", "sampling.prompts_per_round=32", "train.batch_size=16"],
    "toy_dragon": ["online.rounds=5", "sampling.prompts_per_round=16", "train.batch_size=8"],
    "toy_dro": ["online.rounds=6"],
}


@needs_toy
@pytest.mark.slow(minutes=3)
@pytest.mark.parametrize("config", ["toy_d3po", "toy_dragon", "toy_dro"])
def test_toy_aesthetic_rises_on_heldout_prompts(tmp_path, monkeypatch, config):
    """The shipped toy configs, seeded: the aligned model beats the base on held-out prompts (same seeds)."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    extra = [*SHORTER.get(config, []), f"train.output_dir={tmp_path / 'run'}", "train.tensorboard=false"]
    extra.append("guards.every=0")  # the method's learning check, not the drift guard's (tests/test_guards.py)
    out = run(str(REPO / "configs" / f"{config}.yaml"), extra)
    report = json.loads((out / "summary.json").read_text())["eval"]["scorers"]
    assert report["toy_aesthetic"]["mean_delta"] > 0 and report["toy_aesthetic"]["win_rate"] > 0.5
    assert report["toy_fidelity"]["mean_delta"] > -0.05  # no reward hacking beyond 5 points of fidelity


@needs_toy
@pytest.mark.slow(minutes=3)
def test_toy_dragon_fd_to_vivid_exemplars_falls(tmp_path, monkeypatch):
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    out = run(
        str(REPO / "configs" / "toy_dragon_fd.yaml"),
        # the method alone, 2 of its 10 rounds (CI time): FD 13.1 -> 11.4 on 16 held-out prompts x 2 seeds (1 round
        # 12.3, 3 rounds 10.1); the evaluation's images are drawn once for the report and the FD
        ["online.rounds=2", f"train.output_dir={tmp_path / 'run'}", "train.tensorboard=false", "guards.every=0"],
    )
    fd = json.loads((out / "summary.json").read_text())["eval_fd"]
    assert fd["aligned"] < fd["base"]


def test_dro_experts_are_the_top_k_of_every_image_by_the_scorer(tmp_path):
    """expert_scorer: all images of all pairs (ties too) are scored and the best `limit` kept, best first."""
    from data_factory import make_rows, write_parquet

    from diffalign.online.exemplars import preference_winners

    path = write_parquet(tmp_path / "prefs.parquet", make_rows(6))
    seen = []

    def brightness(images, prompts):  # (N, 3, H, W) in [0, 1] -> (N,)
        assert images.min() >= 0 and images.max() <= 1 and len(prompts) == len(images)
        seen.append(images.mean((1, 2, 3)))
        return seen[-1]

    pixels, prompts = preference_winners(str(path), 32, limit=3, scorer=brightness, batch_size=5)
    scores = torch.cat(seen)
    assert len(scores) == 12  # 6 pairs x 2 images, the tie row included
    assert torch.allclose(((pixels + 1) / 2).mean((1, 2, 3)), scores.sort(descending=True).values[:3])
    assert len(prompts) == 3
    winners, _ = preference_winners(str(path), 32, limit=0)  # no scorer: one winner per non-tie pair
    assert len(winners) == 5


# ---- one engine: mixed precision, checkpointing, accumulation, non-finite policy, exact resume ------------------


def test_online_sdxl_bf16_gradient_checkpointing_and_accumulation(tmp_path, monkeypatch):
    """The tiny SDXL pipeline on-line with bf16 autocast, gradient checkpointing and 2 micro-batches per step."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    sdxl = ["model.path=assets/tiny/sdxl", "train.mixed_precision=bf16", "train.gradient_checkpointing=true"]
    args = [*TINY_ONLINE, *sdxl, "train.grad_accum=2", "train.batch_size=1", "train.trajectory_steps=1"]
    run(None, [*args, _prompts_file(tmp_path), "online.rounds=1", f"train.output_dir={out}"])
    row = json.loads((out / "rounds.jsonl").read_text())
    assert math.isclose(row["train/loss"], math.log(2), rel_tol=1e-2)  # D3PO at LoRA init, in bf16
    assert row["skipped_steps"] == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


@dataclass
class NanD3PO(D3PO):
    """D3PO whose every loss is NaN: a stand-in for a diverged run, registered in OBJECTIVES for the test."""

    def __call__(self, log_prob, ref_log_prob, label):  # taken by name, like D3PO's
        loss, metrics = super().__call__(log_prob, ref_log_prob, label)
        return loss * float("nan"), metrics


def test_online_stops_after_five_non_finite_steps_naming_round_and_step(tmp_path, monkeypatch):
    """Every loss NaN: each step is skipped and counted (the round log says so), and the fifth in a row (round 2,
    step 2 with 3 steps per round) stops the run with a one-line error."""
    from diffalign.pipelines.online import run

    from diffalign.errors import DiffalignError

    monkeypatch.chdir(REPO)
    monkeypatch.setitem(OBJECTIVES, "nan_d3po", NanD3PO)
    out = tmp_path / "run"
    args = [*TINY_ONLINE, "train.steps_per_round=3", "online.rounds=3", "objective.name=nan_d3po"]
    with pytest.raises(DiffalignError, match=r"5 steps in a row, the last at round 2 step 2"):
        run(None, [*args, f"train.output_dir={out}", _prompts_file(tmp_path)])
    assert json.loads((out / "rounds.jsonl").read_text())["skipped_steps"] == 3  # round 1: skipped, not stopped


KILL_ARGS = [*TINY_ONLINE, "online.rounds=3", "train.steps_per_round=2", "train.tensorboard=false"]


def _round_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    wall = ("round_seconds", "reward_wait_seconds")  # wall times differ between runs
    return [{k: v for k, v in row.items() if k not in wall} for row in rows]


def test_online_checkpoint_every_n_rounds_and_resume_from_it(tmp_path, monkeypatch):
    """train.checkpoint_every=2 over 3 rounds saves round 2 alone; a run resumed from that checkpoint ends with the
    same LoRA and round log as the uninterrupted one; 0 saves none."""
    import shutil

    from diffalign.pipelines.cli import main
    from safetensors.torch import load_file

    from diffalign.checkpoint import list_checkpoints

    monkeypatch.chdir(REPO)
    args = [*KILL_ARGS, "objective.name=dpo", _prompts_file(tmp_path), "eval.prompts="]
    whole, resumed, none = tmp_path / "whole", tmp_path / "resumed", tmp_path / "none"
    assert main(["online", *args, "train.checkpoint_every=2", f"train.output_dir={whole}"]) == 0
    assert [c.name for c in list_checkpoints(whole / "checkpoints")] == ["step-000002"]
    shutil.copytree(whole / "checkpoints", resumed / "checkpoints")
    rows = (whole / "rounds.jsonl").read_text().splitlines()
    (resumed / "rounds.jsonl").write_text("\n".join(rows[:2]) + "\n")
    assert (
        main(["online", *args, "train.checkpoint_every=2", f"train.output_dir={resumed}", "--resume", "latest"]) == 0
    )
    assert _round_rows(resumed) == _round_rows(whole)
    a, b = (load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["online", *args, "online.rounds=1", "train.checkpoint_every=0", f"train.output_dir={none}"]) == 0
    assert not list_checkpoints(none / "checkpoints") and (none / "lora").is_dir()


@pytest.mark.slow  # three runs of 3 rounds, one a fresh subprocess: ~60 s on 2 shared cores
def test_online_sigkill_mid_round_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """A real `diffalign online` process killed with SIGKILL while saving round 2 (its round-log row is written, the
    checkpoint is not), then `--resume latest`: the same LoRA and the same round log as a run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from diffalign.pipelines.cli import main
    from safetensors.torch import load_file

    monkeypatch.chdir(REPO)
    args = [*KILL_ARGS, "objective.name=d3po", "online.ref_refresh=2", _prompts_file(tmp_path)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["online", *args, f"train.output_dir={whole}"]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DIFFALIGN_TEST_SAVE_PAUSE="2:120")
    cmd = [sys.executable, "-m", "diffalign.pipelines.cli", "online", *args, f"train.output_dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((killed / "checkpoints").glob("step-000002.tmp-*")):  # inside the round-2 save
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert [r["round"] for r in _round_rows(killed)] == [1, 2]  # logged past its last good checkpoint (round 1)

    assert main(["online", *args, f"train.output_dir={killed}", "--resume", "latest"]) == 0
    assert _round_rows(killed) == _round_rows(whole)
    a = load_file(str(whole / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inpo_eta_noise_comes_from_each_pairs_keyed_generator(tiny_round):
    """The pairs source gives InPO's DDIM-inversion eta noise from the pair's keyed generator: pair B's errors are
    the same whether it is drawn alone or after pair A, and do not depend on the global RNG."""
    from diffalign.config import EstimatorConfig
    from diffalign.engine.step import StepContext
    from diffalign.objectives.inpo import InPO
    from diffalign.sources.pairs import Pairs

    family, params, prompts, traj = tiny_round
    cond = family.encode_prompts(prompts[:1])
    ctx = StepContext(
        family=family,
        denoise=family.denoise,
        objective=InPO(),
        schedule=Schedule(family.scheduler, family.prediction_type),
        reference=lambda: reference_mode(family.denoiser),
        estimator=EstimatorConfig(t_min=500),  # high t: several inversion steps, each with eta noise
        seed=0,
        params=params,
        optimizer=None,
        max_grad_norm=0.0,
        source=Pairs(),
    )

    def batch(indices):  # a cached-style collated batch of pairs (x0_w, x0_l) = (chain i, chain i + 1)
        n = len(indices)
        return {
            "x0_w": traj.x0[indices],
            "x0_l": traj.x0[[i + 1 for i in indices]],
            "cond": {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()},
            "size_info_w": torch.zeros(n, 4, dtype=torch.long),
            "size_info_l": torch.zeros(n, 4, dtype=torch.long),
            "label": torch.ones(n),
            "epoch": [0] * n,
            "index": torch.tensor(indices),
        }

    with torch.no_grad():
        torch.manual_seed(1)
        err_ab = Pairs().inputs(ctx, batch([0, 2]), "cpu").err  # (4,) = [w_A, w_B, l_A, l_B]
        torch.manual_seed(2)
        err_b = Pairs().inputs(ctx, batch([2]), "cpu").err  # (2,) = [w_B, l_B]
    torch.testing.assert_close(err_ab[[1, 3]], err_b)


def test_dro_negatives_are_sampled_from_their_experts_captions():
    """Diffusion-DRO's round: the prompts are expert captions, and each policy chain is paired with the expert whose
    caption prompted it (the official code generates the negative from the expert's own caption)."""
    from diffalign.config import OnlineConfig, SamplingConfig
    from diffalign.online.rounds import plan_round
    from diffalign.sources import SOURCES

    captions = [f"caption {i}" for i in range(10)]
    cfg = OnlineConfig(sampling=SamplingConfig(prompts_per_round=4, images_per_prompt=2))
    prompts, seeds, pool_index = plan_round(cfg, 3, captions)
    chains, experts = SOURCES["experts"]().rows(None, cfg, None, 3, pool_index)
    assert len(prompts) == len(chains) == 8
    assert [prompts[c] for c in chains.tolist()] == [captions[e] for e in experts.tolist()]
    assert plan_round(cfg, 3, captions)[0] == prompts and plan_round(cfg, 4, captions)[0] != prompts  # keyed by round


def test_online_learning_curve_every_round_and_in_the_report(tmp_path, monkeypatch):
    """train.validate_every: held-out points at round 0 (the base) and every N rounds, drawn next to the round
    reward and loss in eval/curves.png, which report.html embeds; a resumed run keeps only the rounds it saw."""
    from diffalign.pipelines.online import run
    from PIL import Image

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    small = ["model.path=assets/toy_model", *TINY_ONLINE[1:-1], "train.validate_every=1", "online.rounds=2"]
    small += ["objective.name=dpo", "pairing.split=best_worst", "eval.prompts=toy", "eval.max_prompts=2"]
    small += ["eval.images_per_prompt=1", "eval.steps=2", "eval.scorers=[toy_aesthetic]"]
    run(None, [*small, f"train.output_dir={out}"])
    points = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 1, 2] and all("toy_aesthetic" in p for p in points)
    assert all(0 <= p["win/toy_aesthetic"] <= 1 for p in points[1:])  # against the round-0 base, same seeds
    png = Image.open(out / "eval" / "curves.png")
    assert png.width > 300 and len(set(png.convert("L").getdata())) > 10  # drawn panels, not a blank canvas
    assert "Learning curves" in (out / "eval" / "report.html").read_text()  # embedded only when the PNG exists


@pytest.mark.slow  # two runs of 3 rounds, one a fresh subprocess: ~60 s on 2 shared cores
def test_online_sigterm_mid_run_exits_143_and_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """SIGTERM once round 1 is saved lands in round 2 (sampling or training): the run stops at the next optimizer step
    or round boundary with 143, keeping its last complete round; `--resume latest` redoes what was dropped (every
    draw is keyed) and ends with the same LoRA and round log as a run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from diffalign.pipelines.cli import main
    from safetensors.torch import load_file

    from diffalign.checkpoint import list_checkpoints

    monkeypatch.chdir(REPO)
    args = [*KILL_ARGS, "objective.name=d3po", "online.ref_refresh=2", _prompts_file(tmp_path)]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(["online", *args, f"train.output_dir={whole}"]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "diffalign.pipelines.cli", "online", *args, f"train.output_dir={stopped}"]
    with open(tmp_path / "stopped.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not (stopped / "checkpoints" / "step-000001" / "state.json").is_file():  # round 1 saved
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    text = (tmp_path / "stopped.log").read_text()
    assert "SIGTERM: " in text and "resume with --resume latest" in text
    kept = [p.name for p in list_checkpoints(stopped / "checkpoints")]
    assert kept[0] == "step-000001" and "step-000003" not in kept  # stopped before the end
    assert not (stopped / "lora").exists()

    assert main(["online", *args, f"train.output_dir={stopped}", "--resume", "latest"]) == 0
    assert _round_rows(stopped) == _round_rows(whole)
    a = load_file(str(whole / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(stopped / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_online_lr_schedule_with_warmup_is_applied(tmp_path, monkeypatch):
    """train.lr_schedule / warmup_steps: the logged lr follows diffusers' cosine with warm-up over rounds x steps."""
    from diffalign.pipelines.online import run

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    extra = ["objective.name=d3po", _prompts_file(tmp_path), "train.lr=1e-3", "train.lr_schedule=cosine"]
    run(None, [*TINY_ONLINE, *extra, "train.warmup_steps=1", "train.tensorboard=false", f"train.output_dir={out}"])
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    # 2 rounds x 1 step: step 1 ends the warm-up (lr 1e-3), step 2 is the end of the cosine (lr 0)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 0.0], abs=1e-12)


def test_online_trains_with_8bit_adamw_and_resumes_it_exactly(tmp_path, monkeypatch):
    """train.adam_8bit works on-line (the Run builds the optimizer for both programs): bitsandbytes' AdamW8bit, whose
    nested state goes into the checkpoint and comes back, so 1 round + --resume latest = 2 rounds."""
    from diffalign.pipelines.online import run
    from safetensors.torch import load_file

    monkeypatch.chdir(REPO)
    extra = ["objective.name=d3po", _prompts_file(tmp_path), "train.adam_8bit=true", "train.tensorboard=false"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    run(None, [*TINY_ONLINE, *extra, f"train.output_dir={whole}"])
    run(None, [*TINY_ONLINE, *extra, "online.rounds=1", f"train.output_dir={halves}"])
    state = load_file(str(halves / "checkpoints" / "step-000001" / "optimizer.safetensors"))
    assert any(k.endswith("__bnb_optimizer_quant_state__/state1") for k in state)  # bitsandbytes' moments
    run(None, [*TINY_ONLINE, *extra, f"train.output_dir={halves}"], resume="latest")
    a = load_file(str(whole / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(halves / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)  # it trained


@pytest.mark.parametrize(
    "objective,extra",
    [("d3po", []), ("dpo", ["pairing.split=best_worst"]), ("kto", ["pairing.split=top_bottom", "objective.beta=100"]),
     ("grpo", ["objective.beta=0.04"]), ("nft", [])],
)  # fmt: skip
def test_a_rounds_training_steps_never_run_the_text_encoders(tmp_path, monkeypatch, objective, extra):
    """The round's prompts are encoded once before it is sampled (EncodedPrompts); the sampler's chunks and every
    source's training steps then select rows of that conditioning: zero text-encoder calls inside the sampling and
    the steps, for each on-line source."""
    import diffalign.pipelines.online as online

    import diffalign.engine.step as step
    from diffalign.models import FAMILIES

    calls = {"in_steps": 0, "sampling": 0, "outside": 0}
    inside = [False]
    for cls in {*FAMILIES.values()}:
        original = cls.encode_prompts

        def counted(self, prompts, _original=original):
            calls["in_steps" if inside[0] is True else inside[0] or "outside"] += 1
            return _original(self, prompts)

        monkeypatch.setattr(cls, "encode_prompts", counted)
    step_loss = step.step_loss

    def flagged(ctx, batch, device):
        inside[0] = True
        try:
            return step_loss(ctx, batch, device)
        finally:
            inside[0] = False

    monkeypatch.setattr(step, "step_loss", flagged)
    sample_share = online.sample_share

    def sampling(*args, **kwargs):
        inside[0] = "sampling"
        try:
            return sample_share(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(online, "sample_share", sampling)
    monkeypatch.chdir(REPO)
    args = [*TINY_ONLINE, f"objective.name={objective}", *extra, _prompts_file(tmp_path), "online.rounds=1"]
    online.run(None, [*args, "train.tensorboard=false", f"train.output_dir={tmp_path / 'run'}"])
    assert calls["in_steps"] == 0 and calls["sampling"] == 0 and calls["outside"] > 0


def test_the_empty_prompt_is_encoded_once_per_run_and_the_grid_every_n_rounds(tmp_path, monkeypatch):
    """CFG's "" conditioning is encoded in the first round and kept (Family.encode_empty; the text encoders are
    frozen), as Flow-GRPO encodes its negative prompt once; train.grid_every=2 writes round 2's grid, not round 1's,
    while the round log has both rounds."""
    import diffalign.pipelines.online as online

    from diffalign.models.sd import SDFamily

    empty = []
    original = SDFamily.encode_prompts

    def counted(self, prompts):
        empty.extend(p for p in prompts if p == "")
        return original(self, prompts)

    monkeypatch.setattr(SDFamily, "encode_prompts", counted)
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    args = [*TINY_ONLINE, "objective.name=d3po", _prompts_file(tmp_path), "train.grid_every=2"]
    online.run(None, [*args, "train.tensorboard=false", f"train.output_dir={out}"])  # rounds=2, guidance 2
    assert empty == [""]
    rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["round-0002.png"]
