"""The toy world learns: a short seeded Diffusion-DPO run raises the toy aesthetic on held-out prompts, and the same
run with the loss sign flipped (β -> -β prefers the loser) lowers it, so this fails if the sign were wrong."""

import json
from pathlib import Path

import pytest

from diffalign.paths import TOY_MODEL, TOY_TRAIN
from pipelines.cli import main

pytestmark = pytest.mark.skipif(
    not (TOY_MODEL / "model_index.json").is_file() or not TOY_TRAIN.is_file(), reason="toy model or toy data not built"
)

SHORT = [
    "train.max_steps=150",
    "train.batch_size=8",
    "eval.max_prompts=8",
    "eval.images_per_prompt=4",
    "train.log_every=50",
]


def _report(tmp_path: Path, beta: float) -> dict:
    out = tmp_path / f"beta{beta:+.0f}"
    sign = ["objective.allow_negative_beta=true"] if beta < 0 else []  # the explicit opt-in for a flipped sign
    assert main(["train", *SHORT, f"objective.beta={beta}", *sign, f"train.output_dir={out}"]) == 0
    return json.loads((out / "eval" / "report.json").read_text())["scorers"]


def test_dpo_raises_the_toy_aesthetic_and_the_flipped_sign_lowers_it(tmp_path):
    up, down = _report(tmp_path, 5000.0), _report(tmp_path, -5000.0)
    assert up["toy_aesthetic"]["mean_delta"] > 0 > down["toy_aesthetic"]["mean_delta"], (up, down)
    assert up["toy_aesthetic"]["win_rate"] >= 0.6, up["toy_aesthetic"]
    assert up["toy_fidelity"]["mean_delta"] > -0.05  # prompt following kept (5 points)


def _toy_settings():
    """COMMON + SETTINGS of benchmarks/toy_alignment.py: one source for the objectives' toy-scaled settings."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_alignment.py"
    spec = importlib.util.spec_from_file_location("toy_alignment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.COMMON, module.SETTINGS


@pytest.mark.parametrize(
    "name",
    [
        "kto",
        "mapo",
        "sft",
        pytest.param("inpo", marks=pytest.mark.slow),  # inversion forwards: 3-6x a DPO step
        pytest.param("smpo", marks=pytest.mark.slow),
    ],
)
def test_each_objective_raises_the_toy_aesthetic(tmp_path, name):
    """The benchmark's settings for `name` (300 steps; InPO / SmPO trained as long here), seeded: the held-out
    aesthetic goes up on 8 prompts x 4 seeds and fidelity stays within 5 points."""
    common, settings = _toy_settings()
    out = tmp_path / name
    args = [*common, *settings[name], "train.max_steps=300", "eval.max_prompts=8", "eval.images_per_prompt=4"]
    assert main(["train", *args, "train.log_every=100", "train.tensorboard=false", f"train.output_dir={out}"]) == 0
    report = json.loads((out / "eval" / "report.json").read_text())["scorers"]
    assert report["toy_aesthetic"]["mean_delta"] > 0 and report["toy_aesthetic"]["win_rate"] > 0.5, report
    assert report["toy_fidelity"]["mean_delta"] > -0.05, report
