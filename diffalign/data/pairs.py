"""Preference pairs as torch datasets: decoded, ordered so w is the preferred image, augmented reproducibly.

Each item is a dict:
    pixels_w, pixels_l   (3, R, R) float in [-1, 1]
    size_info_w, size_info_l  (4,) long = (orig_h, orig_w, crop_top, crop_left)
    prompt               str ("" when caption dropout fires)
    label                float, probability that w is preferred (>= 0.5 after ordering)
    index                int, the pair's position in the source (after ties/bad rows/max_pairs)

Every random choice (flip w, flip l, drop caption) is drawn from `item_draws(seed, epoch, index)`, so it does not
depend on the order, the worker or the process that loads the item, and the cached dataset (cache.py) makes the
same choices. With `skip_bad_rows` an undecodable image makes the item None; `collate` drops it and counts it in
batch["skipped"]. Rows that fail the cheap checks (labels, prompt, ...) are counted in `.counts["bad"]` instead.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from diffalign.data.images import hflip as flip_image
from diffalign.data.images import load_image
from diffalign.data.readers import DataError, PreferenceRecord, PreferenceRows, PreferenceStream

logger = logging.getLogger(__name__)


def item_draws(seed: int, epoch: int, index: int) -> tuple[bool, bool, float]:
    """(flip w, flip l, uniform for caption dropout) for one pair; the same wherever and whenever it is drawn."""
    rng = np.random.default_rng([seed, epoch, index])
    flip_w, flip_l, u = rng.random(3)
    return bool(flip_w < 0.5), bool(flip_l < 0.5), float(u)


def load_pair(record: PreferenceRecord, resolution: int, index: int) -> dict:
    """Decode one record, ordered so w is the preferred image (ties keep image 0 as w); no augmentation."""
    if record.label_0 >= 0.5:
        src_w, src_l, label = record.image_0, record.image_1, record.label_0
    else:
        src_w, src_l, label = record.image_1, record.image_0, 1.0 - record.label_0
    pixels_w, size_info_w = load_image(src_w, resolution, record.where)
    pixels_l, size_info_l = load_image(src_l, resolution, record.where)
    return {
        "pixels_w": pixels_w,
        "pixels_l": pixels_l,
        "size_info_w": size_info_w,
        "size_info_l": size_info_l,
        "prompt": record.prompt,
        "label": float(label),
        "index": index,
    }


class _Augment:
    """Shared options of the two pair datasets and the augmentation they apply."""

    def __init__(self, resolution: int, hflip: bool, empty_prompt_prob: float, max_pairs: int, seed: int):
        if not 0.0 <= empty_prompt_prob <= 1.0:
            raise ValueError(f"empty_prompt_prob must be in [0, 1], got {empty_prompt_prob}")
        self.resolution, self.hflip, self.empty_prompt_prob = resolution, hflip, empty_prompt_prob
        self.max_pairs, self.seed, self.epoch = max_pairs, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """New flips / caption drops each epoch (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def augment(self, item: dict) -> dict:
        flip_w, flip_l, u = item_draws(self.seed, self.epoch, item["index"])
        if self.hflip and flip_w:
            item["pixels_w"], item["size_info_w"] = flip_image(item["pixels_w"], item["size_info_w"])
        if self.hflip and flip_l:
            item["pixels_l"], item["size_info_l"] = flip_image(item["pixels_l"], item["size_info_l"])
        if u < self.empty_prompt_prob:
            item["prompt"] = ""
        return item

    def _load(self, record: PreferenceRecord, index: int, skip_bad_rows: bool) -> dict | None:
        try:
            return load_pair(record, self.resolution, index)
        except DataError as err:
            if not skip_bad_rows:
                raise
            logger.warning("skipping %s", err)
            return None  # counted by `collate` (batch["skipped"]), which also works across DataLoader workers

    def describe(self, rows) -> dict:
        """What the cached content depends on (cache key); flips and caption dropout are applied later."""
        return dict(rows.options, resolution=self.resolution, max_pairs=self.max_pairs, hflip=self.hflip)


class PreferencePairs(_Augment, Dataset):
    """Map-style pairs over `load_preferences(...)` rows."""

    def __init__(
        self,
        rows: PreferenceRows,
        resolution: int,
        *,
        hflip: bool = False,
        empty_prompt_prob: float = 0.0,
        max_pairs: int = 0,
        seed: int = 0,
    ):
        super().__init__(resolution, hflip, empty_prompt_prob, max_pairs, seed)
        self.rows = rows

    def __len__(self) -> int:
        return min(len(self.rows), self.max_pairs) if self.max_pairs > 0 else len(self.rows)

    def load(self, index: int) -> dict | None:
        """The unaugmented pair (what the cache encodes)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._load(self.rows[index], index, self.rows.options["skip_bad_rows"])

    def __getitem__(self, index: int) -> dict | None:
        item = self.load(index)
        return None if item is None else self.augment(item)

    def describe(self) -> dict:
        return super().describe(self.rows)

    @property
    def counts(self):
        """The source's Counter: "kept", "ties", "bad" (rows failing the cheap checks; images: batch["skipped"])."""
        return self.rows.counts


class PreferencePairStream(_Augment, IterableDataset):
    """Streamed pairs in source order; with DataLoader workers, worker k takes the pairs with index % n == k.

    Every worker reads the whole stream and decodes only its share: for a remote dataset, use few workers (or
    cache once with num_workers=0), or the download is repeated per worker.
    """

    def __init__(
        self,
        stream: PreferenceStream,
        resolution: int,
        *,
        hflip: bool = False,
        empty_prompt_prob: float = 0.0,
        max_pairs: int = 0,
        seed: int = 0,
        augment: bool = True,
    ):
        super().__init__(resolution, hflip, empty_prompt_prob, max_pairs, seed)
        self.stream, self.apply_augment = stream, augment

    def __iter__(self):
        worker = get_worker_info()
        rank, world = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index, record in enumerate(self.stream):
            if self.max_pairs > 0 and index >= self.max_pairs:
                return
            if index % world != rank:
                continue
            item = self._load(record, index, self.stream.options["skip_bad_rows"])
            yield item if item is None or not self.apply_augment else self.augment(item)

    def plain(self) -> PreferencePairStream:
        """The same stream without flips or caption dropout (what the cache encodes)."""
        return PreferencePairStream(self.stream, self.resolution, max_pairs=self.max_pairs, augment=False)

    def describe(self) -> dict:
        return super().describe(self.stream)

    @property
    def counts(self):
        """The stream's Counter: "kept", "ties", "bad"; grows as the stream is read (in the reading process)."""
        return self.stream.counts


class _Plain(Dataset):
    """A map-style pairs dataset seen without augmentation."""

    def __init__(self, pairs: PreferencePairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict | None:
        return self.pairs.load(index)


def plain_view(dataset: PreferencePairs | PreferencePairStream) -> Dataset | IterableDataset:
    """The dataset's unaugmented pairs, for encoding into a cache."""
    return _Plain(dataset) if isinstance(dataset, PreferencePairs) else dataset.plain()


def collate(items: list[dict | None]) -> dict:
    """Stack items into a batch: tensors get a leading B, prompts stay a list; None items (skipped) are counted.

    Batch keys: size_info_w, size_info_l (B, 4) long; label (B,) float; index (B,) long; skipped int; and
    uncached: pixels_w, pixels_l (B, 3, R, R), prompt list[str] (B); cached: x0_w, x0_l (B, C, h, w),
    cond {key: (B, ...)}. If every item was skipped the batch is only {"skipped": n}.
    """
    kept = [item for item in items if item is not None]
    batch: dict = {"skipped": len(items) - len(kept)}
    if not kept:
        return batch
    for key, value in kept[0].items():
        values = [item[key] for item in kept]
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)  # B x (...) -> (B, ...)
        elif isinstance(value, dict):  # cached cond
            batch[key] = {k: torch.stack([v[k] for v in values]) for k in value}  # B x (...) -> (B, ...)
        elif key == "label":
            batch[key] = torch.tensor(values, dtype=torch.float32)  # (B,)
        elif key == "index":
            batch[key] = torch.tensor(values, dtype=torch.long)  # (B,)
        else:
            batch[key] = values
    return batch
