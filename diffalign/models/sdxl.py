"""SDXL: two CLIP text encoders, pooled text embeds and size/crop micro-conditioning ("time ids") in the UNet.

Every SDXL quirk lives here: cond carries both encoders' penultimate hidden states concatenated (N, 77, 768+1280)
plus the pooled embedding of encoder 2 (N, 1280); `denoise` builds the six time ids per sample from
cond["size_info"] = (orig_h, orig_w, crop_top, crop_left) and the target size (the latent size times 8),
in the order of `StableDiffusionXLPipeline._get_add_time_ids`: original size, crop top-left, target size.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from diffalign.models.base import Family
from diffalign.models.sd import LORA_PRESETS, LORA_TARGET_MODULES, generate_images, load_pipe


class SDXLFamily(Family):
    """SDXL base checkpoint (StableDiffusionXLPipeline folder or hub id)."""

    name = "sdxl"
    lora_prefix = "unet"
    lora_target_modules = LORA_TARGET_MODULES
    lora_presets = LORA_PRESETS
    lora_writer = StableDiffusionXLPipeline
    components = ["unet", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]

    def __init__(self, pipe: StableDiffusionXLPipeline, vae_config: dict, dtype: torch.dtype):
        if vae_config.get("latents_mean") is not None:
            raise ValueError("sdxl: VAEs with latents_mean/latents_std (e.g. Playground v2.5) are not supported")
        self.init_ddpm(pipe, pipe.unet, vae_config, dtype)

    @classmethod
    def load(cls, path: str, dtype: torch.dtype = torch.float32, load_encoders: bool = True, vae_path=None):
        """Load from a local folder or hub id; load_encoders=False skips the VAE and both text encoders."""
        pipe, vae_config = load_pipe(
            StableDiffusionXLPipeline, path, cls.components, dtype, load_encoders, vae_path, add_watermarker=False
        )
        return cls(pipe, vae_config, dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, 77, D1+D2), "pooled_prompt_embeds": (N, P)}, via the pipeline."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts),
            device=self.pipe.text_encoder.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def time_ids(self, xt: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w); without "size_info" the original
        size is the target size and the crop is (0, 0), as the pipeline does at generation time."""
        n, (h, w) = xt.shape[0], xt.shape[-2:]
        target = torch.tensor([h * self.vae_scale_factor, w * self.vae_scale_factor], device=xt.device)
        target = target.expand(n, 2)  # (2,) -> (N, 2)
        size_info = cond.get("size_info")
        if size_info is None:
            size_info = torch.cat([target, torch.zeros_like(target)], dim=1)  # (N, 4)
        return torch.cat([size_info.to(xt.device), target], dim=1).to(self.dtype)  # (N, 4) + (N, 2) -> (N, 6)

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 4, h, w), t (N,), cond -> prediction (N, 4, h, w) of type `prediction_type`."""
        added = {"text_embeds": cond["pooled_prompt_embeds"].to(self.dtype), "time_ids": self.time_ids(xt, cond)}
        embeds = cond["prompt_embeds"].to(self.dtype)
        return (self.denoiser if module is None else module)(
            xt.to(self.dtype), t, encoder_hidden_states=embeds, added_cond_kwargs=added
        ).sample

    def generate(self, prompts, seeds, steps: int = 30, guidance: float = 5.0, height=None, width=None):
        """-> list[PIL.Image], one per prompt; the pipeline runs the same UNet, so attached LoRAs are active."""
        return generate_images(self, prompts, seeds, steps, guidance, height, width)
