"""Wiring shared by the programs: output folders, objective construction, opening pairs, image grids."""

from __future__ import annotations

import difflib
import json
import math
import os
import time
from pathlib import Path

import torch
from PIL import Image

from diffalign.config import DataConfig, LoraConfig, ModelConfig, ObjectiveConfig
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
from diffalign.lora import lora_targets
from diffalign.models import detect_family, load_family, resolve_path
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


def load_model(
    mcfg: ModelConfig,
    load_encoders: bool = True,
    lora: LoraConfig | None = None,
    sizes: dict[str, int] | None = None,
    device="cpu",
):
    """The model family of `model.path` in `model.dtype` (with `model.vae_path` if set; with `model.quantize` the
    denoiser quantized for training on `device`), checked against the settings that depend on the model:
    model.resolution (plus `sizes`, e.g. {"height": 768}) must be multiples of its latent factor (read from a local
    folder's config files before loading, else after), and `lora.target_modules` must name layers of its denoiser
    (after loading). Nothing has been written yet."""
    sizes = {"model.resolution": mcfg.resolution, **(sizes or {})}
    folder = Path(resolve_path(mcfg.path))
    if (folder / "model_index.json").is_file():
        check_sizes(sizes, folder_latent_factor(folder), mcfg.path)
    extra = {}
    if mcfg.quantize != "none":
        key = detect_family(mcfg.path) if mcfg.family == "auto" else mcfg.family
        if key not in QUANTIZABLE:
            raise DiffalignError(
                f"model.quantize: family '{key}' has no quantized base yet ({', '.join(QUANTIZABLE)})"
            )
        extra = dict(quantize=mcfg.quantize, device=device)
    family = load_family(
        mcfg.path,
        mcfg.family,
        dtype=DTYPES[mcfg.dtype],
        vae_path=mcfg.vae_path or None,
        load_encoders=load_encoders,
        **extra,
    )
    check_sizes(sizes, latent_factor(family), family.name)
    if mcfg.max_sequence_length:
        if family.max_sequence_length is None:
            raise DiffalignError(
                f"model.max_sequence_length: family '{family.name}' has no T5 encoder (its CLIP prompts are 77 tokens)"
            )
        family.max_sequence_length = mcfg.max_sequence_length
    if mcfg.num_frames:
        if family.num_frames is None or (mcfg.num_frames - 1) % family.temporal_factor:
            raise DiffalignError(
                f"model.num_frames={mcfg.num_frames}: needs a video family and 4k + 1 frames (family '{family.name}')"
            )
        family.num_frames = mcfg.num_frames
    if mcfg.expert:
        family.choose_expert(mcfg.expert)
    if lora is not None:
        family.check_trainable()
        check_target_modules(family, lora_targets(family, lora.preset, lora.target_modules))
    return family


def check_sizes(sizes: dict[str, int], factor: int, model: str) -> None:
    for key, value in sizes.items():
        if value % factor:
            raise DiffalignError(
                f"{key}={value}: must be a multiple of {factor} for {model} (its latent factor; "
                f"e.g. {max(factor, value // factor * factor)}), or 0 for the model's native size"
            )


def latent_factor(family) -> int:
    """Pixels per denoiser input cell: the VAE's downsampling times the transformer's patch size (1 for UNets)."""
    return family.vae_scale_factor * spatial_patch(family.denoiser.config.get("patch_size"))


def spatial_patch(patch_size) -> int:
    """The spatial patch of a transformer config: an int, or (t, h, w) for video transformers (Wan); 1 for UNets."""
    return int(patch_size[-1] if isinstance(patch_size, (list, tuple)) else patch_size or 1)


def folder_latent_factor(folder: Path) -> int:
    """latent_factor from a diffusers folder's config files, without loading weights (no VAE: pixel space)."""

    def config(sub: str) -> dict:
        path = folder / sub / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    vae = config("vae")
    scale = vae.get("scale_factor_spatial") or 2 ** (len(vae.get("block_out_channels", [None])) - 1)  # Wan: given
    return scale * spatial_patch(config("transformer").get("patch_size"))


LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Embedding)  # what peft can adapt


def check_target_modules(family, targets: list[str]) -> None:
    """Each `lora.target_modules` entry must name (as peft matches: the full name or a dotted suffix) at least one
    layer of the denoiser that peft can adapt; otherwise one line with the closest names."""
    layers = [name for name, module in family.denoiser.named_modules() if isinstance(module, LORA_LAYERS)]
    suffixes = sorted({".".join(name.split(".")[-k:]) for name in layers for k in (1, 2)})
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in layers):
            close = difflib.get_close_matches(target, suffixes, n=3, cutoff=0.5)
            hint = (
                f"; closest names: {', '.join(close)}" if close else f"; e.g. {', '.join(family.lora_target_modules)}"
            )
            raise DiffalignError(
                f"lora.target_modules: '{target}' names no Linear/Conv layer of the {family.name} "
                f"{type(family.denoiser).__name__}{hint}"
            )


QUANTIZABLE = ("flux", "flux2", "qwenimage", "zimage")  # families whose `load` takes quantize= (diffalign.quantize)


def build_objective(ocfg: ObjectiveConfig):
    """OBJECTIVES[name] with the section's keys (already typed and checked when the config loaded)."""
    return OBJECTIVES[ocfg.name](**ocfg.params)


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


def cache_dtype(dcfg: DataConfig) -> torch.dtype | None:
    """data.cache_dtype as a torch dtype (None = the model's dtype)."""
    if dcfg.cache_dtype and dcfg.cache_dtype not in DTYPES:
        raise DiffalignError(f"data.cache_dtype must be one of {', '.join(DTYPES)} or empty, not '{dcfg.cache_dtype}'")
    return DTYPES[dcfg.cache_dtype] if dcfg.cache_dtype else None


def open_pairs(
    dcfg: DataConfig,
    family,
    resolution: int,
    seed: int,
    cfg_model: ModelConfig,
    progress: bool = True,
    work_dir: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
):
    """The training pairs as a map-style dataset: raw (decoded every step) or from the latent cache.

    With data.cache_dir the cache is built first if missing (this needs the encoders), or reused when its key
    (model, resolution, data options) matches; a cache made for something else is an error naming both keys.
    A streamed source can only be trained through the cache (the cache turns it into a map-style dataset).
    With data.label_scorer every pair is scored once (saved next to the cache, or in work_dir) and relabelled.
    Several processes: call on every one with its rank, the world size and a barrier; each encodes its share of
    a missing cache, and the main process scores first.
    """
    wait = barrier or (lambda: None)
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
        if rank > 0:
            wait()  # the main process scores and saves; the others then read the saved scores
        scores = load_or_score(where, pairs, dcfg.label_scorer, lambda: load_scorer(dcfg.label_scorer), progress)
        if rank == 0:
            wait()
        labels = relabel(scores, dcfg.label_mode, dcfg.score_min, dcfg.score_max)
    if dcfg.cache_dir:
        build_cache(
            family,
            pairs,
            dcfg.cache_dir,
            model_path=cfg_model.path,
            vae_path=cfg_model.vae_path,
            dtype=cache_dtype(dcfg),
            shard_size=dcfg.cache_shard_size,
            num_workers=dcfg.num_workers,
            progress=progress,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
        )
        pairs = CachedPairs(dcfg.cache_dir, hflip=dcfg.hflip, empty_prompt_prob=dcfg.empty_prompt_prob, seed=seed)
    elif dcfg.streaming:
        raise DiffalignError("data.streaming=true needs data.cache_dir (stream once into the cache, then train)")
    return Relabeled(pairs, labels) if labels is not None else pairs
