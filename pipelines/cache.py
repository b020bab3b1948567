"""`diffalign cache CONFIG.yaml [a.b=value ...]`: encode the training pairs once (VAE latents + text embeddings).

Uses the same config as `diffalign train` (model, data, data.cache_dir). A later `diffalign train` with the same
config trains from the cache and never loads the VAE encoder or the text encoders (unless it has to generate
images for validation or evaluation).

Under `accelerate launch` every process encodes its own share of the pairs and captions on its own device; a
build stopped by a crash, a kill or a corrupt image resumes from the shards already written when rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from diffalign.config import RunConfig, load_config
from diffalign.data import read_index
from diffalign.engine.common import load_model, open_pairs
from diffalign.errors import DiffalignError


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> Path:
    cfg: RunConfig = load_config(RunConfig, config, list(overrides))
    if not cfg.data.cache_dir:
        raise DiffalignError("diffalign cache needs data.cache_dir=FOLDER")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it: CPU + gloo
    family = load_model(cfg.model).to(state.device)
    resolution = cfg.model.resolution or family.resolution
    open_pairs(
        cfg.data,
        family,
        resolution,
        seed=cfg.train.seed,
        cfg_model=cfg.model,
        progress=state.is_main_process,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone,
    )
    index = read_index(cfg.data.cache_dir)
    if state.is_main_process:
        print(
            f"cache {cfg.data.cache_dir}: {index['pairs']} pairs, {index['captions']} unique captions, "
            f"key {index['key']}, counts {json.dumps(index['counts'])}"
        )
    return Path(cfg.data.cache_dir)
