"""The toy world: renderer <-> analyser round trip, the two toy rewards, the shipped toy model and dataset."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffalign.rewards import load_scorer
from diffalign.toy import shapes

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def scenes(n: int, seed: int = 0) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


def test_parse_prompt_names_the_four_attributes():
    assert shapes.parse_prompt("a small red circle at the top left") == {
        "shape": "circle",
        "colour": "red",
        "size": "small",
        "position": "top left",
    }
    assert shapes.parse_prompt("a large yellow square at the center")["position"] == "center"
    assert shapes.parse_prompt("a blue square") == {"shape": "square", "colour": "blue"}


def test_every_caption_word_is_one_token():
    from diffalign.models.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer(shapes.WORDS)
    caption = "a small red circle at the top left"
    assert len(tok.tokenize(caption)) == len(caption.split())


def test_analyse_reads_back_every_rendered_attribute():
    for scene in scenes(40):
        found = shapes.analyse(shapes.to_pil(shapes.render(scene)))
        assert found == {"shape": scene.shape, "colour": scene.colour, "size": scene.size, "position": scene.position}


def test_analyse_finds_no_shape_on_a_blank_image():
    assert shapes.analyse(np.full((32, 32, 3), 0.9, dtype=np.float32)) is None


def test_fidelity_is_one_on_ground_truth_and_lower_on_mismatched_prompts():
    fidelity = load_scorer("toy_fidelity")
    rendered = scenes(40, seed=1)
    images = [shapes.to_pil(shapes.render(s)) for s in rendered]
    captions = [s.caption for s in rendered]
    assert fidelity(images, captions).tolist() == [1.0] * 40
    assert fidelity(images, captions[1:] + captions[:1]).mean() < 0.7
    # one attribute changed -> 3 of 4 right; all four changed -> 0
    red = shapes.render(
        replace(
            rendered[0],
            colour="red",
            hue=0.0,
            shape="circle",
            size="small",
            position="center",
            cx=16.0,
            cy=16.0,
            half=4.5,
        )
    )
    prompts = [
        "a small red circle at the center",
        "a small blue circle at the center",
        "a large blue square at the top left",
    ]
    assert fidelity(torch.from_numpy(red).permute(2, 0, 1)[None].repeat(3, 1, 1, 1), prompts).tolist() == [1, 0.75, 0]


def test_aesthetic_prefers_vivid_shapes_and_clean_backgrounds():
    aesthetic = load_scorer("toy_aesthetic")
    base = scenes(1, seed=2)[0]
    vivid = shapes.render(replace(base, saturation=1.0, value=1.0))
    dull = shapes.render(replace(base, saturation=0.4, value=0.6))
    noisy = np.clip(vivid + np.random.default_rng(0).normal(0, 0.05, vivid.shape), 0, 1).astype(np.float32)
    scores = aesthetic([shapes.to_pil(im) for im in (vivid, dull, noisy)])  # (3,)
    assert scores.shape == (3,)
    assert 0 <= scores.min() and scores.max() <= 10
    assert scores[0] > scores[1] + 2 and scores[0] > scores[2]
    # tensor input in [0, 1] agrees with PIL input (up to uint8 rounding) and is differentiable
    x = torch.from_numpy(np.stack([vivid, dull])).permute(0, 3, 1, 2).requires_grad_(True)  # (2, 3, H, W)
    tensor_scores = aesthetic(x)
    assert torch.allclose(tensor_scores, scores[:2], atol=0.05)
    tensor_scores.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def toy_family():
    from diffalign.models import load_family

    torch.set_num_threads(2)
    return load_family("toy")


def test_shipped_toy_model_generates_deterministically(toy_family):
    assert toy_family.name == "toy" and toy_family.resolution == 32 and toy_family.prediction_type == "v_prediction"
    prompts = ["a small red circle at the top left", "a large blue square at the center"]
    first = toy_family.generate(prompts, seeds=[0, 1], steps=4, guidance=1.5)
    again = toy_family.generate(prompts, seeds=[0, 1], steps=4, guidance=1.5)
    alone = toy_family.generate(prompts[:1], seeds=[0], steps=4, guidance=1.5)  # image i depends on seed i only
    assert [im.size for im in first] == [(32, 32), (32, 32)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    # a different batch may change float summation order, hence the 1/255 tolerance
    assert np.abs(np.asarray(first[0], dtype=int) - np.asarray(alone[0], dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_toy_lora_defaults_to_attention_plus_resnet_convs(toy_family):
    """The toy UNet has attention only at 8x8; its default LoRA also adapts every resnet's conv1/conv2 (full
    resolution), and the "attention" preset leaves them out. Presets are per family: sd3 has no convolutions."""
    import copy

    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    from diffalign.lora import LoraError, lora_targets
    from diffalign.models.sd3 import SD3Family

    assert lora_targets(toy_family) == ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    assert lora_targets(toy_family, "attention") == ["to_q", "to_k", "to_v", "to_out.0"]
    assert lora_targets(toy_family, "", ["to_q"]) == ["to_q"]
    with pytest.raises(LoraError, match="sd3.*attention\\+conv"):
        lora_targets(SD3Family, "attention+conv")
    with pytest.raises(LoraError, match="not both"):
        lora_targets(toy_family, "attention", ["to_q"])
    unet = inject_adapter_in_model(
        PeftLoraConfig(r=2, target_modules=lora_targets(toy_family)), copy.deepcopy(toy_family.denoiser)
    )
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A" in n}
    full_res = [n for n in adapted if n.startswith("down_blocks.0.resnets.") and n.endswith(("conv1", "conv2"))]
    assert full_res and any(n.endswith("to_q") for n in adapted)


def test_shipped_toy_model_follows_prompts_above_chance(toy_family):
    combos = shapes.all_combinations()[::5]  # 16 of the 80 combinations, every attribute value present
    prompts = [shapes.caption(**c) for c in combos]
    images = toy_family.generate(prompts, seeds=list(range(len(prompts))), steps=20, guidance=1.5)
    fidelity = load_scorer("toy_fidelity")(images, prompts)  # (16,)
    # chance of the mean over the four attributes: (1/4 + 1/2 + 1/2 + 1/5) / 4 = 0.36
    assert fidelity.mean() > 0.75  # measured 0.98 on 1024 samples (assets/toy_data/stats.json)


def test_shipped_dataset_has_the_pick_a_pic_schema():
    df = pd.read_parquet(ASSETS / "toy_data" / "train.parquet")
    assert list(df.columns) == ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "ranking_id", "are_different"]
    assert str(df.label_0.dtype) == "float64" and str(df.label_1.dtype) == "float64"
    assert str(df.ranking_id.dtype) == "int64" and str(df.are_different.dtype) == "bool"
    assert df.ranking_id.is_unique
    assert set(df.label_0.round(3)) == {0.0, 0.3, 0.5, 0.7, 1.0}
    assert np.allclose(df.label_0 + df.label_1, 1.0)
    assert len(df) >= 1500 and df.caption.nunique() >= 50
    assert Image.open(io.BytesIO(df.jpg_0[0])).size == (32, 32)
    heldout = (ASSETS / "toy_data" / "heldout_prompts.txt").read_text().split("\n")
    heldout = {line for line in heldout if line}
    assert heldout and not heldout & set(df.caption)


def test_learning_curve_points_score_fixed_seeds_and_plot(toy_family, tmp_path):
    """A curve point is the mean reward of the same held-out prompts and seeds each time: two points of the same
    model are equal, and curves.png is drawn from them and the run's metrics."""
    from accelerate import Accelerator

    from diffalign.config import EvalConfig
    from diffalign.engine.curves import Curves, plot_curves

    curves = Curves(toy_family, EvalConfig(steps=4), tmp_path / "curves.jsonl")
    assert curves.label == "held-out" and len(curves.prompts) == 16
    first, again = curves.point(0, Accelerator(cpu=True)), curves.point(10, Accelerator(cpu=True))
    assert first["toy_aesthetic"] == again["toy_aesthetic"] and 0 < first["toy_aesthetic"] < 10
    assert "win/toy_aesthetic" not in first and again["win/toy_aesthetic"] == 0.5  # all ties with the base
    import copy

    from diffalign.lora import add_lora

    family = copy.copy(toy_family)  # a resumed run: the LoRA (zero at init) and no step-0 point in this process
    family.denoiser = copy.deepcopy(toy_family.denoiser)
    add_lora(family.denoiser, 4, 4, family.lora_target_modules)
    scorers = ["toy_aesthetic", "toy_background_shift"]  # a base-relative scorer measures against the base images
    resumed = Curves(family, EvalConfig(steps=4, curve_seeds=2, scorers=scorers), tmp_path / "resumed.jsonl")
    assert len(resumed.prompts) == 32 and len(set(resumed.seeds)) == 32
    point = resumed.point(7, Accelerator(cpu=True))
    assert point["win/toy_aesthetic"] == 0.5 and point["toy_background_shift"] == 0.0  # base sampled, adapters off
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 0.69, "implicit_acc": 0.5}\n')
    png = plot_curves(curves.path, tmp_path / "metrics.jsonl", tmp_path / "curves.png", curves.label)
    assert Image.open(png).size[0] > 400
    assert plot_curves(tmp_path / "none.jsonl", tmp_path / "metrics.jsonl", tmp_path / "x.png") is None


def test_toy_conv_lora_round_trips_through_the_diffusers_file(toy_family, tmp_path):
    """The default toy LoRA (attention + resnet convs) saved and reloaded gives the same outputs: every key is in
    one format, so diffusers' loader keeps both the attention and the conv weights."""
    import copy

    from diffalign.lora import add_lora, load_lora, lora_targets, save_lora
    from diffalign.models import load_family

    family = copy.copy(toy_family)
    family.denoiser = copy.deepcopy(toy_family.denoiser)
    add_lora(family.denoiser, 4, 4.0, lora_targets(family))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:  # B = 0 at init; perturb it so the LoRA changes the output
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    save_lora(family, tmp_path / "lora")
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 500])
    cond = family.encode_prompts(["a red circle", "a blue square"])
    reloaded = load_family("toy")
    load_lora(reloaded, tmp_path / "lora")
    with torch.no_grad():
        expected, got = family.denoise(x, t, cond), reloaded.denoise(x, t, cond)
        base = toy_family.denoise(x, t, cond)
    assert (expected - base).abs().max() > 1e-3  # the LoRA does something
    assert torch.allclose(got, expected, atol=1e-6)
