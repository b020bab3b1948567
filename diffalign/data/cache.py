"""Encode every pair once (VAE latents + prompt cond) to safetensors shards; train from them without the encoders.

Layout of a cache folder:
    index.json                 key, what the key was computed from, shard list, counts (written last)
    empty.safetensors          cond.<key> (1, ...): the empty prompt's cond, swapped in for caption dropout
    shard-00000.safetensors    x0_w, x0_l (n, C, h, w); size_info_w, size_info_l (n, 4) long; label (n,);
                               index (n,) long; cond.<key> (n, ...); with hflip also x0_w_flip, x0_l_flip,
                               size_info_w_flip, size_info_l_flip (both orientations, one picked per item)

The key is a hash of (model path, VAE path, family, dtype, data source + options + resolution + hflip). The folder
is written under a temporary name and renamed at the end, so a crash never leaves a partial cache at `out_dir`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.data.images import hflip as flip_image
from diffalign.data.pairs import PreferencePairs, PreferencePairStream, collate, item_draws, plain_view
from diffalign.errors import DiffalignError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SHARD_SIZE = 512
FLIP_KEYS = ("x0_w", "x0_l", "size_info_w", "size_info_l")


class CacheError(DiffalignError, ValueError):
    """A cache folder is unusable or was built for something else; the message names the folder."""


def cache_info(family, dataset: PreferencePairs | PreferencePairStream, model_path: str, vae_path: str = "") -> dict:
    """Everything the cached tensors depend on."""
    return {
        "format": CACHE_FORMAT,
        "model": model_path,
        "vae": vae_path,
        "family": family.name,
        "dtype": str(family.dtype),
        "data": dataset.describe(),
    }


def cache_key(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def read_index(out_dir: str | os.PathLike) -> dict | None:
    """The cache's index.json, or None if `out_dir` holds no finished cache."""
    index = Path(out_dir) / "index.json"
    return json.loads(index.read_text()) if index.is_file() else None


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _encode(family, batch: dict, hflip: bool) -> dict[str, torch.Tensor]:
    """One collated batch of B pairs -> the tensors one shard holds for them."""
    pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])  # 2 x (B, 3, R, R) -> (2B, 3, R, R)
    x0_w, x0_l = family.encode_images(pixels).chunk(2)  # (2B, C, h, w) -> 2 x (B, C, h, w)
    out = {
        "x0_w": x0_w,
        "x0_l": x0_l,
        "size_info_w": batch["size_info_w"],
        "size_info_l": batch["size_info_l"],
        "label": batch["label"],
        "index": batch["index"],
    }
    if hflip:
        sizes = torch.cat([batch["size_info_w"], batch["size_info_l"]])  # (2B, 4)
        pixels, sizes = flip_image(pixels, sizes)
        out["x0_w_flip"], out["x0_l_flip"] = family.encode_images(pixels).chunk(2)  # (2B, C, h, w) -> 2 x (B, ...)
        out["size_info_w_flip"], out["size_info_l_flip"] = sizes.chunk(2)  # (2B, 4) -> 2 x (B, 4)
    for key, value in family.encode_prompts(batch["prompt"]).items():
        out[f"cond.{key}"] = value  # (B, ...)
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def build_cache(
    family,
    dataset: PreferencePairs | PreferencePairStream,
    out_dir: str | os.PathLike,
    *,
    model_path: str,
    vae_path: str = "",
    batch_size: int = 16,
    shard_size: int = SHARD_SIZE,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Encode every pair of `dataset` with `family` into `out_dir`; reuse it if it exists with the same key.

    `dataset` decides the source, resolution and hflip (both orientations are stored if set); its caption dropout
    is ignored here (CachedPairs applies it). Call on one process only (e.g. under accelerator.main_process_first).
    Returns `out_dir`. Raises CacheError if `out_dir` holds a cache with another key or something else.
    """
    out_dir = Path(out_dir)
    info = cache_info(family, dataset, model_path, vae_path)
    key = cache_key(info)
    existing = read_index(out_dir)
    if existing is not None:
        if existing["key"] == key:
            logger.info("reusing cache %s (key %s, %d pairs)", out_dir, key, existing["pairs"])
            return out_dir
        diff = "; ".join(_differences(existing["info"], info))
        raise CacheError(
            f"{out_dir}: cache key {existing['key']} != requested {key} ({diff}); delete it or use another dir"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CacheError(f"{out_dir}: exists, is not empty and has no index.json (not a finished diffalign cache)")

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        loader = DataLoader(plain_view(dataset), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
        shards, buffer, pairs, skipped = [], [], 0, 0

        def flush() -> None:
            tensors = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}  # list of (b, ...) -> (n, ...)
            name = f"shard-{len(shards):05d}.safetensors"
            _save(tensors, tmp / name)
            shards.append({"file": name, "pairs": len(tensors["label"])})
            buffer.clear()

        for batch in tqdm(loader, desc=f"caching {out_dir.name}", disable=not progress):
            skipped += batch["skipped"]
            if "label" not in batch:  # every item of this batch was skipped
                continue
            buffer.append(_encode(family, batch, dataset.hflip))
            pairs += len(batch["label"])
            if sum(len(b["label"]) for b in buffer) >= shard_size:
                flush()
        if buffer:
            flush()
        if pairs == 0:
            raise CacheError(f"{out_dir}: no pairs to cache ({skipped} skipped)")
        empty = {f"cond.{k}": v for k, v in family.encode_prompts([""]).items()}  # (1, ...)
        _save(empty, tmp / "empty.safetensors")
        counts = dict(dataset.counts, bad_images=skipped)  # bad_images: items collate dropped (undecodable)
        index = {"key": key, "info": info, "pairs": pairs, "hflip": dataset.hflip, "shards": shards, "counts": counts}
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cached %d pairs to %s (key %s, counts %s)", pairs, out_dir, key, counts)
    return out_dir


class CachedPairs(Dataset):
    """Pairs read from a cache folder (memory-mapped safetensors); needs no VAE or text encoder.

    Items: x0_w, x0_l (C, h, w); size_info_w, size_info_l (4,) long; cond {key: (...)}; label float; index int.
    Flips (if the cache has both orientations and `hflip`) and caption dropout use `item_draws`, as
    PreferencePairs does, so an item equals the cached encoding of the same uncached item.
    """

    def __init__(
        self, cache_dir: str | os.PathLike, *, hflip: bool | None = None, empty_prompt_prob: float = 0.0, seed: int = 0
    ):
        self.dir = Path(cache_dir)
        self.index = read_index(self.dir)
        if self.index is None:
            raise CacheError(f"{self.dir}: no index.json (not a finished diffalign cache)")
        self.hflip = self.index["hflip"] if hflip is None else hflip
        if self.hflip and not self.index["hflip"]:
            raise CacheError(f"{self.dir}: hflip requested but the cache was built without flipped latents")
        if not 0.0 <= empty_prompt_prob <= 1.0:
            raise ValueError(f"empty_prompt_prob must be in [0, 1], got {empty_prompt_prob}")
        self.empty_prompt_prob, self.seed, self.epoch = empty_prompt_prob, seed, 0
        self.starts = [0]
        for shard in self.index["shards"]:
            self.starts.append(self.starts[-1] + shard["pairs"])
        self._files: dict[int, object] = {}  # shard number -> open safe_open handle (per process, not pickled)
        self._empty: dict[str, torch.Tensor] | None = None

    @property
    def key(self) -> str:
        return self.index["key"]

    @property
    def counts(self) -> dict:
        """What the source dropped when the cache was built: "kept", "ties", "bad", "bad_images", ..."""
        return self.index["counts"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _files={}, _empty=None)

    def _handle(self, k: int):
        if k not in self._files:
            self._files[k] = safe_open(str(self.dir / self.index["shards"][k]["file"]), framework="pt")
        return self._files[k]

    def empty_cond(self) -> dict[str, torch.Tensor]:
        """The empty prompt's cond, {key: (...)} without a batch dimension."""
        if self._empty is None:
            with safe_open(str(self.dir / "empty.safetensors"), framework="pt") as f:
                self._empty = {k.removeprefix("cond."): f.get_tensor(k)[0] for k in f.keys()}
        return self._empty

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        f, row = self._handle(k), i - self.starts[k]
        index = int(f.get_slice("index")[row])
        flip_w, flip_l, u = item_draws(self.seed, self.epoch, index)
        suffix = {"w": "_flip" if self.hflip and flip_w else "", "l": "_flip" if self.hflip and flip_l else ""}
        item = {name: f.get_slice(f"{name}{suffix[name[-1]]}")[row] for name in FLIP_KEYS}
        if u < self.empty_prompt_prob:
            item["cond"] = dict(self.empty_cond())
        else:
            item["cond"] = {n.removeprefix("cond."): f.get_slice(n)[row] for n in f.keys() if n.startswith("cond.")}
        item["label"] = float(f.get_slice("label")[row])
        item["index"] = index
        return item
