"""Seeded preference fixtures for the data tests: PIL-drawn images written as parquet, JSONL + files, saved datasets.

`make_rows(n, seed)` -> list of dicts {caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1}; the writers put the
same bytes into every source kind, so every kind must yield the same records.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS = ["red", "green", "blue", "orange", "purple", "black", "yellow", "cyan"]
# label_0 cycle: image 0 wins, image 1 wins, tie, soft 0.8, soft 0.3
LABELS = [1.0, 0.0, 0.5, 0.8, 0.3]


def draw_image(seed: int, size: tuple[int, int] = (48, 32), mode: str = "RGB") -> Image.Image:
    """A few seeded rectangles and an ellipse on a coloured background; size is (width, height)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, rng.choice(COLORS))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        x1, y1 = x0 + rng.randrange(4, size[0] // 2), y0 + rng.randrange(4, size[1] // 2)
        draw.rectangle([x0, y0, x1, y1], fill=rng.choice(COLORS))
    draw.ellipse([1, 1, size[0] // 3, size[1] // 3], fill=rng.choice(COLORS))
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_rows(n: int = 10, seed: int = 0) -> list[dict]:
    """Pick-a-Pic-shaped rows with non-square images of varied sizes and the LABELS cycle."""
    rows = []
    for i in range(n):
        sizes = [(48, 32), (32, 40), (40, 40)]
        label_0 = LABELS[i % len(LABELS)]
        rows.append(
            {
                "caption": f"a picture number {i}",
                "jpg_0": encode(draw_image(seed * 1000 + 2 * i, sizes[i % 3])),
                "jpg_1": encode(draw_image(seed * 1000 + 2 * i + 1, sizes[(i + 1) % 3])),
                "label_0": label_0,
                "label_1": 1.0 - label_0,
            }
        )
    return rows


def rows_table(rows: list[dict], extra_columns: bool = True) -> pa.Table:
    columns = {
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
        "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
        "label_0": pa.array([r["label_0"] for r in rows], pa.float64()),
        "label_1": pa.array([r["label_1"] for r in rows], pa.float64()),
    }
    if extra_columns:  # Pick-a-Pic v2 has these too; they must be ignored
        columns["ranking_id"] = pa.array(range(len(rows)), pa.int64())
        columns["model_0"] = pa.array(["sdxl"] * len(rows), pa.string())
    return pa.table(columns)


def write_parquet(path: Path, rows: list[dict], **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_table(rows, **kwargs), path)
    return path


def write_parquet_folder(folder: Path, rows: list[dict], shards: int = 2, split: str = "train") -> Path:
    """Pick-a-Pic layout: folder/data/{split}-0000k-of-0000n.parquet (plus a decoy validation shard)."""
    per = -(-len(rows) // shards)
    for k in range(shards):
        write_parquet(folder / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet", rows[k * per : (k + 1) * per])
    write_parquet(folder / "data" / "validation-00000-of-00001.parquet", make_rows(2, seed=99))
    return folder


def write_jsonl(folder: Path, rows: list[dict], name: str = "prefs.jsonl") -> Path:
    """images/ + a JSONL with chosen = image 0, rejected = image 1, label = label_0 (same records as parquet)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(rows):
        for k in (0, 1):
            (folder / "images" / f"{i}_{k}.jpg").write_bytes(r[f"jpg_{k}"])
        line = {"prompt": r["caption"], "chosen": f"images/{i}_0.jpg", "rejected": f"images/{i}_1.jpg"}
        if r["label_0"] != 1.0:
            line["label"] = r["label_0"]
        lines.append(json.dumps(line))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_saved_dataset(folder: Path, rows: list[dict]) -> Path:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    import datasets

    datasets.Dataset(rows_table(rows)).save_to_disk(str(folder))
    return folder
