"""`diffalign cache CONFIG.yaml [a.b=value ...]`: encode the training pairs once (VAE latents + text embeddings).

Uses the same config as `diffalign train` (model, data, data.cache_dir). A later `diffalign train` with the same
config trains from the cache and never loads the VAE encoder or the text encoders (unless it has to generate
images for validation or evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.config import RunConfig, load_config
from diffalign.data import read_index
from diffalign.errors import DiffalignError
from pipelines.common import load_model, open_pairs


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> Path:
    cfg: RunConfig = load_config(RunConfig, config, list(overrides))
    if not cfg.data.cache_dir:
        raise DiffalignError("diffalign cache needs data.cache_dir=FOLDER")
    family = load_model(cfg.model)
    resolution = cfg.model.resolution or family.resolution
    open_pairs(cfg.data, family, resolution, seed=cfg.train.seed, cfg_model=cfg.model)
    index = read_index(cfg.data.cache_dir)
    print(
        f"cache {cfg.data.cache_dir}: {index['pairs']} pairs, key {index['key']}, counts {json.dumps(index['counts'])}"
    )
    return Path(cfg.data.cache_dir)
