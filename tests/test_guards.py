"""Reward-hacking guards: image statistics by hand, each rule trips (by hand and inside `train` / `online` on the toy
model), a tripped run stops with exit 0 and keeps the best passing LoRA, bad monitor configs fail in one line."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from diffalign.pipelines.cli import main
from safetensors.torch import load_file

from diffalign.guards import Monitor, PixelEncoder, fd_between, measure_all, set_measure, vendi_measure
from diffalign.rewards import load_scorer
from diffalign.rewards.imagestats import hf_energy, saturation, sharpness

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (REPO / "assets/toy_model/model_index.json").is_file(), reason="no toy model")


# ---- image statistics ------------------------------------------------------------------------------------------


def test_image_statistics_by_hand():
    grey = torch.full((1, 3, 8, 8), 0.5)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert saturation(grey).item() == 0.0 and saturation(red).item() == 1.0  # chroma = max - min channel
    assert load_scorer("toy_saturation")(red).item() == 10.0
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    smooth = (0.5 + 0.5 * torch.cos(2 * math.pi * torch.arange(8) / 8))[None, :].expand(8, 8).expand(1, 3, 8, 8)
    # a checkerboard is all Nyquist energy (f = 1/2 in both axes); one cosine of f = 1/8 has none above 1/4
    assert math.isclose(hf_energy(checker).item(), 1.0, abs_tol=1e-6)
    assert hf_energy(smooth).item() < 1e-6
    # Laplacian of the checkerboard = +-4 at every valid pixel: variance 16 (mean 0 over 36 pixels, 18 each sign)
    assert math.isclose(sharpness(checker).item(), 16 * 36 / 35, rel_tol=1e-5)  # unbiased variance
    blurred = torch.nn.functional.avg_pool2d(checker, 3, stride=1, padding=1)
    assert sharpness(blurred) < sharpness(checker) / 10


def test_vendi_counts_distinct_samples_and_fd_is_zero_on_itself():
    a, b = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    a[..., :8, :] = 1.0  # top half white, b left half white: orthogonal in [-1, 1] (the quadrants cancel)
    b[..., :, :8] = 1.0
    same, two = torch.cat([a, a, a, a]), torch.cat([a, b, a, b])
    vendi = vendi_measure(PixelEncoder())
    assert math.isclose(vendi(same, ["p"] * 4, 4, same), 1.0, abs_tol=1e-4)  # one distinct image
    assert math.isclose(vendi(two, ["p"] * 4, 4, two), 2.0, abs_tol=1e-4)  # two orthogonal ones, equal shares
    fd = set_measure(fd_between, PixelEncoder())
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert fd(x, [""] * 6, 2, x) < 1e-6 < fd(x.flip(0) * 0.5, [""] * 6, 2, x)


def test_a_base_relative_scorer_monitor_is_zero_at_the_base_and_measures_the_drift():
    """kind scorer with toy_background_shift: each image against the base image of its prompt and seed; a background
    tinted by (+10, 0, -10) levels in one image of two: mean sqrt(200) / 2 = 7.07 levels, past a 5-level limit."""
    base = torch.full((2, 3, 32, 32), 0.86)
    base[:, 0, 8:20, 8:20], base[:, 1:, 8:20, 8:20] = 0.9, 0.1  # a red square on a grey background
    tinted = base.clone()
    tinted[1, 0] += torch.where(base[1, 1] > 0.5, 10 / 255, 0.0)
    tinted[1, 2] -= torch.where(base[1, 1] > 0.5, 10 / 255, 0.0)
    monitor = Monitor.build("cast", "scorer", "max_rise", 5.0, scorer="toy_background_shift")
    prompts = ["a large red square at the center"] * 2
    at_base = measure_all([monitor], base, prompts, 2, base)
    values = measure_all([monitor], tinted, prompts, 2, base)
    assert at_base == {"cast": 0.0} and values["cast"] == pytest.approx(200**0.5 / 2, abs=1e-3)
    line = monitor.trip(values["cast"], at_base["cast"])
    assert line.startswith("cast 7.07") and "from base 0 (limit 5)" in line


# ---- rules ----------------------------------------------------------------------------------------------------


def _monitor(rule, limit, relative=False):
    return Monitor("m", lambda *a: 0.0, rule, limit, relative)


def test_each_rule_trips_past_its_limit_only():
    assert _monitor("max_drop", 0.05).trip(0.96, 1.0) is None  # dropped 0.04 <= 0.05
    line = _monitor("max_drop", 0.05).trip(0.90, 1.0)
    assert line.startswith("m 0.9 dropped 0.1 from base 1 (limit 0.05")
    assert _monitor("max_drop", 0.05).trip(2.0, 1.0) is None  # a rise never trips max_drop
    assert _monitor("max_rise", 0.5).trip(1.4, 1.0) is None
    assert "rose" in _monitor("max_rise", 0.5).trip(1.6, 1.0)
    assert _monitor("max_drop", 0.1, relative=True).trip(1.85, 2.0) is None  # 7.5% < 10%
    assert "(limit 0.2 (10% of base))" in _monitor("max_drop", 0.1, relative=True).trip(1.75, 2.0)


# ---- inside the programs on the toy model -----------------------------------------------------------------------

GUARDS = ["guards.every=1", "guards.max_prompts=2", "guards.images_per_prompt=2", "guards.steps=4"]


def test_train_stops_when_drift_rises_and_keeps_the_base(tmp_path, capsys):
    out = tmp_path / "run"
    monitors = "guards.monitors={drift: {kind: fd, rule: max_rise, limit: 0.0}, sat: {kind: saturation, limit: 1}}"
    args = ["train", "train.max_steps=4", "train.batch_size=2", "train.lr=1e-2", "train.validate_every=0"]
    rc = main([*args, "eval.prompts=", f"train.output_dir={out}", *GUARDS, monitors])
    assert rc == 0  # a guard stop is not the user's error: exit 0, summary.json says it tripped
    printed = capsys.readouterr().out
    assert "guard tripped at step 1: drift " in printed and "rose" in printed and "(limit 0)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["guards"]["kept_step"] == 0
    assert summary["guards"]["tripped"][0].startswith("drift ")
    rows = [json.loads(line) for line in (out / "guards.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["drift"] == 0.0 and not rows[1]["passed"]
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(not v.any() for k, v in lora.items() if "lora_B" in k)  # step 0's weights: B = 0, the base model


def test_online_stops_when_drift_rises(tmp_path, capsys):
    out = tmp_path / "run"
    online = [
        "online.rounds=3",
        "sampling.prompts_per_round=4",
        "sampling.steps=4",
        "train.steps_per_round=2",
        "train.batch_size=4",
        "train.lr=3e-2",
        "reward.monitor=[]",
        "train.tensorboard=false",
    ]
    monitors = "guards.monitors={vivid: {kind: cmmd, encoder: toy_stats, rule: max_rise, limit: 0.0}}"
    rc = main(["online", "objective.name=dpo", "pairing.split=best_worst", *online, "eval.prompts=",
               f"train.output_dir={out}", *GUARDS, monitors])  # fmt: skip
    assert rc == 0
    assert "guard tripped at round 1: vivid " in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["guards"]["kept_round"] == 0
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 1


def test_resumed_guarded_run_keeps_the_same_best_copy(tmp_path):
    """A guarded run stopped after step 2 and resumed to step 4 logs each check once and keeps the same best passing
    weights as the uninterrupted run (the best copy is on disk, not only in memory). Trained on -beta, the reward
    falls, so the best is at or before the resume point: the copy must come back from guards_best.safetensors."""
    a, b = tmp_path / "a", tmp_path / "b"
    monitors = "guards.monitors={fid: {kind: scorer, scorer: toy_fidelity, limit: 1.0}}"  # passes every check
    args = ["train", "train.batch_size=2", "train.lr=1e-2", "train.validate_every=0", "train.checkpoint_every=1",
            "objective.beta=-5000", "objective.allow_negative_beta=true", "eval.prompts=", *GUARDS, monitors]  # fmt: skip
    assert main([*args, "train.max_steps=4", f"train.output_dir={a}"]) == 0
    assert main([*args, "train.max_steps=2", f"train.output_dir={b}"]) == 0
    assert main([*args, "train.max_steps=4", f"train.output_dir={b}", "--resume", "latest"]) == 0

    def rows(run):
        return [json.loads(line) for line in (run / "guards.jsonl").read_text().splitlines()]

    full, resumed = rows(a), rows(b)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4] == [r["step"] for r in full]
    for x, y in zip(full, resumed):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-4) and x["fid"] == pytest.approx(y["fid"], abs=1e-4)
    kept = json.loads((a / "summary.json").read_text())["guards"]["kept_step"]
    assert kept <= 2  # the premise: the best passing check is before the resume point
    assert json.loads((b / "summary.json").read_text())["guards"]["kept_step"] == kept
    la = load_file(a / "lora" / "pytorch_lora_weights.safetensors")
    lb = load_file(b / "lora" / "pytorch_lora_weights.safetensors")
    assert la.keys() == lb.keys() and all(torch.allclose(la[k], lb[k], atol=1e-6) for k in la)


@pytest.mark.parametrize(
    "monitors,message",
    [
        ("{fid: {kind: scorer, scorer: toy_fidelity, limt: 0.1}}", "guards.monitors.fid.limt"),
        ("{fid: {kind: scorer, limit: 0.1}}", "guards.monitors.fid.scorer"),
        ("{fid: {kind: vendy}}", "guards.monitors.fid.kind"),
        ("{}", "guards.monitors"),
    ],
)
def test_bad_monitor_config_is_one_line_exit_2(tmp_path, capsys, monitors, message):
    rc = main(["train", "train.max_steps=1", f"train.output_dir={tmp_path / 'r'}", "guards.every=1",
               f"guards.monitors={monitors}"])  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err


# ---- the hack demo: an unguarded run games toy_area, the guarded one stops before the damage ---------------------


@pytest.mark.slow(minutes=3)
def test_hackable_reward_degrades_unguarded_and_guards_stop_it(tmp_path, monkeypatch):
    """configs/toy_hack.yaml games toy_area (bigger shapes) and loses > 5 points of held-out prompt fidelity;
    configs/toy_hack_guarded.yaml (the same run) trips a guard, keeps the best passing round, and its held-out
    fidelity is within 2 points and its guard-set Vendi within 10% of the base. Both runs as shipped."""
    monkeypatch.chdir(REPO)
    reports = {}
    for name in ("toy_hack", "toy_hack_guarded"):
        out = tmp_path / name
        assert main(["online", f"configs/{name}.yaml", f"train.output_dir={out}", "train.tensorboard=false"]) == 0
        reports[name] = json.loads((out / "summary.json").read_text())
    hacked = reports["toy_hack"]["eval"]["scorers"]
    assert hacked["toy_area"]["mean_delta"] > 0  # the hackable reward went up ...
    assert hacked["toy_fidelity"]["mean_delta"] < -0.05  # ... and the prompts are followed less: > 5 points lost

    summary = reports["toy_hack_guarded"]
    guards = summary["guards"]
    assert guards["tripped"] and guards["kept_round"] < summary["rounds"]
    assert summary["eval"]["scorers"]["toy_fidelity"]["mean_delta"] >= -0.02
    rows = [json.loads(line) for line in (tmp_path / "toy_hack_guarded" / "guards.jsonl").read_text().splitlines()]
    kept = next(r for r in rows if r["round"] == guards["kept_round"])
    assert abs(kept["diversity"] - rows[0]["diversity"]) <= 0.1 * rows[0]["diversity"]
    assert (tmp_path / "toy_hack_guarded" / "eval" / "guards.png").is_file()


@pytest.mark.slow(minutes=2)  # two or three toy_grpo rounds, a guard check after each (531 s on a loaded machine)
def test_toy_drift_guard_stops_shipped_toy_grpo(tmp_path, monkeypatch):
    """configs/toy_grpo.yaml as shipped: its background cast trips the toy drift guard by round 2 (its unguarded guard
    log: 3.95 then 8.13 levels of 255 against the bound 4.0, docs/results.md#drift-on-the-toy-world), and lora/ holds
    a round before the trip."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    small_eval = ["eval.max_prompts=2", "eval.images_per_prompt=1", "eval.steps=2"]
    args = ["online", "configs/toy_grpo.yaml", "online.rounds=3", *small_eval, f"train.output_dir={out}"]
    assert main([*args, "train.tensorboard=false"]) == 0
    guards = json.loads((out / "summary.json").read_text())["guards"]
    rounds = [json.loads(line)["round"] for line in (out / "guards.jsonl").read_text().splitlines()]
    assert guards["tripped"] and rounds[-1] <= 2 and guards["kept_round"] < rounds[-1]
    assert any(line.startswith("background_cast") for line in guards["tripped"])


def test_readme_guards_block_is_the_shipped_guarded_config():
    block = re.search(r"```yaml\n(guards:.*?)```", (REPO / "README.md").read_text(), flags=re.S).group(1)
    shipped = yaml.safe_load((REPO / "configs/toy_hack_guarded.yaml").read_text())["guards"]
    assert yaml.safe_load(block)["guards"] == shipped
