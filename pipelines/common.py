"""Wiring shared by the programs: output folders, objective construction, opening pairs, image grids."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import time
from pathlib import Path

import torch
from PIL import Image

from diffalign.config import DataConfig, ModelConfig, ObjectiveConfig
from diffalign.data import (
    CachedPairs,
    PreferencePairs,
    PreferencePairStream,
    build_cache,
    load_preferences,
    read_index,
)
from diffalign.data.relabel import Relabeled, load_or_score, relabel
from diffalign.errors import DiffalignError
from diffalign.models import detect_family, load_family
from diffalign.objectives import OBJECTIVES
from diffalign.paths import TOY_TRAIN
from diffalign.rewards import load_scorer


def prepare_output_dir(path: str, resume: bool = False, default_name: str = "run") -> Path:
    """Create (or, with resume, reuse) a writable output folder; never write into a finished run by accident."""
    out = Path(path or f"runs/{default_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()) and not resume:
        raise DiffalignError(f"output folder {out} is not empty; pass --resume latest or choose another output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise DiffalignError(f"output folder {out} is not writable ({err.strerror})") from None
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(mcfg: ModelConfig, load_encoders: bool = True, device="cpu"):
    """The model family of `model.path` in `model.dtype` (with `model.vae_path` if set; with `model.quantize` the
    denoiser quantized for training on `device`)."""
    if mcfg.dtype not in DTYPES:
        raise DiffalignError(f"model.dtype must be one of {', '.join(DTYPES)}, not '{mcfg.dtype}'")
    extra = {}
    if mcfg.quantize != "none":
        key = detect_family(mcfg.path) if mcfg.family == "auto" else mcfg.family
        if key not in QUANTIZABLE:
            raise DiffalignError(
                f"model.quantize: family '{key}' has no quantized base yet ({', '.join(QUANTIZABLE)})"
            )
        extra = dict(quantize=mcfg.quantize, device=device)
    return load_family(
        mcfg.path,
        mcfg.family,
        dtype=DTYPES[mcfg.dtype],
        vae_path=mcfg.vae_path or None,
        load_encoders=load_encoders,
        **extra,
    )


QUANTIZABLE = ("flux",)  # families whose `load` takes quantize= (diffalign.quantize)


def build_objective(ocfg: ObjectiveConfig):
    """OBJECTIVES[name](...) with beta/sft_weight where the class has them, plus objective.extra."""
    if ocfg.name not in OBJECTIVES:
        close = difflib.get_close_matches(ocfg.name, list(OBJECTIVES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(OBJECTIVES)})"
        raise DiffalignError(f"unknown objective '{ocfg.name}'{hint}")
    cls = OBJECTIVES[ocfg.name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key in ("beta", "sft_weight"):
        value = getattr(ocfg, key)
        if value is not None and key not in fields:
            raise DiffalignError(f"objective.{key}: '{ocfg.name}' has no {key}")
        if value is not None:
            kwargs[key] = value
    for key, value in ocfg.extra.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (options: {', '.join(sorted(fields))})"
            raise DiffalignError(f"objective.extra.{key}: '{ocfg.name}' has no such option{hint}")
        kwargs[key] = value
    return cls(**kwargs)


def data_source(source: str) -> str:
    return str(TOY_TRAIN) if source == "toy" else source


def save_grid(images: list[Image.Image], path: Path, cols: int = 0) -> Path:
    """Tile PIL images into one PNG (atomically written)."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def cache_ready(dcfg: DataConfig) -> bool:
    """True when data.cache_dir holds a finished cache (then training needs no VAE encoder or text encoders)."""
    return bool(dcfg.cache_dir) and read_index(dcfg.cache_dir) is not None


def open_pairs(
    dcfg: DataConfig,
    family,
    resolution: int,
    seed: int,
    cfg_model: ModelConfig,
    progress: bool = True,
    work_dir: Path | None = None,
):
    """The training pairs as a map-style dataset: raw (decoded every step) or from the latent cache.

    With data.cache_dir the cache is built first if missing (this needs the encoders), or reused when its key
    (model, resolution, data options) matches; a cache made for something else is an error naming both keys.
    A streamed source can only be trained through the cache (the cache turns it into a map-style dataset).
    With data.label_scorer every pair is scored once (saved next to the cache, or in work_dir) and relabelled.
    """
    rows = load_preferences(
        data_source(dcfg.source),
        split=dcfg.split,
        streaming=dcfg.streaming,
        drop_ties=dcfg.drop_ties,
        skip_bad_rows=dcfg.skip_bad_rows,
    )
    pair_cls = PreferencePairStream if dcfg.streaming else PreferencePairs
    pairs = pair_cls(
        rows,
        resolution,
        hflip=dcfg.hflip,
        empty_prompt_prob=dcfg.empty_prompt_prob,
        max_pairs=dcfg.max_pairs,
        seed=seed,
    )
    labels = None
    if dcfg.label_scorer:
        if dcfg.streaming:
            raise DiffalignError("data.label_scorer needs a map-style source (not data.streaming)")
        where = Path(dcfg.cache_dir or work_dir or ".") / f"scores-{dcfg.label_scorer}.json"
        scores = load_or_score(where, pairs, dcfg.label_scorer, lambda: load_scorer(dcfg.label_scorer), progress)
        labels = relabel(scores, dcfg.label_mode, dcfg.score_min, dcfg.score_max)
    if dcfg.cache_dir:
        build_cache(
            family,
            pairs,
            dcfg.cache_dir,
            model_path=cfg_model.path,
            vae_path=cfg_model.vae_path,
            num_workers=dcfg.num_workers,
            progress=progress,
        )
        pairs = CachedPairs(dcfg.cache_dir, hflip=dcfg.hflip, empty_prompt_prob=dcfg.empty_prompt_prob, seed=seed)
    elif dcfg.streaming:
        raise DiffalignError("data.streaming=true needs data.cache_dir (stream once into the cache, then train)")
    return Relabeled(pairs, labels) if labels is not None else pairs
