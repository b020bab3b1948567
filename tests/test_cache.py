"""The latent + text-embedding cache on the tiny SD1.5 and SDXL pipelines (assets/tiny, real components)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_factory import make_rows, write_parquet

from diffalign.data import (
    CachedPairs,
    CacheError,
    PreferencePairs,
    PreferencePairStream,
    build_cache,
    collate,
    load_preferences,
    model_inputs,
    read_index,
)
from diffalign.models import load_family

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny"
RES = 32
ENCODERS = {"sd15": ("vae", "text_encoder"), "sdxl": ("vae", "text_encoder", "text_encoder_2")}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(write_parquet(tmp_path_factory.mktemp("prefs") / "prefs.parquet", make_rows(12)))


def _pairs(source, res=RES, **kwargs):
    return PreferencePairs(load_preferences(source, drop_ties=False), res, **kwargs)


def _assert_same_inputs(a, b):
    (x0_a, cond_a, label_a), (x0_b, cond_b, label_b) = a, b
    assert x0_a.shape == x0_b.shape and torch.allclose(x0_a, x0_b, atol=1e-5)
    assert set(cond_a) == set(cond_b)
    for key in cond_a:
        assert cond_a[key].shape == cond_b[key].shape, key
        assert torch.allclose(cond_a[key].float(), cond_b[key].float(), atol=1e-5), key
    assert torch.equal(label_a, label_b)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_cached_batch_equals_uncached_batch_and_needs_no_encoders(tmp_path, source, name):
    family = load_family(str(TINY / name))
    options = dict(hflip=True, empty_prompt_prob=0.5, seed=7)
    pairs = _pairs(source, **options)
    out = build_cache(
        family, pairs, tmp_path / "cache", model_path=str(TINY / name), batch_size=5, shard_size=4, progress=False
    )
    index = read_index(out)
    assert index["pairs"] == 12 and [s["pairs"] for s in index["shards"]] == [4, 4, 4] and index["hflip"]
    cached = CachedPairs(out, empty_prompt_prob=0.5, seed=7)
    assert len(cached) == 12
    for epoch in (0, 1):
        pairs.set_epoch(epoch)
        cached.set_epoch(epoch)
        uncached_batch = collate([pairs[i] for i in range(12)])
        cached_batch = collate([cached[i] for i in range(12)])
        assert "" in uncached_batch["prompt"] and (uncached_batch["size_info_w"][:, 3] != 8).any()  # drops + flips
        expected = model_inputs(family, uncached_batch)
        got = model_inputs(family, cached_batch)
        _assert_same_inputs(got, expected)
        x0, cond, label = got
        assert x0.shape[0] == 24 and cond["size_info"].shape == (24, 4) and label.shape == (12,)

    light = load_family(str(TINY / name), load_encoders=False)
    assert all(getattr(light.pipe, component) is None for component in ENCODERS[name])
    x0, cond, label = model_inputs(light, collate([cached[i] for i in range(4)]))  # never touches an encoder
    t = torch.full((8,), 10, dtype=torch.long)
    assert light.denoise(x0, t, cond).shape == x0.shape


@pytest.fixture(scope="module")
def sd15():
    return load_family(str(TINY / "sd15"))


def test_existing_cache_is_reused_and_a_different_key_is_an_error(tmp_path, source, sd15):
    model = str(TINY / "sd15")
    out = build_cache(sd15, _pairs(source), tmp_path / "c", model_path=model, progress=False)
    stamp = (out / "index.json").stat().st_mtime_ns
    assert build_cache(sd15, _pairs(source), out, model_path=model, progress=False) == out
    assert (out / "index.json").stat().st_mtime_ns == stamp
    (phases,) = [json.loads(x) for x in (out / "build-phases.jsonl").read_text().splitlines()]  # the one build
    assert phases["rank"] == 0 and set(phases["phases"]) == {"pairs_s", "wait_pairs_s", "text_s"}
    assert all(v >= 0 for v in phases["phases"].values()) and phases["phases"]["pairs_s"] > 0
    old_key = read_index(out)["key"]
    with pytest.raises(CacheError) as err:
        build_cache(sd15, _pairs(source, res=16), out, model_path=model, progress=False)
    message = str(err.value)
    assert old_key in message and "data.resolution: 32 -> 16" in message and "\n" not in message
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a finished diffalign cache"):
        build_cache(sd15, _pairs(source), tmp_path / "other", model_path=model, progress=False)


class CrashingFamily:
    """The real family, except that encode_images raises after `calls` calls (a crash mid-write)."""

    def __init__(self, family, calls: int):
        self.family, self.calls = family, calls
        self.name, self.dtype = family.name, family.dtype

    def encode_images(self, pixels):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("simulated crash")
        return self.family.encode_images(pixels)

    def encode_prompts(self, prompts):
        return self.family.encode_prompts(prompts)


def encoded_files(out: Path) -> list[str]:
    """Every shard the builds of `out` encoded, in order, from build-log.jsonl (one line per shard written)."""
    return [json.loads(line)["file"] for line in (out / "build-log.jsonl").read_text().splitlines()]


def assert_same_cache(a: Path, b: Path) -> None:
    """Two caches give identical items (every tensor bitwise) for two epochs of flips and caption drops."""
    options = dict(hflip=read_index(a)["hflip"], empty_prompt_prob=0.5, seed=3)
    ca, cb = CachedPairs(a, **options), CachedPairs(b, **options)
    assert len(ca) == len(cb) and read_index(a)["counts"] == read_index(b)["counts"]
    for epoch in (0, 1):
        ca.set_epoch(epoch)
        cb.set_epoch(epoch)
        batch_a, batch_b = collate([ca[i] for i in range(len(ca))]), collate([cb[i] for i in range(len(cb))])
        for key, value in batch_a.items():
            if isinstance(value, dict):
                assert all(torch.equal(value[k], batch_b[key][k]) for k in value), key
            else:
                assert torch.equal(value, batch_b[key]) if isinstance(value, torch.Tensor) else value == batch_b[key]


def test_a_crash_keeps_finished_shards_and_the_rerun_encodes_only_the_rest(tmp_path, source, sd15):
    out = tmp_path / "cache"
    crashing = CrashingFamily(sd15, calls=3)  # 3 batches of 2 = 3 shards written, then the crash in the 4th
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(crashing, _pairs(source), out, model_path="m", batch_size=2, shard_size=2, progress=False)
    assert encoded_files(out) == [f"pairs-{c:05d}.safetensors" for c in range(3)]
    with pytest.raises(CacheError, match="no index.json"):
        CachedPairs(out)
    build_cache(sd15, _pairs(source), out, model_path="m", batch_size=2, shard_size=2, progress=False)  # rerun
    files = encoded_files(out)
    pairs_files = [f"pairs-{c:05d}.safetensors" for c in range(6)]
    assert files[:6] == pairs_files and sorted(set(files)) == sorted(files)  # nothing encoded twice
    assert [f for f in files if f.startswith("text-")] == [f"text-{j:05d}.safetensors" for j in range(6)]
    assert not list(out.glob("*.tmp-*"))
    fresh = build_cache(sd15, _pairs(source), tmp_path / "fresh", model_path="m", batch_size=2, shard_size=2)
    assert_same_cache(out, fresh)


def test_stream_cache_skips_bad_images_and_records_counts(tmp_path, sd15):
    rows = make_rows(6)
    rows[1]["jpg_0"] = b"garbage"
    source = str(write_parquet(tmp_path / "p.parquet", rows))
    stream = PreferencePairStream(load_preferences(source, streaming=True, skip_bad_rows=True), RES)
    out = build_cache(sd15, stream, tmp_path / "cache", model_path="m", batch_size=4, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["pairs"] == 4 and index["counts"]["ties"] == 1 and index["counts"]["bad_images"] == 1
    assert [CachedPairs(out)[i]["index"] for i in range(4)] == [0, 2, 3, 4]  # pair 1 (bad) skipped, ids kept
    with pytest.raises(CacheError, match="built without flipped latents"):
        CachedPairs(out, hflip=True)
