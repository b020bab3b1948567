"""Model families: one file per family, chosen by one dict.

A family object owns the loaded components of one checkpoint and hides every quirk of it (SDXL time ids and
pooled embeds, VAE scaling and shift, SD3's flow timesteps, PixArt's learned-sigma output, pixel-space toy model)
behind the same small surface:

    family = load_family(path, dtype=torch.float32, load_encoders=True)
    family.name                  # "sd" | "sdxl" | "sd3" | "pixart" | "flux" | "flux2" | "qwenimage" | "zimage" | "wan" | "toy"
    family.denoiser              # the nn.Module LoRA attaches to (UNet or transformer)
    family.scheduler             # the *training* noise scheduler (DDPMScheduler / FlowMatchEulerDiscreteScheduler)
    family.lora_prefix           # key prefix of its LoRA files: "unet" | "transformer"
    family.prediction_type       # "epsilon" | "v_prediction" | "flow"
    family.resolution            # native pixel size (int)
    family.lora_target_modules   # default LoRA target module names (lora.preset "" and lora.target_modules [])
    family.lora_presets          # lora.preset name -> target module names ("attention", "attention+conv")
    family.encode_images(images) # (N, 3, H, W) in [-1, 1] -> x0 (N, C, h, w), scaled latents, no grad
    family.decode(x0)            # x0 (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], no grad
    family.encode_prompts(prompts)  # list[str] (N) -> cond: dict[str, Tensor], each (N, ...), no grad
    family.denoise(xt, t, cond)  # (N, C, h, w), integer t (N,) in [0, T), cond -> model prediction (N, C, h, w)
    family.generate(prompts, seeds, steps, guidance, height, width, loras)  # -> list[PIL.Image]
    default_guidance(family)     # the CFG scale generate() uses by default (config value 0 means this)

`cond` is a plain dict of tensors so it can be cached to safetensors, repeated and concatenated. It may also carry
"size_info": (N, 4) long = (original_h, original_w, crop_top, crop_left) of each training image; families that use
micro-conditioning (SDXL) read it, the others ignore it.

Video families (wan) have x0 (N, C, f, h, w): every shared function reduces over dims 1..end, whatever the rank, and
`family.latent_shape(height, width)` gives the samplers one sample's shape.

`t` is always the integer training timestep of the estimator. Flow families (SD3) call their transformer with the
scheduler's timestep for it, sigma_t * T (`Schedule.model_timestep`), so x_t, target and network input agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffalign.models.flux import FluxFamily
from diffalign.models.flux2 import Flux2Family
from diffalign.models.pixart import PixArtFamily
from diffalign.models.qwenimage import QwenImageFamily
from diffalign.models.sd import SDFamily
from diffalign.models.sd3 import SD3Family
from diffalign.models.sdxl import SDXLFamily
from diffalign.models.toy import ToyFamily
from diffalign.models.wan import WanFamily
from diffalign.models.zimage import ZImageFamily
from diffalign.paths import TOY_FLOW_MODEL, TOY_MODEL

FAMILIES = {
    "sd": SDFamily,
    "sdxl": SDXLFamily,
    "sd3": SD3Family,
    "pixart": PixArtFamily,
    "flux": FluxFamily,
    "zimage": ZImageFamily,
    "qwenimage": QwenImageFamily,
    "flux2": Flux2Family,
    "toy": ToyFamily,
    "wan": WanFamily,
}

# model_index.json `_class_name` -> family key
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "PixArtSigmaPipeline": "pixart",
    "FluxPipeline": "flux",
    "ZImagePipeline": "zimage",
    "QwenImagePipeline": "qwenimage",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2",
    "DiffalignToyPipeline": "toy",
    "WanPipeline": "wan",
}


def default_guidance(family) -> float:
    """The CFG scale `family.generate` uses when none is given (toy 1.5; SD/SDXL/SD3/PixArt their pipeline's)."""
    import inspect

    return float(inspect.signature(family.generate).parameters["guidance"].default)


SHIPPED = {"toy": TOY_MODEL, "toy_flow": TOY_FLOW_MODEL}  # model.path names of the shipped toy models


def resolve_path(path: str) -> str:
    """ "toy" / "toy_flow" name the shipped toy models (DDPM / flow matching); anything else is a local folder or a
    hub id."""
    return str(SHIPPED[path]) if path in SHIPPED else path


def detect_family(path: str) -> str:
    """Read `_class_name` from model_index.json (local folder or hub cache) and map it to a family key."""
    path = resolve_path(path)
    if os.path.isdir(path):
        index = Path(path) / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(path, "model_index.json"))
        except Exception as err:  # offline, missing repo, ... : one line naming the id
            raise FileNotFoundError(
                f"{path}: no such local folder, and model_index.json cannot be fetched from the hub "
                f"({type(err).__name__}{'; HF_HUB_OFFLINE is set' if os.environ.get('HF_HUB_OFFLINE') else ''})"
            ) from None
    class_name = json.loads(index.read_text()).get("_class_name", "")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{path}: unsupported pipeline class '{class_name}' (supported: {', '.join(PIPELINE_CLASSES)})"
        )
    return PIPELINE_CLASSES[class_name]


def load_family(path: str, family: str = "auto", **kwargs):
    """Load a checkpoint as a family object; kwargs go to the family's `load` (dtype, load_encoders, vae_path;
    SD3 also t5=False)."""
    key = detect_family(path) if family == "auto" else family
    if key not in FAMILIES:
        raise ValueError(f"unknown model family '{key}' (known: {', '.join(FAMILIES)})")
    return FAMILIES[key].load(resolve_path(path), **kwargs)
