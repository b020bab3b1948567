"""`diffalign score` and `diffalign compare` end to end through the CLI.

Real images: two sets generated with `diffalign generate` on the tiny SD1.5 pipeline, base and base + a seeded random
LoRA (same prompts and seeds), scored with the toy-world scorers and a tiny CLIP (reward_factory.py) through the
registry. Hand-made case: PIL-drawn shapes whose toy aesthetic order is known (vivid beats dull, equal ties).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import reward_factory as rf
import torch
from diffalign.pipelines.cli import main
from PIL import Image, ImageDraw

from diffalign.engine.report import MIN_TILE, pick_pairs, side_by_side
from diffalign.lora import add_lora, save_lora
from diffalign.models import load_family
from diffalign.rewards import TOY_DRIFT, load_scorer
from diffalign.rewards.compare import wilson_interval

REPO = Path(__file__).resolve().parents[1]
TINY_SD = REPO / "assets/tiny/sd15"
PROMPTS = ["a small red circle at the top left", "a large blue square at the center"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_manifest(folder: Path, rows: list[dict]) -> Path:
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def clip_args(tmp_path_factory) -> str:
    model, processor = rf.build_hf_clip(tmp_path_factory.mktemp("clip"), steps=10)
    return f"scorer_args={{clip_score: {{model: {model}, processor: {processor}, batch_size: 4}}}}"


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> tuple[Path, Path]:
    """(base, aligned) generate folders: 2 prompts x 2 seeds; aligned = base + a seeded random LoRA."""
    root = tmp_path_factory.mktemp("gen")
    family = load_family(str(TINY_SD))
    add_lora(family.denoiser, rank=4, alpha=4.0, target_modules=["to_q", "to_v"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:  # B = 0 at init (the LoRA would be a no-op); perturb it
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    save_lora(family, root / "lora")
    (root / "prompts.txt").write_text("\n".join(PROMPTS))
    common = ["generate", f"model.path={TINY_SD}", f"prompts_file={root / 'prompts.txt'}", "images_per_prompt=2"]
    common += ["steps=2"]
    assert main([*common, f"output_dir={root / 'base'}"]) == 0
    assert main([*common, f"loras=[{root / 'lora'}:1.0]", f"output_dir={root / 'aligned'}"]) == 0
    return root / "base", root / "aligned"


def test_score_generate_folder_writes_rows_matching_images(image_sets, clip_args, tmp_path, capsys):
    base, _ = image_sets
    out = tmp_path / "score"
    scorers = "scorers=[toy_aesthetic,toy_fidelity,clip_score]"
    assert main(["score", f"images={base}", scorers, clip_args, "batch_size=3", f"output_dir={out}"]) == 0
    assert "toy_fidelity" in capsys.readouterr().out
    rows, manifest = _jsonl(out / "scores.jsonl"), _jsonl(base / "manifest.jsonl")
    assert [(r["file"], r["prompt"], r["seed"]) for r in rows] == [
        (m["file"], m["prompt"], m["seed"]) for m in manifest
    ]
    # batch_size=3 over 4 images (batches 3 + 1) gives what one direct call on all images gives
    images = [Image.open(base / m["file"]).convert("RGB") for m in manifest]
    direct = load_scorer("toy_aesthetic")(images, [m["prompt"] for m in manifest])
    assert torch.allclose(torch.tensor([r["toy_aesthetic"] for r in rows]), direct, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    for name in ("toy_aesthetic", "toy_fidelity", "clip_score"):
        col = torch.tensor([r[name] for r in rows], dtype=torch.float64)
        s = summary["scorers"][name]
        assert s["n"] == 4 and s["mean"] == pytest.approx(float(col.mean()), abs=1e-6)
        assert s["std"] == pytest.approx(float(col.std()), abs=1e-6)
    assert all(0 <= r["toy_fidelity"] <= 1 for r in rows)


def test_score_plain_folder_with_prompt_or_prompts_file(image_sets, tmp_path):
    base, _ = image_sets
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("00001.png", "00000.png"):
        shutil.copy(base / name, folder / name)
    assert main(["score", f"images={folder}", f"prompt={PROMPTS[0]}", "scorers=[toy_fidelity]",
                 f"output_dir={tmp_path / 'a'}"]) == 0  # fmt: skip
    rows = _jsonl(tmp_path / "a/scores.jsonl")
    assert [(r["file"], r["prompt"], r["seed"]) for r in rows] == [("00000.png", PROMPTS[0], None),
                                                                   ("00001.png", PROMPTS[0], None)]  # fmt: skip
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    assert main(["score", f"images={folder}", f"prompts_file={tmp_path / 'p.txt'}", "scorers=[toy_fidelity]",
                 f"output_dir={tmp_path / 'b'}"]) == 0  # fmt: skip
    assert [r["prompt"] for r in _jsonl(tmp_path / "b/scores.jsonl")] == PROMPTS


def test_compare_lora_vs_base_outputs_parse_and_agree_with_pairs(image_sets, clip_args, tmp_path, capsys):
    base, aligned = image_sets
    out = tmp_path / "cmp"
    scorers = "scorers=[toy_aesthetic,toy_fidelity,clip_score]"
    assert main(["compare", f"base={base}", f"aligned={aligned}", scorers, clip_args, f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    pairs = _jsonl(out / "pairs.jsonl")
    assert report["images"] == len(pairs) == 4 and report["prompts"] == 2
    assert all(p["base_file"] == p["aligned_file"] for p in pairs)  # same generation order on both sides
    for name, r in report["scorers"].items():
        assert name in printed
        b = torch.tensor([p[f"{name}_base"] for p in pairs], dtype=torch.float64)
        a = torch.tensor([p[f"{name}_aligned"] for p in pairs], dtype=torch.float64)
        assert r["win_rate"] == pytest.approx(float((a > b).sum() + 0.5 * (a == b).sum()) / 4)
        assert r["mean_delta"] == pytest.approx(float((a - b).mean()), abs=1e-6)
        assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]
    # the LoRA changed the images, so the aesthetic scores differ
    assert report["scorers"]["toy_aesthetic"]["mean_delta"] != 0
    sheet = Image.open(out / "sheet.png")
    assert min(Image.open(base / "00000.png").size) < 128 and sheet.size[0] >= 2 * 2 * 128  # 2 pairs a row, upscaled
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "clip_score" in page  # report.png and sheet.png
    assert "held-out" not in page  # compare does not know how the prompts were chosen
    assert Image.open(out / "report.png").size[0] > 0


def test_compare_same_images_both_sides_is_half_and_zero(image_sets, tmp_path):
    """Same images on both sides, aligned manifest in reverse order: pairing is by (prompt, seed), not position."""
    base, _ = image_sets
    mirror = tmp_path / "mirror"
    shutil.copytree(base, mirror)
    _write_manifest(mirror, _jsonl(base / "manifest.jsonl")[::-1])
    out = tmp_path / "cmp"
    assert main(["compare", f"base={base}", f"aligned={mirror}", "scorers=[toy_aesthetic]", f"output_dir={out}"]) == 0
    r = json.loads((out / "report.json").read_text())["scorers"]["toy_aesthetic"]
    assert r["win_rate"] == 0.5 and r["mean_delta"] == 0.0 and r["delta_ci"] == [0.0, 0.0]
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(2.0, 4))


def _shape(colour: tuple[int, int, int]) -> Image.Image:
    """A toy-world-like image: a filled square on a flat light-grey background."""
    im = Image.new("RGB", (32, 32), (220, 220, 220))
    ImageDraw.Draw(im).rectangle([10, 10, 21, 21], fill=colour)
    return im


def test_compare_hand_made_wins_ties_losses(tmp_path):
    """Pairs (base, aligned): dull->vivid, dull->vivid, vivid->vivid (same image), vivid->dull.

    Toy aesthetic = 10 x chroma x cleanliness; vivid red chroma (230-20)/255 = 0.82 > dull (170-120)/255 = 0.20,
    both backgrounds flat. So 2 wins, 1 tie, 1 loss: win rate (2 + 0.5) / 4 = 0.625.
    """
    vivid, dull = _shape((230, 20, 20)), _shape((170, 120, 120))
    sides = {"base": [dull, dull, vivid, vivid], "aligned": [vivid, vivid, vivid, dull]}
    for side, images in sides.items():
        (tmp_path / side).mkdir()
        for i, im in enumerate(images):
            im.save(tmp_path / side / f"{i}.png")
        _write_manifest(tmp_path / side, [{"file": f"{i}.png", "prompt": "p", "seed": i} for i in range(4)])
    out = tmp_path / "cmp"
    assert main(["compare", f"base={tmp_path / 'base'}", f"aligned={tmp_path / 'aligned'}",
                 "scorers=[toy_aesthetic]", f"output_dir={out}"]) == 0  # fmt: skip
    r = json.loads((out / "report.json").read_text())["scorers"]["toy_aesthetic"]
    s_vivid, s_dull = load_scorer("toy_aesthetic")([vivid, dull]).tolist()
    assert s_vivid > s_dull
    assert r["win_rate"] == 0.625 and (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(2.5, 4))
    assert r["mean_delta"] == pytest.approx((s_vivid - s_dull) / 4, abs=1e-5)  # (+d + d + 0 - d) / 4
    assert r["mean_old"] == pytest.approx((2 * s_dull + 2 * s_vivid) / 4, abs=1e-5)


def _scene(offset: int = 0, background: tuple[int, int, int] = (220, 220, 220)) -> Image.Image:
    """A red square of side 12 (half-size 6) at (10 + offset .. 21 + offset, 10 .. 21) on a flat background."""
    im = Image.new("RGB", (32, 32), background)
    ImageDraw.Draw(im).rectangle([10 + offset, 10, 21 + offset, 21], fill=(230, 20, 20))
    return im


def _sides(tmp_path: Path, sides: dict[str, list[Image.Image]], prompt: str) -> dict[str, Path]:
    for side, images in sides.items():
        (tmp_path / side).mkdir()
        for i, im in enumerate(images):
            im.save(tmp_path / side / f"{i}.png")
        _write_manifest(
            tmp_path / side, [{"file": f"{i}.png", "prompt": prompt, "seed": i} for i in range(len(images))]
        )
    return {side: tmp_path / side for side in sides}


def test_compare_reports_toy_drift_next_to_the_reward(tmp_path, capsys):
    """Pairs (base, aligned): the same image, the square moved 2 px right, the background tinted by (+10, 0, -10)
    levels. Toy prompts, so drift is the toy drift scorers: the centre of the square, (16, 16), sits on the
    "center" anchor, so the moved square's position error is 2 px; background shift 255 x |(10, 0, -10) / 255| =
    sqrt(200) = 14.14 levels, in one pair of three; the moved square's outline: two 12 x 12 squares 2 px apart,
    overlap 10 x 12, union 14 x 12: 1 - 120 / 168 = 0.2857."""
    dirs = _sides(tmp_path, {"base": [_scene()] * 3, "aligned": [_scene(), _scene(2), _scene(0, (230, 220, 210))]},
                  "a large red square at the center")  # fmt: skip
    out = tmp_path / "cmp"
    assert main(["compare", f"base={dirs['base']}", f"aligned={dirs['aligned']}", "scorers=[toy_aesthetic]",
                 f"output_dir={out}"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    drift = json.loads((out / "report.json").read_text())["drift"]
    assert list(drift) == list(TOY_DRIFT) and "drift from the base" in printed
    pairs = _jsonl(out / "pairs.jsonl")
    assert [p["drift/toy_position_error"] for p in pairs] == pytest.approx([0.0, 2.0, 0.0], abs=1e-4)
    assert [p["drift/toy_background_shift"] for p in pairs] == pytest.approx([0.0, 0.0, 200**0.5], abs=1e-3)
    assert [p["drift/toy_outline_change"] for p in pairs] == pytest.approx([0.0, 1 - 120 / 168, 0.0], abs=1e-4)
    assert drift["toy_background_shift"]["mean_new"] == pytest.approx(200**0.5 / 3, abs=1e-3)
    assert drift["toy_background_shift"]["mean_old"] == 0.0  # the base against itself
    assert drift["toy_position_error"]["mean_delta"] == pytest.approx(2 / 3, abs=1e-4)
    assert "Drift from the base" in (out / "report.html").read_text()


def test_compare_drift_off_real_prompts_is_fd_cmmd_and_image_statistics(tmp_path):
    """Prompts that are not the toy world's: FD and CMMD of the aligned set to the base's own images (pixels), 0
    when the images are the base's; saturation and high-frequency energy per pair."""
    dirs = _sides(tmp_path, {"base": [_scene(k) for k in range(4)], "aligned": [_scene(k) for k in range(4)]},
                  "a photo of a cat")  # fmt: skip
    out = tmp_path / "cmp"
    assert main(["compare", f"base={dirs['base']}", f"aligned={dirs['aligned']}", "scorers=[toy_aesthetic]",
                 f"output_dir={out}"]) == 0  # fmt: skip
    drift = json.loads((out / "report.json").read_text())["drift"]
    assert list(drift) == ["fd", "cmmd", "saturation", "hf_energy"]
    assert drift["fd"]["value"] == pytest.approx(0.0, abs=1e-6) and drift["cmmd"]["value"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert drift["saturation"]["mean_delta"] == 0.0
    assert main(["compare", f"base={dirs['base']}", f"aligned={dirs['aligned']}", "scorers=[toy_aesthetic]",
                 "drift=[]", f"output_dir={tmp_path / 'none'}"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "none" / "report.json").read_text())["drift"] == {}


def test_score_with_base_feeds_the_base_relative_scorers(tmp_path, capsys):
    """score base=DIR pairs by (prompt, seed), in any order; without base= a base-relative scorer is one line."""
    dirs = _sides(tmp_path, {"base": [_scene()] * 2, "images": [_scene(0, (230, 220, 210)), _scene()]},
                  "a large red square at the center")  # fmt: skip
    _write_manifest(dirs["base"], _jsonl(dirs["base"] / "manifest.jsonl")[::-1])
    out = tmp_path / "s"
    assert main(["score", f"images={dirs['images']}", f"base={dirs['base']}",
                 "scorers=[toy_background_shift,toy_fidelity]", f"output_dir={out}"]) == 0  # fmt: skip
    rows = _jsonl(out / "scores.jsonl")
    assert [r["toy_background_shift"] for r in rows] == pytest.approx([200**0.5, 0.0], abs=1e-3)
    err = _error(capsys, ["score", f"images={dirs['images']}", "scorers=[toy_outline_change]"])
    assert "toy_outline_change' measures images against the base model's images" in err and "base=DIR" in err


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffalign: error:")]
    assert len(err) == 1, err  # one line (a progress bar may have started before it)
    return err[0]


def test_pairing_errors_name_the_item(image_sets, tmp_path, capsys):
    base, _ = image_sets
    rows = _jsonl(base / "manifest.jsonl")
    shifted = tmp_path / "shifted"
    shutil.copytree(base, shifted)
    _write_manifest(shifted, [{**r, "seed": r["seed"] + 100} if r["file"] == "00002.png" else r for r in rows])
    cmd = ["compare", f"base={base}", "scorers=[toy_aesthetic]", f"output_dir={tmp_path / 'o'}"]
    err = _error(capsys, [*cmd, f"aligned={shifted}"])
    assert "base image 00002.png" in err and f"{PROMPTS[1]!r}, seed 2" in err
    _write_manifest(shifted, rows + [{**rows[0], "file": "00003.png"}])
    assert "aligned: 00003.png and 00000.png have the same prompt" in _error(capsys, [*cmd, f"aligned={shifted}"])
    _write_manifest(shifted, rows + [{**rows[0], "seed": 7}])
    err = _error(capsys, [*cmd, f"aligned={shifted}"])
    assert "aligned image 00000.png" in err and "seed 7" in err
    (shifted / "manifest.jsonl").unlink()
    assert "has no manifest.jsonl" in _error(capsys, [*cmd, f"aligned={shifted}"])
    assert not (tmp_path / "o").exists()  # nothing written before the inputs check out


def test_score_bad_input_is_one_line_naming_it(image_sets, tmp_path, capsys):
    base, _ = image_sets
    cmd = ["score", "scorers=[toy_aesthetic]", f"output_dir={tmp_path / 'o'}"]
    assert "images: /nope not found" in _error(capsys, [*cmd, "images=/nope"])
    (tmp_path / "empty").mkdir()
    assert "no images" in _error(capsys, [*cmd, f"images={tmp_path / 'empty'}"])
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "00001.png").unlink()
    err = _error(capsys, [*cmd, f"images={broken / 'manifest.jsonl'}"])
    assert "manifest.jsonl:2: image" in err and "00001.png not found" in err
    err = _error(capsys, ["score", f"images={base}", "scorers=[toy_aesthetc]"])
    assert "scorers=['toy_aesthetc']: 'toy_aesthetc' is not known" in err and "did you mean 'toy_aesthetic'?" in err
    err = _error(capsys, ["score", f"images={base}", "scorers=[clip_score]", "scorer_args={clip_score: {modle: x}}"])
    assert "scorer_args.clip_score.modle" in err and "did you mean 'model'" in err
    assert "needs scorer_args.aesthetic.weights" in _error(capsys, ["score", f"images={base}", "scorers=[aesthetic]"])
    err = _error(capsys, ["score", f"images={base}", f"prompt={PROMPTS[0]}", "scorers=[toy_aesthetic]"])
    assert "has a manifest" in err
    folder = tmp_path / "plain"
    folder.mkdir()
    shutil.copy(base / "00000.png", folder / "a.png")
    err = _error(capsys, ["score", f"images={folder}", "prompt=a photo of a cat", "scorers=[toy_fidelity]"])
    assert "scorer 'toy_fidelity' on" in err and "a.png" in err and "names no toy-world attribute" in err


def test_pick_pairs_shows_the_largest_gains_then_the_largest_losses():
    deltas = [0.1, -0.5, 0.9, 0.0, -0.2, 0.3]
    assert pick_pairs(deltas, 4) == [2, 5, 1, 4]  # gains 0.9, 0.3; losses -0.5, -0.2
    assert pick_pairs(deltas, 3) == [2, 5, 1]
    assert pick_pairs(deltas[:2], 8) == [0, 1]  # fewer pairs than asked: all, by change


def test_side_by_side_tiles_are_nearest_upscaled_and_in_change_order(tmp_path):
    """32 px images: each tile is the image upscaled 4x with nearest (crisp pixels), base left of aligned, and the
    pair with the largest gain comes first."""
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(6)]
    base, aligned = imgs[:3], imgs[3:]
    scores_b = {"toy_aesthetic": [5.0, 5.0, 5.0], "toy_fidelity": [1.0, 1.0, 1.0]}
    scores_a = {"toy_aesthetic": [5.5, 4.0, 7.0], "toy_fidelity": [1.0, 0.75, 1.0]}
    prompts = ["a red circle", "a blue square", "a large green triangle at the top left"]
    shown = side_by_side(base, aligned, prompts, [0, 1, 2], scores_b, scores_a, tmp_path / "s.png", n_pairs=2, cols=1)
    assert shown == [2, 1]  # largest gain (+2.0), then largest loss (-1.0)
    sheet = Image.open(tmp_path / "s.png").convert("RGB")
    k = MIN_TILE // 32
    x0 = y0 = 6  # PAD, no title
    first_base = sheet.crop((x0, y0, x0 + 32 * k, y0 + 32 * k))
    assert first_base.tobytes() == base[2].resize((32 * k, 32 * k), Image.NEAREST).tobytes()
    first_aligned = sheet.crop((x0 + 32 * k + 6, y0, x0 + 64 * k + 6, y0 + 32 * k))
    assert first_aligned.tobytes() == aligned[2].resize((32 * k, 32 * k), Image.NEAREST).tobytes()
