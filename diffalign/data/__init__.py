"""Preference data: sources (parquet / HF datasets / JSONL), image preprocessing, pair datasets, latent cache.

Example (family = load_family(...); encoders are only needed to build the cache)::

    rows = load_preferences("pickapic/data", split="train")  # or streaming=True -> a stream
    pairs = PreferencePairs(rows, resolution=512, hflip=True, empty_prompt_prob=0.2, seed=0)
    build_cache(family, pairs, "cache/pickapic-sd15", model_path="runwayml/stable-diffusion-v1-5")
    data = CachedPairs("cache/pickapic-sd15", empty_prompt_prob=0.2, seed=0)
    sampler = ResumableSampler(len(data), seed=0)  # diffalign/data/sampler.py
    loader = DataLoader(data, batch_size=B, sampler=sampler, collate_fn=collate)
    x0, cond, label = model_inputs(family, next(iter(loader)))  # (2B, C, h, w), {k: (2B, ...)}, (B,)
"""

from diffalign.data.batches import model_inputs
from diffalign.data.cache import CachedPairs, CacheError, cache_info, cache_key, read_index
from diffalign.data.cache_build import build_cache
from diffalign.data.images import decode_image, hflip, load_image, resize_crop, to_rgb, to_tensor
from diffalign.data.pairs import (
    PreferencePairs,
    PreferencePairStream,
    collate,
    item_draws,
    load_pair,
    plain_view,
)
from diffalign.data.readers import DataError, PreferenceRecord, PreferenceRows, PreferenceStream, load_preferences

__all__ = [
    "CacheError",
    "CachedPairs",
    "DataError",
    "PreferencePairStream",
    "PreferencePairs",
    "PreferenceRecord",
    "PreferenceRows",
    "PreferenceStream",
    "build_cache",
    "cache_info",
    "cache_key",
    "collate",
    "decode_image",
    "hflip",
    "item_draws",
    "load_image",
    "load_pair",
    "load_preferences",
    "model_inputs",
    "plain_view",
    "read_index",
    "resize_crop",
    "to_rgb",
    "to_tensor",
]
