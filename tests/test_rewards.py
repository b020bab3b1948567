"""Instance scorers on tiny checkpoints in the official formats (reward_factory.py), loaded as users load real ones."""

from __future__ import annotations

import pytest
import reward_factory as rf
import torch
from numerics import assert_close_to_scale
from PIL import Image

from diffalign.rewards import SCORERS, load_scorer, scorer_class
from diffalign.rewards.embeddings import load_weights
from diffalign.rewards.preprocess import ClipPreprocess, pil_to_tensor, resize_center_crop

NAMES = list(rf.COLOURS)
MATCHED = [rf.caption(c) for c in NAMES]
SHIFTED = MATCHED[1:] + MATCHED[:1]  # every image paired with another colour's caption


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_ckpts")
    model, processor = rf.build_hf_clip(root)
    oc_name, oc_pt, oc_st = rf.build_open_clip(root)
    mlp, aes_pth, aes_st = rf.build_aesthetic(root, input_size=16)
    return dict(model=str(model), processor=str(processor), oc_name=oc_name, oc_pt=oc_pt, oc_st=oc_st, mlp=mlp,
                aes_pth=aes_pth, aes_st=aes_st)  # fmt: skip


# name -> load kwargs for the tiny checkpoints (the registry name is what users pass)
def _kwargs(name: str, c: dict) -> dict:
    return {
        "clip_score": dict(model=c["model"], processor=c["processor"], batch_size=8),
        "clip_score_openclip": dict(checkpoint=c["oc_st"], model_name=c["oc_name"], batch_size=8),
        "pickscore": dict(model=c["model"], processor=c["processor"], batch_size=8),
        "hpsv2": dict(checkpoint=c["oc_st"], model_name=c["oc_name"], batch_size=8),
        "aesthetic": dict(weights=c["aes_st"], clip_model=c["model"], processor=c["processor"], batch_size=8),
    }[name]


INSTANCE = ["clip_score", "clip_score_openclip", "pickscore", "hpsv2", "aesthetic"]
TEXT_AWARE = ["clip_score", "clip_score_openclip", "pickscore", "hpsv2"]


@pytest.fixture(scope="module")
def scorers(ckpt):
    return {name: load_scorer(name, **_kwargs(name, ckpt)) for name in INSTANCE}


def test_registry_names_resolve():
    for name in SCORERS:
        assert callable(scorer_class(name).load)


@pytest.mark.numerics
@pytest.mark.parametrize("name", INSTANCE)
def test_shape_determinism_and_batch_invariance(scorers, name):
    s = scorers[name]
    images = rf.colour_images(NAMES * 2, seed=7)  # (8, 3, 40, 48)
    prompts = MATCHED * 2
    a = s(images, prompts)
    assert a.shape == (8,) and a.dtype == torch.float32
    torch.testing.assert_close(s(images, prompts), a, rtol=0, atol=0)
    s.encoder.batch_size = 3  # 3 + 3 + 2
    try:
        assert_close_to_scale(s(images, prompts), a)  # other batches around each image: equal to float rounding
    finally:
        s.encoder.batch_size = 8


@pytest.mark.parametrize("name", TEXT_AWARE)
def test_matching_caption_scores_higher(scorers, name):
    images = rf.colour_images(NAMES, seed=123)  # unseen noise
    assert (scorers[name](images, MATCHED) > scorers[name](images, SHIFTED)).all()


@pytest.mark.parametrize("name", TEXT_AWARE)
def test_pil_and_tensor_inputs_agree(scorers, name):
    """PIL goes through the model's own processor, tensors through torch bicubic: close, not identical."""
    images = rf.colour_images(NAMES, seed=3)
    pils = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    torch.testing.assert_close(scorers[name](pils, MATCHED), scorers[name](images, MATCHED), rtol=0.03, atol=0.03)


def test_tensor_preprocess_follows_torchvision_geometry():
    """Shortest side 32 of a 40x48 image -> 32x38 (int(32*48/40)); centre crop offset round(6/2)=3 columns."""
    x = torch.rand(2, 3, 40, 48)
    assert resize_center_crop(x, 32, 32).shape == (2, 3, 32, 32)
    same = resize_center_crop(torch.rand(1, 3, 32, 38), 32, 32)
    assert same.shape == (1, 3, 32, 32)
    ramp = torch.arange(38.0).expand(1, 3, 32, 38) / 38
    torch.testing.assert_close(resize_center_crop(ramp, 32, 32), ramp[..., 3:35])
    pre = ClipPreprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # no model transform: PIL uses the tensor path
    pil = Image.new("RGB", (48, 40), (255, 0, 0))
    out = pre([pil])
    assert out.shape == (1, 3, 32, 32) and torch.allclose(out[0, 0], torch.ones(32, 32))
    assert pil_to_tensor(pil).shape == (3, 40, 48)


def test_scales(scorers, ckpt):
    """clip_score = 100·cos; pickscore = logit_scale.exp()·cos on the same CLIP; hpsv2 = raw cosine in [-1, 1]."""
    images = rf.colour_images(NAMES, seed=5)
    enc = scorers["clip_score"].encoder
    cos = torch.nn.functional.cosine_similarity(enc.embed_images(images), enc.embed_texts(MATCHED))
    torch.testing.assert_close(scorers["clip_score"](images, MATCHED), 100 * cos.detach())
    scale = enc.model.logit_scale.exp().item()
    torch.testing.assert_close(scorers["pickscore"](images, MATCHED), scale * cos.detach())
    hps = scorers["hpsv2"](images, MATCHED)
    assert (hps.abs() <= 1).all()
    hps100 = load_scorer("hpsv2", scale=100.0, **_kwargs("hpsv2", ckpt))
    torch.testing.assert_close(hps100(images, MATCHED), 100 * hps)


def test_aesthetic_is_upstream_mlp_on_normalised_embedding(scorers, ckpt):
    from transformers import CLIPModel

    images = rf.colour_images(NAMES, seed=11)
    clip = CLIPModel.from_pretrained(ckpt["model"]).eval()
    with torch.no_grad():
        pixels = scorers["aesthetic"].encoder.preprocess(images)
        emb = clip.get_image_features(pixel_values=pixels).pooler_output
        expected = ckpt["mlp"](emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scorers["aesthetic"](images, MATCHED), expected)
    # the official key names, and the pickle loads to the same scores once opted in
    assert sorted(load_weights(ckpt["aes_st"])) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )
    from_pth = load_scorer(
        "aesthetic", **{**_kwargs("aesthetic", ckpt), "weights": ckpt["aes_pth"], "allow_pickle": True}
    )
    torch.testing.assert_close(from_pth(images, MATCHED), expected)


def test_hps_pickle_checkpoint_matches_safetensors(scorers, ckpt):
    images = rf.colour_images(NAMES, seed=13)
    hps_pt = load_scorer("hpsv2", **{**_kwargs("hpsv2", ckpt), "checkpoint": ckpt["oc_pt"], "allow_pickle": True})
    torch.testing.assert_close(hps_pt(images, MATCHED), scorers["hpsv2"](images, MATCHED), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "key"), [("hpsv2", "oc_pt"), ("clip_score_openclip", "oc_pt"), ("aesthetic", "aes_pth")]
)
def test_pickle_needs_opt_in(ckpt, name, key):
    arg = "weights" if name == "aesthetic" else "checkpoint"
    with pytest.raises(ValueError, match=r"allow_pickle=True") as err:
        load_scorer(name, **{**_kwargs(name, ckpt), arg: ckpt[key]})
    assert str(ckpt[key]) in str(err.value) and "\n" not in str(err.value)


def test_pickle_opt_in_still_refuses_code(tmp_path):
    """allow_pickle only admits tensors: torch.load(weights_only=True) rejects arbitrary objects."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Image.new("RGB", (1, 1))}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_weights(path, allow_pickle=True)


# ---- paired comparison helpers (diffalign compare) --------------------------------------------------------------


def test_wilson_interval_hand_value():
    """8/10, z=1.96: centre (0.8 + 0.19208)/1.38415 = 0.71674, half 1.96·sqrt(0.016 + 0.009604)/1.38415 = 0.22658."""
    from diffalign.rewards.compare import wilson_interval

    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)


def test_win_rate_counts_ties_as_half_and_swaps():
    from diffalign.rewards.compare import win_rate

    a, b = torch.tensor([3.0, 2.0, 1.0, 5.0]), torch.tensor([1.0, 2.0, 4.0, 0.0])
    ab, ba = win_rate(a, b), win_rate(b, a)
    assert (ab["wins"], ab["ties"], ab["losses"], ab["win_rate"]) == (2, 1, 1, 0.625)
    assert ba["win_rate"] == pytest.approx(1 - ab["win_rate"])
    assert ab["ci_low"] < 0.625 < ab["ci_high"]
    with pytest.raises(ValueError):
        win_rate(a, b[:3])


def test_mean_delta_bootstrap():
    from diffalign.rewards.compare import mean_delta

    const = mean_delta(torch.full((20,), 1.5), torch.zeros(20))
    assert const["mean_delta"] == const["ci_low"] == const["ci_high"] == 1.5
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, generator=g) + 0.3, torch.randn(200, generator=g)
    out = mean_delta(a, b)
    assert out["ci_low"] < out["mean_delta"] < out["ci_high"] and out["ci_low"] > 0
    assert mean_delta(a, b) == out  # seeded
