"""`diffalign export src=LORA out=FILE [format=kohya|diffusers] [model=BASE]`: convert a LoRA between file formats.

format=kohya: a diffusers-format UNet LoRA (SD1.5 / SDXL, e.g. `runs/x/lora`) -> one kohya .safetensors file for
kohya sd-scripts, A1111 and ComfyUI (FLUX: BFL names; FLUX.2: ComfyUI's diffusion_model.<BFL name> layout; Wan: the
original / ComfyUI names, diffalign.lora_wan; Qwen-Image, Z-Image: diffusion_model.<diffusers name>, diffalign.lora_comfy).
format=diffusers: a kohya file -> diffusers format, which plain diffusers
(`pipe.load_lora_weights`) and `diffalign generate loras=[...]` read (both also read the kohya file directly).
The key conversions are diffusers' own (diffalign.lora.export_kohya / import_kohya).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict

from diffalign.config import ExportConfig, load_config
from diffalign.errors import DiffalignError
from diffalign.lora import export_kohya, import_kohya
from diffalign.models import resolve_path


def _to_kohya(cfg: ExportConfig) -> Path:
    return export_kohya(cfg.src, cfg.out)


def _to_diffusers(cfg: ExportConfig) -> Path:
    unet_config = None
    if cfg.model:
        try:
            unet_config = FrozenDict(UNet2DConditionModel.load_config(resolve_path(cfg.model), subfolder="unet"))
        except (OSError, ValueError) as err:
            raise DiffalignError(f"model: cannot read {cfg.model}/unet/config.json ({type(err).__name__})") from None
    return import_kohya(cfg.src, cfg.out, unet_config)


FORMATS = {"kohya": _to_kohya, "diffusers": _to_diffusers}


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> Path:
    cfg: ExportConfig = load_config(ExportConfig, config, list(overrides))
    if cfg.format not in FORMATS:
        raise DiffalignError(f"format must be one of {', '.join(FORMATS)}, not '{cfg.format}'")
    if not cfg.src or not cfg.out:
        raise DiffalignError("set src=LORA (folder or .safetensors) and out=PATH")
    try:
        path = FORMATS[cfg.format](cfg)
    except ValueError as err:  # wrong input format, text-encoder weights, ...: one line naming the file
        raise DiffalignError(str(err)) from None
    print(f"wrote {cfg.format} LoRA {path}")
    return path
