"""`diffalign generate [CONFIG.yaml] prompt="..." loras=[DIR:scale,...] ...`: sample a base model + LoRAs.

Writes one PNG per image, `manifest.jsonl` (file, prompt, seed and the sampling settings per image; `diffalign
score` and `compare` read it), `grid.png`, and the run record.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from diffalign.config import GenerateConfig, load_config, save_config
from diffalign.engine.common import load_model, prepare_output_dir, save_grid
from diffalign.errors import DiffalignError
from diffalign.lora import load_lora_many
from diffalign.runinfo import write_run_record


def parse_lora(spec: str) -> tuple[str, float]:
    """ "path" or "path:scale" -> (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(scale)
        except ValueError:
            raise DiffalignError(f"loras: '{spec}' should be PATH or PATH:SCALE") from None
    return spec, 1.0


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = [cfg.prompt] if cfg.prompt else []
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise DiffalignError(f"prompts_file {path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DiffalignError('no prompts: set prompt="..." or prompts_file=PATH')
    return prompts


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> Path:
    cfg: GenerateConfig = load_config(GenerateConfig, config, list(overrides))
    prompts = read_prompts(cfg)
    loras = [parse_lora(spec) for spec in cfg.loras]
    family = load_model(cfg.model, sizes={"height": cfg.height, "width": cfg.width})  # checked before any write
    out = prepare_output_dir(cfg.output_dir, default_name="generate")
    if loras:
        load_lora_many(family, loras, fuse=cfg.fuse)

    jobs = [
        (p, cfg.seed + i * cfg.images_per_prompt + k)
        for i, p in enumerate(prompts)
        for k in range(cfg.images_per_prompt)
    ]
    images, rows = [], []
    settings = {"steps": cfg.steps, "height": cfg.height or None, "width": cfg.width or None}
    if cfg.guidance > 0:  # else the family's default
        settings["guidance"] = cfg.guidance
    for start in tqdm(range(0, len(jobs), cfg.batch_size), desc="generate", unit="batch"):
        chunk = jobs[start : start + cfg.batch_size]
        batch = family.generate([p for p, _ in chunk], seeds=[s for _, s in chunk], **settings)
        for (prompt, seed), image in zip(chunk, batch):
            name = f"{len(images):05d}.png"
            image.save(out / name)
            images.append(image)
            rows.append(
                {
                    "file": name,
                    "prompt": prompt,
                    "seed": seed,
                    **settings,
                    "model": cfg.model.path,
                    "loras": [{"path": p, "scale": s} for p, s in loras],
                }
            )
    with open(out / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    save_grid(images, out / "grid.png")
    save_config(cfg, out / "config.yaml")
    write_run_record(out)
    print(f"wrote {len(images)} images, manifest.jsonl and grid.png to {out}")
    return out
