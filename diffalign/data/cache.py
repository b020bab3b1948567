"""The latent + text cache: what a cache folder holds, its key, and `CachedPairs`, which trains from it.

Layout of a cache folder (format 2; `build_cache` in cache_build.py writes it):
    build.json                 key + info of the build under way (written first; a rerun with the same key resumes)
    pairs-00000.safetensors    chunk 0 = pairs 0 .. S-1 of the source: x0_w, x0_l (n, C, h, w); size_info_w,
                               size_info_l (n, 4) long; label (n,); index (n,) long; caption (n,) long, the caption's
                               hash; with hflip also x0_w_flip, x0_l_flip, size_info_w_flip, size_info_l_flip (both
                               orientations, one picked per item). Metadata: the chunk's captions, skipped rows.
    text-00000.safetensors     unique captions, sorted by hash: caption (m,) long; cond.<key> (m, ...)
    empty.safetensors          cond.<key> (1, ...): the empty prompt's cond, swapped in for caption dropout
    build-log.jsonl            one line per shard written (file, rank, pid): what each run encoded
    build-phases.jsonl         one line per process and run: seconds encoding pairs, waiting, encoding text
    index.json                 key, info, pair and text shard lists, counts (written last: the cache is finished)

The text conditioning is stored once per unique caption (SDXL: 77 x 2048 + 1280 values, ~315 KB in fp16, against
~260 KB for the pair's two latents at 1024², and Pick-a-Pic v2 has ~16 pairs per caption). Latents and cond are
stored in the model's dtype unless asked otherwise. The key is a hash of (model path, VAE path, family, model
dtype, storage dtype, data source + options + resolution + hflip); `skip_bad_rows` is left out, so a build stopped
by a corrupt image resumes with `skip_bad_rows` and keeps the shards already encoded.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffalign.data.pairs import PreferencePairs, PreferencePairStream, item_draws
from diffalign.data.shards import ShardFile
from diffalign.errors import DiffalignError

CACHE_FORMAT = 2
SHARD_SIZE = 512
FLIP_KEYS = ("x0_w", "x0_l", "size_info_w", "size_info_l")


class CacheError(DiffalignError, ValueError):
    """A cache folder is unusable or was built for something else; the message names the folder."""


def cache_info(
    family,
    dataset: PreferencePairs | PreferencePairStream,
    model_path: str,
    vae_path: str = "",
    dtype: torch.dtype | None = None,
) -> dict:
    """Everything the cached tensors depend on (dtype: the storage dtype, None = the model's)."""
    data = {k: v for k, v in dataset.describe().items() if k != "skip_bad_rows"}  # changes no cached tensor
    return {
        "format": CACHE_FORMAT,
        "model": model_path,
        "vae": vae_path,
        "family": family.name,
        "dtype": str(family.dtype),
        "storage_dtype": str(dtype or family.dtype),
        "data": data,
    }


def cache_key(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def caption_hash(prompt: str) -> int:
    """A caption's id: the first 8 bytes of its SHA-256 as a signed int64 (collisions are checked at build)."""
    return struct.unpack("<q", hashlib.sha256(prompt.encode()).digest()[:8])[0]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_index(out_dir: str | os.PathLike) -> dict | None:
    """The cache's index.json, or None if `out_dir` holds no finished cache."""
    return read_json(Path(out_dir) / "index.json")


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The keys where two (nested) info dicts differ, as "a.b: old -> new"."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class CachedPairs(Dataset):
    """Pairs read from a cache folder, row by row (pread, see shards.py); needs no VAE or text encoder.

    Memory: the pair and text shard headers plus a caption-hash -> text row table (16 bytes per unique caption);
    the tensors are read per item, so a cache larger than RAM trains with a flat resident set. Prefetch comes from
    the DataLoader (num_workers x prefetch_factor batches ahead).

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
        if self.index["info"].get("format") != CACHE_FORMAT:
            raise CacheError(f"{self.dir}: cache format {self.index['info'].get('format')} != {CACHE_FORMAT}; rebuild")
        self.hflip = self.index["hflip"] if hflip is None else hflip
        if self.hflip and not self.index["hflip"]:
            raise CacheError(f"{self.dir}: hflip requested but the cache was built without flipped latents")
        if not 0.0 <= empty_prompt_prob <= 1.0:
            raise ValueError(f"empty_prompt_prob must be in [0, 1], got {empty_prompt_prob}")
        self.empty_prompt_prob, self.seed, self.epoch = empty_prompt_prob, seed, 0
        self.shards = [ShardFile(self.dir / s["file"]) for s in self.index["shards"]]
        self.starts = [0]
        for shard in self.index["shards"]:
            self.starts.append(self.starts[-1] + shard["pairs"])
        self.texts = [ShardFile(self.dir / name) for name in self.index["text"]]
        self.text_row: dict[int, tuple[int, int]] = {}  # caption hash -> (text shard, row)
        for k, text in enumerate(self.texts):
            for row, h in enumerate(text.column("caption").tolist()):
                self.text_row[h] = (k, row)
        empty = ShardFile(self.dir / "empty.safetensors")
        self._empty = {name.removeprefix("cond."): empty.row(name, 0) for name in empty.keys()}

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

    def empty_cond(self) -> dict[str, torch.Tensor]:
        """The empty prompt's cond, {key: (...)} without a batch dimension."""
        return self._empty

    def cond(self, caption: int) -> dict[str, torch.Tensor]:
        """The cond of the caption with hash `caption`, {key: (...)}."""
        k, row = self.text_row[caption]
        text = self.texts[k]
        return {n.removeprefix("cond."): text.row(n, row) for n in text.keys() if n.startswith("cond.")}

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        f, row = self.shards[k], i - self.starts[k]
        index = int(f.row("index", row))
        flip_w, flip_l, u = item_draws(self.seed, self.epoch, index)
        suffix = {"w": "_flip" if self.hflip and flip_w else "", "l": "_flip" if self.hflip and flip_l else ""}
        item = {name: f.row(f"{name}{suffix[name[-1]]}", row) for name in FLIP_KEYS}
        item["cond"] = dict(self._empty) if u < self.empty_prompt_prob else self.cond(int(f.row("caption", row)))
        item["label"] = float(f.row("label", row))
        item["index"] = index
        return item
