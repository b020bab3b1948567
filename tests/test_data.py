"""Preference sources, validation, image preprocessing and the pair datasets (no model needed)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from data_factory import (
    draw_image,
    encode,
    make_rows,
    write_jsonl,
    write_parquet,
    write_parquet_folder,
    write_saved_dataset,
)
from PIL import Image

from diffalign.data import (
    DataError,
    PreferencePairs,
    PreferencePairStream,
    PreferenceStream,
    collate,
    decode_image,
    hflip,
    load_image,
    load_preferences,
    resize_crop,
    to_rgb,
    to_tensor,
)

RES = 16


def _key(record) -> tuple:
    image = [r if isinstance(r, bytes) else Path(r).read_bytes() for r in (record.image_0, record.image_1)]
    return record.prompt, record.label_0, image[0], image[1]


@pytest.fixture(scope="module")
def rows():
    return make_rows(10)


@pytest.fixture
def sources(tmp_path, rows):
    return {
        "parquet file": str(write_parquet(tmp_path / "one.parquet", rows)),
        "parquet folder": str(write_parquet_folder(tmp_path / "pickapic", rows)),
        "saved dataset": str(write_saved_dataset(tmp_path / "saved", rows)),
        "jsonl": str(write_jsonl(tmp_path / "jsonl", rows)),
    }


# ------------------------------------------------------------------------------------------------ sources


def test_every_source_kind_yields_the_same_records(sources, rows):
    expected = [(r["caption"], r["label_0"], r["jpg_0"], r["jpg_1"]) for r in rows if r["label_0"] != 0.5]
    for kind, source in sources.items():
        got = load_preferences(source)
        assert [_key(r) for r in got] == expected, kind
        streamed = load_preferences(source, streaming=True)
        assert isinstance(streamed, PreferenceStream)
        assert [_key(r) for r in streamed] == expected, f"{kind} (streaming)"


def test_records_name_their_file_and_row(sources):
    rows = load_preferences(sources["parquet folder"])
    # 10 rows in two shards of 5; ties are rows 2 and 7 -> kept rows 0 1 3 4 | 5 6 8 9
    assert [(Path(r.file).name, r.row) for r in rows][3:6] == [
        ("train-00000-of-00002.parquet", 4),
        ("train-00001-of-00002.parquet", 0),
        ("train-00001-of-00002.parquet", 1),
    ]
    assert all("validation" not in r.file for r in rows)


def test_ties_dropped_by_default_and_kept_on_request(sources):
    dropped = load_preferences(sources["parquet file"])
    assert len(dropped) == 8 and dropped.counts["ties"] == 2 and dropped.counts["kept"] == 8
    kept = load_preferences(sources["jsonl"], drop_ties=False)
    assert len(kept) == 10 and [r.label_0 for r in kept].count(0.5) == 2


def test_soft_labels_and_pair_ordering(sources, rows):
    pairs = PreferencePairs(load_preferences(sources["parquet file"], drop_ties=False), RES)
    for i, row in enumerate(rows):
        item = pairs[i]
        key_w, key_l = ("jpg_0", "jpg_1") if row["label_0"] >= 0.5 else ("jpg_1", "jpg_0")
        assert item["label"] == pytest.approx(max(row["label_0"], 1 - row["label_0"]))
        assert torch.equal(item["pixels_w"], load_image(row[key_w], RES)[0])
        assert torch.equal(item["pixels_l"], load_image(row[key_l], RES)[0])
        assert item["prompt"] == row["caption"] and item["index"] == i
    assert [pairs[i]["label"] for i in range(5)] == pytest.approx([1.0, 1.0, 0.5, 0.8, 0.7])


def test_streaming_reads_local_parquet_without_materialising(sources, tmp_path, monkeypatch):
    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    stream = PreferencePairStream(load_preferences(sources["parquet folder"], streaming=True), RES, max_pairs=5)
    streamed = list(stream)
    assert list(cache.rglob("*.arrow")) == []  # nothing converted to Arrow on disk
    mapped = PreferencePairs(load_preferences(sources["parquet folder"]), RES, max_pairs=5)
    assert len(streamed) == len(mapped) == 5
    for a, b in zip(streamed, (mapped[i] for i in range(5))):
        assert a["index"] == b["index"] and a["prompt"] == b["prompt"] and torch.equal(a["pixels_w"], b["pixels_w"])


# ------------------------------------------------------------------------------------------------ validation


def _bad(tmp_path, rows, change, i=3):
    rows = [dict(r) for r in rows]
    change(rows[i])
    return str(write_parquet(tmp_path / "bad.parquet", rows))


BAD_ROWS = {
    "label outside [0, 1]": (lambda r: r.update(label_0=1.5, label_1=-0.5), "label_0 = 1.5 is outside [0, 1]"),
    "missing label": (lambda r: r.update(label_0=None), "missing or non-numeric label_0"),
    "labels do not sum to 1": (lambda r: r.update(label_0=1.0, label_1=1.0), "label_0 + label_1"),
    "empty prompt": (lambda r: r.update(caption="  "), "empty prompt"),
    "zero-size image": (lambda r: r.update(jpg_1=b""), "image 1 is zero-size"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_is_a_one_line_error_naming_file_and_row(tmp_path, rows, case):
    change, message = BAD_ROWS[case]
    source = _bad(tmp_path, rows, change)
    with pytest.raises(DataError) as err:
        load_preferences(source)
    assert f"{source} row 3: {message}" in str(err.value) and "\n" not in str(err.value)
    skipped = load_preferences(source, skip_bad_rows=True)
    assert skipped.counts["bad"] == 1 and len(skipped) == 7 and all(r.row != 3 for r in skipped)
    with pytest.raises(DataError, match="row 3"):
        list(load_preferences(source, streaming=True))


def test_undecodable_image_fails_at_load_or_is_skipped_and_counted(tmp_path, rows):
    source = _bad(tmp_path, rows, lambda r: r.update(jpg_0=b"not an image at all"), i=0)
    pairs = PreferencePairs(load_preferences(source), RES)
    with pytest.raises(DataError) as err:
        pairs[0]
    assert f"{source} row 0: undecodable image" in str(err.value) and "\n" not in str(err.value)
    pairs = PreferencePairs(load_preferences(source, skip_bad_rows=True), RES)
    batch = collate([pairs[i] for i in range(4)])
    assert batch["skipped"] == 1 and batch["index"].tolist() == [1, 2, 3] and pairs.counts["bad"] == 0
    stream = PreferencePairStream(load_preferences(source, streaming=True, skip_bad_rows=True), RES)
    batch = collate(list(stream))
    assert batch["skipped"] == 1 and batch["index"].tolist() == list(range(1, 8))
    assert collate([None, None]) == {"skipped": 2}
    truncated = encode(draw_image(0), "PNG")[:-40]
    with pytest.raises(DataError, match="undecodable"):
        decode_image(truncated, "x row 1")


def test_missing_column_names_it_and_lists_the_others(tmp_path, rows):
    source = write_parquet(tmp_path / "renamed.parquet", rows)
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    pq.write_table(table.rename_columns(["prompt" if c == "caption" else c for c in table.column_names]), source)
    with pytest.raises(DataError, match=r"renamed.parquet: missing column 'caption' \(columns: prompt, jpg_0"):
        load_preferences(str(source))
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text(json.dumps({"caption": "x", "chosen": "a.png", "rejected": "b.png"}) + "\n")
    with pytest.raises(DataError, match=r"j.jsonl row 0: missing key 'prompt' \(keys: caption, chosen, rejected\)"):
        load_preferences(str(jsonl))


def test_empty_and_truncated_files(tmp_path, rows):
    empty = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match="empty.parquet: empty file"):
        load_preferences(str(empty))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        load_preferences(str(tmp_path / "empty.jsonl"))
    whole = write_parquet(tmp_path / "t.parquet", rows).read_bytes()
    (tmp_path / "t.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="t.parquet: unreadable parquet, truncated or corrupt"):
        load_preferences(str(tmp_path / "t.parquet"))


def test_jsonl_missing_image_file_and_default_label(tmp_path, rows):
    path = write_jsonl(tmp_path, rows[:2])
    assert [r.label_0 for r in load_preferences(str(path))] == [1.0, 0.0]  # row 0 had no "label" key
    (tmp_path / "images" / "1_1.jpg").unlink()
    with pytest.raises(DataError, match=r"prefs.jsonl row 1: rejected image not found"):
        load_preferences(str(path))


# ------------------------------------------------------------------------------------------------ images


def test_modes_convert_to_rgb_with_alpha_on_white():
    rgb = draw_image(3, (20, 20))
    for mode in ("CMYK", "P", "L", "1", "I;16", "RGBA", "LA"):
        assert to_rgb(rgb.convert(mode)).mode == "RGB", mode
    assert to_rgb(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    clear.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(clear)
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    palette = clear.convert("P")
    palette.info["transparency"] = palette.getpixel((1, 1))
    assert to_rgb(palette).getpixel((1, 1)) == (255, 255, 255)
    cmyk = decode_image(encode(rgb.convert("CMYK"), "JPEG"))
    assert cmyk.mode == "CMYK" and to_rgb(cmyk).mode == "RGB"


def test_resize_center_crop_size_info_and_flip():
    img = Image.new("RGB", (50, 20), "black")
    img.paste((255, 255, 255), (0, 0, 25, 20))  # left half white
    crop, size_info = resize_crop(img, 10)  # (50, 20) -> (25, 10); left = round(7.5) = 8
    assert crop.size == (10, 10) and size_info == (20, 50, 0, 8)
    pixels = to_tensor(crop)
    assert pixels.shape == (3, 10, 10) and pixels.min() == -1.0 and pixels.max() == 1.0
    assert (pixels[:, :, :4] == 1).all() and (pixels[:, :, 6:] == -1).all()  # columns 8..11 white, 14.. black
    flipped, flipped_info = hflip(pixels, torch.tensor(size_info))
    assert torch.equal(flipped, pixels.flip(-1)) and flipped_info.tolist() == [20, 50, 0, 2]  # 10 - 8, as diffusers
    tall, info = resize_crop(Image.new("RGB", (30, 45)), 20)  # (30, 45) -> (20, 30); top = 5
    assert tall.size == (20, 20) and info == (45, 30, 5, 0)


def test_load_image_reads_bytes_and_paths_alike(tmp_path):
    data = encode(draw_image(5), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    a, b = load_image(data, RES), load_image(str(tmp_path / "a.png"), RES)
    assert torch.equal(a[0], b[0]) and a[1].tolist() == [32, 48, 0, 4] and a[1].dtype == torch.long
    assert torch.equal(
        a[0],
        to_tensor(Image.open(io.BytesIO(data)).convert("RGB").resize((24, 16), Image.BILINEAR).crop((4, 0, 20, 16))),
    )


# ------------------------------------------------------------------------------------------------ determinism


def test_augmentation_is_reproducible(sources):
    def items(seed, epoch=0):
        pairs = PreferencePairs(
            load_preferences(sources["parquet file"]), RES, hflip=True, empty_prompt_prob=0.5, seed=seed
        )
        pairs.set_epoch(epoch)
        return [pairs[i] for i in range(len(pairs))]

    a, b, c = items(0), items(0), items(0, epoch=1)
    for x, y in zip(a, b):
        assert x["prompt"] == y["prompt"] and torch.equal(x["pixels_w"], y["pixels_w"])
        assert torch.equal(x["size_info_l"], y["size_info_l"])
    assert "" in [x["prompt"] for x in a] and any(x["prompt"] for x in a)
    flips = [(x["size_info_w"] != y["size_info_w"]).any() for x, y in zip(a, c)]
    assert any(flips)  # a new epoch draws new flips


def test_max_pairs_and_collate_shapes(sources):
    pairs = PreferencePairs(load_preferences(sources["jsonl"]), RES, max_pairs=3)
    batch = collate([pairs[i] for i in range(len(pairs))])
    assert len(pairs) == 3 and batch["pixels_w"].shape == (3, 3, RES, RES) and batch["size_info_l"].shape == (3, 4)
    assert batch["label"].dtype == torch.float32 and batch["index"].tolist() == [0, 1, 2] and batch["skipped"] == 0
    with pytest.raises(IndexError):
        pairs.load(3)
