"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet on 4-channel VAE latents, epsilon or v prediction.

The module-level helpers (loading with one-line errors, generation through the real diffusers pipeline) are shared
with the other families; device moves, VAE encode/decode and the attention choice come from diffalign.models.base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from diffalign.models.base import Family

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# LoCon-style extra targets: the two 3x3 convolutions of every UNet resnet block (not conv_in/conv_out/shortcuts)
LORA_CONV_MODULES = ["conv1", "conv2"]
# lora.preset -> target module names (UNet families); the family default is `lora_target_modules`
LORA_PRESETS = {"attention": LORA_TARGET_MODULES, "attention+conv": LORA_TARGET_MODULES + LORA_CONV_MODULES}


def _one_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def check_components(path: str, names: list[str]) -> None:
    """Raise a one-line error if a local pipeline folder lacks one of `names` (hub ids are checked by the load)."""
    if not os.path.isdir(path):
        return
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
    index = json.loads(index_file.read_text())
    for name in names:
        entry = index.get(name)
        if entry is None or entry[0] is None or not (Path(path) / name).is_dir():
            raise FileNotFoundError(f"{path}: missing component '{name}' (model_index.json entry or {name}/ folder)")


def load_pipe(
    pipeline_class, path: str, components: list[str], dtype, load_encoders, vae_path, vae_class=AutoencoderKL, **kwargs
):
    """Load `pipeline_class` from a folder or hub id; returns (pipe, vae_config). `vae_class`: the VAE's model class
    (Qwen-Image: AutoencoderKLQwenImage).

    With load_encoders=False the VAE and the text encoders ("text_encoder*" components) are not loaded;
    only the VAE config is read (for the scale factor). The VAE is loaded in fp32 (SD/SDXL VAEs overflow in fp16)
    unless `vae_path` names a separate VAE (e.g. the fp16-fix SDXL VAE), which is loaded in `dtype`.
    """
    text_encoders = [c for c in components if c.startswith("text_encoder")]
    check_components(
        path, [c for c in components if (load_encoders or c not in text_encoders) and not (vae_path and c == "vae")]
    )
    vae_source = (
        dict(pretrained_model_name_or_path=vae_path)
        if vae_path
        else dict(pretrained_model_name_or_path=path, subfolder="vae")
    )
    try:  # offline hub id, missing weights file, ...: one line naming the source
        vae_config = vae_class.load_config(**vae_source)
        if load_encoders:
            kwargs["vae"] = vae_class.from_pretrained(**vae_source, dtype=dtype if vae_path else torch.float32)
    except (OSError, ValueError) as err:
        raise OSError(f"{vae_path or path}: cannot load the VAE ({_one_line(err)})") from err
    if not load_encoders:
        kwargs.update({c: None for c in ["vae", *text_encoders]})
    try:
        pipe = pipeline_class.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"{path}: cannot load {pipeline_class.__name__} ({_one_line(err)})") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe, vae_config


def generate_images(
    family, prompts: list[str], seeds: list[int], steps: int, guidance: float, height, width, **pipe_kwargs
):
    """Sample with the family's diffusers pipeline (its own inference scheduler); one CPU generator per image.

    The pipeline returns latents and the family decodes them, so the VAE may stay fp32 while the UNet is fp16.
    `pipe_kwargs` go to the pipeline call as they are (e.g. PixArt's clean_caption, use_resolution_binning).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    if family.pipe.vae is None:
        raise RuntimeError(f"{family.name}: loaded with load_encoders=False, cannot generate")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]  # image i depends only on seed i
    latents = family.pipe(
        prompt=list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height or family.resolution,
        width=width or family.resolution,
        generator=generators,
        output_type="latent",
        **pipe_kwargs,
    ).images
    images = family.decode(latents)  # (N, 3, H, W) in [-1, 1]
    return family.pipe.image_processor.postprocess(images, output_type="pil")


class SDFamily(Family):
    """SD1.x / SD2.x checkpoint (StableDiffusionPipeline folder or hub id)."""

    name = "sd"
    lora_prefix = "unet"
    lora_target_modules = LORA_TARGET_MODULES
    lora_presets = LORA_PRESETS
    components = ["unet", "scheduler", "vae", "text_encoder", "tokenizer"]

    def __init__(self, pipe: StableDiffusionPipeline, vae_config: dict, dtype: torch.dtype):
        self.init_ddpm(pipe, pipe.unet, vae_config, dtype)

    @classmethod
    def load(cls, path: str, dtype: torch.dtype = torch.float32, load_encoders: bool = True, vae_path=None):
        """Load from a local folder or hub id; load_encoders=False skips the VAE and text encoder (latent cache)."""
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe, vae_config = load_pipe(
            StableDiffusionPipeline, path, cls.components, dtype, load_encoders, vae_path, **extra
        )
        return cls(pipe, vae_config, dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, 77, D)}: the text encoder's last hidden state, as the pipeline."""
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.pipe.text_encoder.device, 1, False)
        return {"prompt_embeds": embeds}

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 4, h, w), t (N,) -> prediction (N, 4, h, w) of type `prediction_type`; "size_info" is ignored."""
        embeds = cond["prompt_embeds"].to(self.dtype)
        return (self.denoiser if module is None else module)(xt.to(self.dtype), t, encoder_hidden_states=embeds).sample

    def generate(self, prompts, seeds, steps: int = 30, guidance: float = 7.5, height=None, width=None):
        """-> list[PIL.Image], one per prompt; the pipeline runs the same UNet, so attached LoRAs are active."""
        return generate_images(self, prompts, seeds, steps, guidance, height, width)
