"""The bad-input corpus: one seeded writer per case, run through the CLI by tests/test_bad_inputs.py.

Each `CASES[name](folder)` writes its input under `folder` (offline, deterministic) and returns a `Case`: the CLI
arguments, and either the text the one-line error must contain (naming the file and row, key, component or path)
or None when the input is odd but valid and the run must succeed. `skip` names the cases that also run with
data.skip_bad_rows=true, where the bad row must be skipped and counted instead.

Decisions recorded here (and in the README's "Resuming and failures"):
  * labels: label_0 is a probability; soft values in [0, 1] are valid (JSONL/SmPO), outside [0, 1] or missing is
    an error; label_0 + label_1 must be 1.
  * huge prompts are truncated by the tokenizer to its 77 tokens (diffusers logs which part was dropped).
  * CMYK, palette, alpha, 1-bit and 16-bit images are converted to RGB (alpha composited on white).
  * duplicate Pick-a-Pic ranking_ids are kept (the official Diffusion-DPO code trains on the data as is), counted
    in counts["duplicate_ids"], reported in one warning and in the "data: ..." line.
  * LoRAs load only from .safetensors; scorer weights in a torch pickle need allow_pickle=True and are then read
    with torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_factory import draw_image, encode, make_rows, write_parquet

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/tiny/sd15_dpo.yaml")
SD15 = REPO / "assets/tiny/sd15"
# four non-tie pairs, batch 2, 2 steps: every pair is decoded once
TRAIN = ["train", CONFIG, f"model.path={SD15}", "train.max_steps=2", "train.batch_size=2", "train.tensorboard=false"]


@dataclass
class Case:
    argv: list[str]
    error: str | None  # text of the one-line error (None: the run must succeed)
    skip: bool = False  # also run with data.skip_bad_rows=true: the bad row is skipped and counted
    notes: dict = field(default_factory=dict)


def rows(n: int = 4) -> list[dict]:
    """Pick-a-Pic-shaped rows without ties (label_0 alternates 1, 0), so every row is a training pair."""
    out = make_rows(n, seed=11)
    for i, r in enumerate(out):
        r["label_0"], r["label_1"] = (1.0, 0.0) if i % 2 == 0 else (0.0, 1.0)
    return out


def _train(folder: Path, data: Path, *extra: str) -> list[str]:
    return [*TRAIN, f"data.source={data}", f"train.output_dir={folder / 'run'}", *extra]


def _bad_row(change: Callable[[dict], None], error: str, skip: bool = True):
    def make(folder: Path) -> Case:
        data = rows()
        change(data[1])
        src = write_parquet(folder / "pairs.parquet", data)
        return Case(_train(folder, src), f"{src} row 1: {error}", skip)

    return make


def truncated_parquet(folder: Path) -> Case:
    src = write_parquet(folder / "pairs.parquet", rows())
    src.write_bytes(src.read_bytes()[:-300])  # footer gone: a download cut short
    return Case(_train(folder, src), f"{src}: unreadable parquet, truncated or corrupt")


def renamed_column(folder: Path) -> Case:
    import pyarrow.parquet as pq

    src = write_parquet(folder / "pairs.parquet", rows())
    table = pq.read_table(src)
    pq.write_table(table.rename_columns(["prompt" if c == "caption" else c for c in table.column_names]), src)
    return Case(_train(folder, src), f"{src}: missing column 'caption' (columns: prompt, jpg_0")


def missing_column(folder: Path) -> Case:
    import pyarrow.parquet as pq

    src = write_parquet(folder / "pairs.parquet", rows())
    pq.write_table(pq.read_table(src).drop_columns(["label_1"]), src)
    return Case(_train(folder, src), f"{src}: missing column 'label_1'")


def huge_prompt(folder: Path) -> Case:
    data = rows()
    data[1]["caption"] = " ".join(["a very long prompt about a cat"] * 1000)  # 7000 words, ~7000 tokens
    return Case(_train(folder, write_parquet(folder / "pairs.parquet", data)), None)


def image_modes(folder: Path) -> Case:
    """CMYK JPEG, palette PNG (with and without transparency), RGBA, LA, 1-bit, grey and 16-bit grey PNGs."""
    images = [
        encode(draw_image(1, (40, 32), "CMYK"), "JPEG"),
        encode(draw_image(2, (32, 40), "P"), "PNG"),
        encode(draw_image(3, (48, 32), "RGBA"), "PNG"),
        encode(draw_image(4, (40, 40), "LA"), "PNG"),
        _palette_with_transparency(),
        encode(draw_image(6, (40, 32), "1"), "PNG"),
        encode(draw_image(7, (40, 32), "L"), "PNG"),
        encode(draw_image(8, (32, 32), "I;16"), "PNG"),
    ]
    data = rows()
    for i, r in enumerate(data):
        r["jpg_0"], r["jpg_1"] = images[2 * i], images[2 * i + 1]
    return Case(_train(folder, write_parquet(folder / "pairs.parquet", data)), None)


def _palette_with_transparency() -> bytes:
    img = draw_image(5, (32, 32), "P")
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


def duplicate_ids(folder: Path) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = write_parquet(folder / "pairs.parquet", rows())
    table = pq.read_table(src)
    ids = pa.array([7, 8, 7, 9], pa.int64())  # row 2 repeats row 0's ranking_id
    pq.write_table(table.set_column(table.column_names.index("ranking_id"), "ranking_id", ids), src)
    return Case(
        _train(folder, src),
        None,
        notes={"warning": f"1 rows repeat a ranking_id (kept; first: ranking_id 7 at {src} row 0 and {src} row 2)"},
    )


def model_missing_component(folder: Path) -> Case:
    model = folder / "sd15-no-vae"
    shutil.copytree(SD15, model, ignore=shutil.ignore_patterns("vae"))
    src = write_parquet(folder / "pairs.parquet", rows())
    return Case(_train(folder, src, f"model.path={model}"), f"{model}: missing component 'vae'")


def hub_id_offline(folder: Path) -> Case:
    src = write_parquet(folder / "pairs.parquet", rows())
    return Case(
        _train(folder, src, "model.path=someone/not-a-model"),
        "someone/not-a-model: no such local folder, and model_index.json cannot be fetched from the hub",
    )


def lora_for_another_base(folder: Path) -> Case:
    """An SDXL LoRA given to the SD1.5 model."""
    from diffalign.lora import add_lora, save_lora
    from diffalign.models import load_family

    sdxl = load_family(str(REPO / "assets/tiny/sdxl"))
    add_lora(sdxl.denoiser, 4, 4.0, sdxl.lora_target_modules)
    path = save_lora(sdxl, folder / "sdxl-lora")
    return Case(_generate(folder, path), f"{path}: LoRA ")  # "... targets X, which this base does not have" / shapes


def pickle_lora(folder: Path) -> Case:
    import torch

    path = folder / "lora.bin"
    torch.save({"unet.down_blocks.0.lora_A.weight": torch.zeros(4, 4)}, path)
    return Case(_generate(folder, path), f"{path}: LoRAs load only from .safetensors (pickle files can run code)")


def fake_safetensors_lora(folder: Path) -> Case:
    path = folder / "lora.safetensors"
    path.write_bytes(b"\x80\x04 this is a pickle renamed to .safetensors")
    return Case(_generate(folder, path), f"{path}: not a readable .safetensors file")


def _generate(folder: Path, lora: Path) -> list[str]:
    return [
        "generate",
        f"model.path={SD15}",
        "prompt=a cat",
        "steps=1",
        f"loras=[{lora}]",
        f"output_dir={folder / 'gen'}",
    ]


def unknown_config_key(folder: Path) -> Case:
    return Case(
        ["train", CONFIG, "train.max_step=3"], "unknown config key 'train.max_step'; did you mean 'max_steps'?"
    )


def wrong_type_in_config(folder: Path) -> Case:
    config = folder / "bad.yaml"
    config.write_text("train:\n  max_steps: many\n")
    return Case(["train", str(config)], f"{config}: train.max_steps='many': expected an integer")


def output_dir_under_a_file(folder: Path) -> Case:
    """Not writable for root too (chmod is ignored by root): the output folder's parent is a regular file."""
    (folder / "a-file").write_text("not a folder")
    src = write_parquet(folder / "pairs.parquet", rows())
    return Case(
        [*TRAIN, f"data.source={src}", f"train.output_dir={folder / 'a-file' / 'run'}"],
        f"output folder {folder / 'a-file' / 'run'} is not writable",
    )


def output_dir_not_empty(folder: Path) -> Case:
    (folder / "run").mkdir()
    (folder / "run" / "notes.txt").write_text("an earlier run's results")
    src = write_parquet(folder / "pairs.parquet", rows())
    return Case(_train(folder, src), f"output folder {folder / 'run'} is not empty; pass --resume latest")


CASES: dict[str, Callable[[Path], Case]] = {
    "corrupt image bytes": _bad_row(
        lambda r: r.update(jpg_0=b"\xff\xd8\xff\xe0 not really a JPEG"), "undecodable image"
    ),
    "truncated image": _bad_row(lambda r: r.update(jpg_1=r["jpg_1"][: len(r["jpg_1"]) // 2]), "undecodable image"),
    "zero-size image": _bad_row(lambda r: r.update(jpg_0=b""), "image 0 is zero-size"),
    "label outside [0, 1]": _bad_row(lambda r: r.update(label_0=2.0, label_1=-1.0), "label_0 = 2.0 is outside [0, 1]"),
    "missing label": _bad_row(lambda r: r.update(label_0=None), "missing or non-numeric label_0 (None)"),
    "labels do not sum to 1": _bad_row(lambda r: r.update(label_0=0.7, label_1=0.7), "label_0 + label_1 = 0.7 + 0.7"),
    "empty prompt": _bad_row(lambda r: r.update(caption=""), "empty prompt ('')"),
    "truncated parquet": truncated_parquet,
    "renamed column": renamed_column,
    "missing column": missing_column,
    "huge prompt": huge_prompt,
    "CMYK / palette / alpha / 16-bit images": image_modes,
    "duplicate ids": duplicate_ids,
    "model folder missing a component": model_missing_component,
    "hub id with HF_HUB_OFFLINE=1": hub_id_offline,
    "LoRA for another base": lora_for_another_base,
    "pickle LoRA": pickle_lora,
    "pickle renamed to .safetensors": fake_safetensors_lora,
    "unknown config key": unknown_config_key,
    "wrong type in config": wrong_type_in_config,
    "output folder not writable": output_dir_under_a_file,
    "output folder not empty": output_dir_not_empty,
}
