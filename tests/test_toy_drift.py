"""The continuous toy fidelity and drift scorers (diffalign.rewards.toy_drift), checked by hand on rendered scenes.

One scene (a small red circle at the top left, centre (10, 9.5): 0.5 px right of its anchor (9.5, 9.5), radius
4.5) and three edits of it, each of which must move its own scorer by the hand-computed amount and leave the others
where they were: the shape shifted 1 px right, the background tinted, the background textured.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffalign.rewards import BASE_RELATIVE, SCORERS, TOY_DRIFT, load_scorer, score_against_base, scorer_class
from diffalign.toy import shapes

PROMPT = "a small red circle at the top left"
SCENE = shapes.Scene("circle", "red", "small", "top left", hue=0.0, saturation=1.0, value=0.9, cx=10.0, cy=9.5,
                     half=4.5, background=0.9)  # fmt: skip
TINT = np.array([0.04, 0.02, -0.03], dtype=np.float32)  # 255 * |TINT| = 255 * sqrt(0.0029) = 13.73 levels
TEXTURE = 0.02  # checkerboard +- 0.02 on every channel: standard deviation 0.02 = 5.1 levels


def coverage(scene: shapes.Scene) -> np.ndarray:
    """(H, W, 1) the renderer's alpha, from two renders that differ only in their background grey."""
    a, b = shapes.render(scene), shapes.render(dataclasses.replace(scene, background=0.5))
    return 1 - (a - b)[..., :1] / (scene.background - 0.5)


def images() -> dict[str, np.ndarray]:
    base = shapes.render(SCENE)
    away = 1 - coverage(SCENE)  # (H, W, 1): 1 on the background, 0 inside the shape
    y, x = np.mgrid[:32, :32]
    checker = np.where((x + y) % 2 == 0, TEXTURE, -TEXTURE)[..., None].astype(np.float32)
    return {
        "base": base,
        "shifted": shapes.render(dataclasses.replace(SCENE, cx=SCENE.cx + 1.0)),
        "tinted": base + away * TINT,
        "textured": base + away * checker,
    }


def tensor(*arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, float]]:
    """edit -> scorer -> score of the edited image (against the base image for the base-relative scorers)."""
    ims = images()
    edits = list(ims)
    x, x0 = tensor(*[ims[e] for e in edits]), tensor(*[ims["base"]] * len(edits))
    prompts = [PROMPT] * len(edits)
    out = {e: {} for e in edits}
    for name in TOY_DRIFT:
        s = score_against_base(name, load_scorer(name), x, prompts, x0)
        for e, v in zip(edits, s.tolist()):
            out[e][name] = v
    return out


def test_the_base_render_scores_its_own_offsets(scores):
    """Centre 0.5 px right of the anchor; radius 4.5 = the small size; hue 0 = red; nothing against itself."""
    s = scores["base"]
    assert s["toy_position_error"] == pytest.approx(0.5, abs=1e-3)
    assert s["toy_size_error"] == pytest.approx(0.0, abs=0.02)  # coverage summed on the 4x supersampled grid
    assert s["toy_colour_error"] == pytest.approx(0.0, abs=1e-3)
    for name in BASE_RELATIVE:
        assert s[name] == pytest.approx(0.0, abs=1e-6)


def test_a_shifted_shape_moves_the_geometry_scorers_only(scores):
    """1 px right: 1.5 px from the anchor. Outline: two discs of r = 4.5 at d = 1 overlap in
    2 r² acos(d / 2r) - (d / 2) sqrt(4 r² - d²) = 40.5 * 1.45946 - 0.5 * 8.9443 = 54.636 px²; union
    2 pi r² - 54.636 = 72.598; 1 - IoU = 1 - 54.636 / 72.598 = 0.2474."""
    s, b = scores["shifted"], scores["base"]
    assert s["toy_position_error"] == pytest.approx(1.5, abs=1e-3)
    assert s["toy_outline_change"] == pytest.approx(0.2474, abs=0.01)
    assert s["toy_size_error"] == pytest.approx(b["toy_size_error"], abs=0.02)
    assert s["toy_colour_error"] == pytest.approx(b["toy_colour_error"], abs=0.1)
    assert s["toy_background_shift"] == pytest.approx(0.0, abs=1e-3)
    assert s["toy_background_texture"] == pytest.approx(0.0, abs=1e-3)


def test_a_tinted_background_moves_the_background_shift_only(scores):
    """255 * |(0.04, 0.02, -0.03)| = 255 * sqrt(0.0029) = 13.732 levels; the shape and its rim keep their alpha."""
    s, b = scores["tinted"], scores["base"]
    assert s["toy_background_shift"] == pytest.approx(255 * math.sqrt(0.0029), abs=1e-3)
    assert s["toy_background_texture"] == pytest.approx(0.0, abs=1e-3)
    assert s["toy_outline_change"] == pytest.approx(0.0, abs=1e-3)
    for name in ("toy_position_error", "toy_size_error", "toy_colour_error"):
        assert s[name] == pytest.approx(b[name], abs=1e-3)


def test_a_textured_background_moves_the_texture_only(scores):
    """A +-0.02 checkerboard: the background's standard deviation goes from 0 to 0.02 = 5.1 levels; its mean moves
    by the checkerboard's imbalance over the background pixels (a few pixels of 900: < 0.5 level)."""
    s, b = scores["textured"], scores["base"]
    assert s["toy_background_texture"] == pytest.approx(255 * TEXTURE, abs=0.02)
    assert s["toy_background_shift"] < 0.5
    assert s["toy_outline_change"] < 0.03  # the rim's alpha picks up the texture: a fraction of a pixel²
    assert s["toy_position_error"] == pytest.approx(b["toy_position_error"], abs=0.03)
    assert s["toy_size_error"] == pytest.approx(b["toy_size_error"], abs=0.03)
    assert s["toy_colour_error"] == pytest.approx(b["toy_colour_error"], abs=1e-3)


def test_prompt_errors_by_hand_on_other_prompts_and_no_shape():
    """Against "large": |4.5 - 8.5| = 4 px; against "bottom right" (22.5, 22.5) from (10, 9.5): hypot(12.5, 13) =
    18.035 px; against "blue" (240 degrees): 120 degrees the short way round. A blank image: 16 px, 4.5 px, 180."""
    x = tensor(shapes.render(SCENE))
    assert float(load_scorer("toy_size_error")(x, ["a large red circle at the top left"])) == pytest.approx(
        4.0, abs=0.02
    )
    pos = float(load_scorer("toy_position_error")(x, ["a small red circle at the bottom right"]))
    assert pos == pytest.approx(math.hypot(12.5, 13.0), abs=1e-3)
    assert float(load_scorer("toy_colour_error")(x, ["a small blue circle"])) == pytest.approx(120.0, abs=1e-3)
    assert float(load_scorer("toy_size_error")(x, ["a red circle"])) == 0.0  # no size named
    blank = torch.full((1, 3, 32, 32), 0.9)
    assert [float(load_scorer(n)(blank, [PROMPT])) for n in TOY_DRIFT[:3]] == [16.0, 4.5, 180.0]


def test_pil_and_tensor_inputs_agree_and_base_relative_scorers_need_the_base():
    ims = images()
    pil = [shapes.to_pil(ims["shifted"])]
    x = tensor(np.asarray(pil[0], dtype=np.float32) / 255)
    base_pil = [shapes.to_pil(ims["base"])]
    for name in TOY_DRIFT:
        scorer = load_scorer(name)
        a = score_against_base(name, scorer, pil, [PROMPT], base_pil)
        b = score_against_base(name, scorer, x, [PROMPT], tensor(np.asarray(base_pil[0], dtype=np.float32) / 255))
        assert a.shape == (1,) and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="toy_outline_change.*base model"):
        score_against_base("toy_outline_change", load_scorer("toy_outline_change"), pil, [PROMPT])


def test_base_relative_scorers_are_registered_and_take_the_base():
    import inspect

    assert BASE_RELATIVE <= set(TOY_DRIFT) <= set(SCORERS)
    for name in SCORERS:
        params = inspect.signature(scorer_class(name).__call__).parameters
        assert ("base_images" in params) == (name in BASE_RELATIVE), name


@pytest.mark.parametrize(
    "cls, key",
    [("OnlineConfig", "reward.scorer"), ("OnlineConfig", "reward.monitor"), ("RunConfig", "data.label_scorer")],
)
def test_where_no_base_image_exists_a_base_relative_scorer_is_refused_at_load(cls, key):
    """A round's samples and a preference pair have no base image on the same seed: one config error naming the key."""
    from diffalign import config

    value = "[toy_outline_change]" if key == "reward.monitor" else "toy_outline_change"
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load_config(getattr(config, cls), None, [f"{key}={value}"])
    drift = config.load_config(config.RunConfig, None, ["eval.scorers=[toy_aesthetic,toy_outline_change]"])
    assert drift.eval.drift == ["auto"]  # the end-of-run report has the base images: accepted there
