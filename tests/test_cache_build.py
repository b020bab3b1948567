"""Cache format 2 on tiny SD1.5 (assets/tiny, real components): captions stored once, storage dtype, bad input.

The 2-process build and the kill -9 resume are in test_cache_multiprocess.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from safetensors.torch import load_file
from test_cache import TINY, encoded_files

from diffalign.data import (
    CachedPairs,
    PreferencePairs,
    PreferencePairStream,
    build_cache,
    collate,
    load_preferences,
    model_inputs,
    read_index,
)
from diffalign.data.shards import ShardFile, write_shard
from diffalign.models import load_family

RES = 32


@pytest.fixture(scope="module")
def sd15():
    return load_family(str(TINY / "sd15"))


def _rows(n: int, captions: int) -> list[dict]:
    rows = make_rows(n, seed=5)
    for i, row in enumerate(rows):
        row["caption"] = f"caption {i % captions}"
    return rows


def _pairs(path, **kwargs) -> PreferencePairs:
    return PreferencePairs(load_preferences(str(path), drop_ties=False), RES, **kwargs)


def _text_rows(out: Path) -> int:
    return sum(ShardFile(out / name).rows("caption") for name in read_index(out)["text"])


def test_each_caption_is_encoded_once_and_pairs_point_at_it(tmp_path, sd15):
    small = write_parquet(tmp_path / "small.parquet", _rows(12, captions=3))
    big = write_parquet(tmp_path / "big.parquet", _rows(24, captions=3))
    options = dict(empty_prompt_prob=0.5, seed=2)
    out = build_cache(sd15, _pairs(small, **options), tmp_path / "c12", model_path="m", shard_size=5, progress=False)
    out24 = build_cache(sd15, _pairs(big, **options), tmp_path / "c24", model_path="m", shard_size=5, progress=False)
    index = read_index(out)
    assert index["pairs"] == 12 and index["captions"] == 3 and _text_rows(out) == 3
    assert read_index(out24)["captions"] == 3 and _text_rows(out24) == 3  # text grows with captions, not pairs
    text_bytes = [sum((c / name).stat().st_size for name in read_index(c)["text"]) for c in (out, out24)]
    assert text_bytes[0] == text_bytes[1]
    shard = ShardFile(out / index["shards"][0]["file"])
    assert not [k for k in shard.keys() if k.startswith("cond.")] and shard.rows("caption") == 5

    pairs, cached = _pairs(small, **options), CachedPairs(out, **options)
    uncached_batch = collate([pairs[i] for i in range(12)])
    assert "" in uncached_batch["prompt"] and len(set(uncached_batch["prompt"])) == 4  # 3 captions + dropped
    x0, cond, label = model_inputs(sd15, collate([cached[i] for i in range(12)]))
    x0_ref, cond_ref, label_ref = model_inputs(sd15, uncached_batch)
    assert torch.allclose(x0, x0_ref, atol=1e-5) and torch.equal(label, label_ref)
    assert torch.allclose(cond["prompt_embeds"], cond_ref["prompt_embeds"], atol=1e-5)


def test_storage_dtype_defaults_to_the_model_dtype_and_can_be_chosen(tmp_path, sd15):
    source = write_parquet(tmp_path / "p.parquet", _rows(6, captions=6))
    full = build_cache(sd15, _pairs(source), tmp_path / "fp32", model_path="m", progress=False)
    half = build_cache(sd15, _pairs(source), tmp_path / "fp16", model_path="m", dtype=torch.float16, progress=False)
    assert read_index(full)["key"] != read_index(half)["key"]
    for out, dtype in ((full, torch.float32), (half, torch.float16)):
        shard, text = ShardFile(out / "pairs-00000.safetensors"), ShardFile(out / "text-00000.safetensors")
        assert shard.tensors["x0_w"][0] == dtype and text.tensors["cond.prompt_embeds"][0] == dtype
        assert shard.tensors["size_info_w"][0] == torch.long and shard.tensors["label"][0] == torch.float32
    x0_full, cond_full, _ = model_inputs(sd15, collate([CachedPairs(full)[i] for i in range(6)]))
    x0_half, cond_half, _ = model_inputs(sd15, collate([CachedPairs(half)[i] for i in range(6)]))
    assert x0_half.dtype == torch.float32 and cond_half["prompt_embeds"].dtype == torch.float16
    assert torch.allclose(x0_half, x0_full, rtol=1e-2, atol=1e-3)
    assert torch.allclose(cond_half["prompt_embeds"].float(), cond_full["prompt_embeds"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_a_corrupt_image_deep_in_the_data_stops_the_build_then_skip_bad_rows_resumes(tmp_path, sd15, streaming):
    rows = _rows(24, captions=6)
    rows[19]["jpg_1"] = b"\xff\xd8 not a jpeg"  # passes the cheap checks, fails to decode
    source = write_parquet(tmp_path / "deep.parquet", rows)
    out = tmp_path / "cache"
    cfg = ["cache", f"model.path={TINY / 'sd15'}", f"data.source={source}", f"data.cache_dir={out}"]
    cfg += ["data.drop_ties=false", "data.cache_shard_size=4", f"data.streaming={str(streaming).lower()}"]
    cfg += [f"model.resolution={RES}"]
    assert main(cfg) == 2  # one line naming the file and row, printed by the CLI
    assert encoded_files(out) == [f"pairs-{c:05d}.safetensors" for c in range(4)]  # pairs 0-15 kept
    with pytest.raises(Exception, match=r"deep.parquet row 19: undecodable image"):
        kind = PreferencePairStream if streaming else PreferencePairs
        rows_ = load_preferences(str(source), drop_ties=False, streaming=streaming)
        build_cache(sd15, kind(rows_, RES), tmp_path / "direct", model_path="m", shard_size=4, progress=False)

    assert main([*cfg, "data.skip_bad_rows=true"]) == 0
    files = encoded_files(out)
    assert files[:4] == [f"pairs-{c:05d}.safetensors" for c in range(4)] and len(set(files)) == len(files)
    index = read_index(out)
    assert index["pairs"] == 23 and index["counts"]["bad_images"] == 1 and index["captions"] == 6
    cached = CachedPairs(out)
    assert [cached[i]["index"] for i in range(23)] == [i for i in range(24) if i != 19]


def test_shard_rows_read_with_pread_equal_safetensors(tmp_path):
    """ShardFile parses the safetensors layout itself: every row and column equals what safetensors loads."""
    tensors = {
        "x0": torch.randn(5, 4, 3, 2).to(torch.bfloat16),
        "half": torch.randn(5, 7).half(),
        "ids": torch.arange(5, dtype=torch.long) * 10**12,
        "label": torch.rand(5),
        "empty": torch.zeros(0, 3),
    }
    write_shard(tensors, tmp_path / "s.safetensors", {"note": "x"})
    loaded, shard = load_file(str(tmp_path / "s.safetensors")), ShardFile(tmp_path / "s.safetensors")
    assert shard.metadata == {"note": "x"} and set(shard.keys()) == set(loaded) and not list(tmp_path.glob("*.tmp-*"))
    for name, value in loaded.items():
        assert torch.equal(shard.column(name), value), name
        for i in range(value.shape[0]):
            assert torch.equal(shard.row(name, i), value[i]), (name, i)
    with pytest.raises(IndexError):
        shard.row("label", 5)
