"""The toy world's model (assets/toy_model, made by assets/make_toy_model.py): a tiny pixel-space text-to-image model.

A UNet2DConditionModel on 32x32 RGB pixels (no VAE: x0 is the image in [-1, 1]; the UNet also gets two
coordinate channels, see `add_coords`) conditioned on a tiny
CLIPTextModel, with a DDPMScheduler (cosine schedule, v-prediction: epsilon was ill-posed at
the first sampling steps, see assets/make_toy_model.py). Each component is loaded with its own `from_pretrained`
from its subfolder; there is no diffusers pipeline class, so sampling uses diffalign.sampling.

The flow-matching twin (assets/toy_flow_model, assets/make_toy_flow_model.py) has the same components with a
FlowMatchEulerDiscreteScheduler: prediction type "flow", the UNet called at sigma_t * T, sampled by the Euler ODE
(diffalign.sampling.flow_sde.sample_flow: the flow sampler at noise level 0). The scheduler folder's class picks
which (`SCHEDULERS`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from diffalign.likelihood import Schedule
from diffalign.models.base import PREDICTION_TYPES, Family
from diffalign.models.sd import LORA_PRESETS, check_components
from diffalign.sampling import sample
from diffalign.sampling.flow_sde import sample_flow

COORD_CHANNELS = 2
# scheduler class (scheduler_config.json) -> (class, prediction type or None = the config's, x0 sampler)
SCHEDULERS = {
    "DDPMScheduler": (DDPMScheduler, None, sample),
    "FlowMatchEulerDiscreteScheduler": (FlowMatchEulerDiscreteScheduler, "flow", sample_flow),
}


def add_coords(xt: torch.Tensor) -> torch.Tensor:
    """CoordConv input (Liu et al. 2018): (N, C, H, W) -> (N, C + 2, H, W), appending x and y in [-1, 1].

    A convolutional UNet has no absolute position except what zero padding leaks, and the toy prompts ask for one
    ("top left"); two constant channels make it explicit and cost nothing. (When the toy model ignored position, the
    cause turned out to be the loss weighting, see assets/make_toy_model.py; these channels are a cheap safeguard, not
    shown to be necessary.) The UNet's in_channels is 3 + 2; the family hides this in `denoise`.
    """
    n, _, h, w = xt.shape
    y, x = torch.meshgrid(
        torch.linspace(-1, 1, h, device=xt.device, dtype=xt.dtype),
        torch.linspace(-1, 1, w, device=xt.device, dtype=xt.dtype),
        indexing="ij",
    )
    coords = torch.stack([x, y])[None].expand(n, 2, h, w)  # (N, 2, H, W)
    return torch.cat([xt, coords], dim=1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> N PIL images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


class ToyFamily(Family):
    """The toy world's pixel-space model (a DiffalignToyPipeline folder)."""

    name = "toy"
    lora_prefix = "unet"
    # attention + resnet convs: the toy UNet has attention only at 8x8, while vividness and background are decided
    # at full resolution (attention-only LoRA moved toy_aesthetic by +0.04 in 300 DPO steps, with convs +0.5)
    lora_target_modules = LORA_PRESETS["attention+conv"]
    lora_presets = LORA_PRESETS
    components = ["unet", "scheduler", "text_encoder", "tokenizer"]
    vae_scale_factor = 1  # pixel space

    def __init__(self, unet, scheduler, text_encoder, tokenizer, dtype: torch.dtype):
        self.denoiser = unet
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.dtype = dtype
        _, flow_type, self.sampler = SCHEDULERS[type(scheduler).__name__]
        self.prediction_type = flow_type or scheduler.config.prediction_type
        if self.prediction_type not in (*PREDICTION_TYPES, "flow"):
            raise ValueError(f"toy: unsupported prediction_type '{self.prediction_type}'")
        self.schedule = Schedule(scheduler, self.prediction_type)
        self.resolution = unet.config.sample_size
        self.latent_channels = unet.config.out_channels
        if unet.config.in_channels != self.latent_channels + COORD_CHANNELS:
            raise ValueError(f"toy: UNet in_channels {unet.config.in_channels} != out_channels + {COORD_CHANNELS}")

    @classmethod
    def load(cls, path: str, dtype: torch.dtype = torch.float32, load_encoders: bool = True, vae_path=None):
        """Load from a local folder; load_encoders=False skips the text encoder (for cached embeddings)."""
        if vae_path is not None:
            raise ValueError("toy: pixel-space model, it has no VAE (vae_path must be None)")
        check_components(path, [c for c in cls.components if load_encoders or c != "text_encoder"])
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype).eval()
        name = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        if name not in SCHEDULERS:
            raise ValueError(f"toy: {path}/scheduler is a {name}; known: {', '.join(SCHEDULERS)}")
        scheduler = SCHEDULERS[name][0].from_pretrained(path, subfolder="scheduler")
        text_encoder = tokenizer = None
        if load_encoders:
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype).eval()
            text_encoder.requires_grad_(False)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        return cls(unet, scheduler, text_encoder, tokenizer, dtype)

    def to(self, device) -> ToyFamily:
        self._empty = None
        self.denoiser.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> x0 = the same pixels, fp32 (pixel space: no encoder)."""
        return images.float()

    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """x0 (N, 3, H, W) -> images (N, 3, H, W) clamped to [-1, 1], fp32."""
        return x0.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, 77, D)}: the text encoder's last hidden state."""
        if self.text_encoder is None:
            raise RuntimeError("toy: loaded with load_encoders=False, cannot encode prompts")
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)  # (N, 77)
        return {"prompt_embeds": self.text_encoder(ids).last_hidden_state}

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 3, H, W), t (N,) -> prediction (N, 3, H, W) of type `prediction_type`; "size_info" is ignored.

        The UNet sees xt plus two coordinate channels (`add_coords`): always call the model through here. A flow
        model is called at sigma_t * T (`Schedule.model_timestep`), a DDPM one at t.
        """
        embeds = cond["prompt_embeds"].to(self.dtype)
        timestep = self.schedule.model_timestep(t)
        return (self.denoiser if module is None else module)(
            add_coords(xt.to(self.dtype)), timestep, encoder_hidden_states=embeds
        ).sample

    def generate(self, prompts, seeds, steps: int = 20, guidance: float = 1.5, height=None, width=None):
        """-> list[PIL.Image], one per prompt (DDIM eta 0, or the Euler ODE for flow; attached LoRAs are active).

        Guidance 1.5, not SD's 4-7.5: this pixel-space model follows prompts at 1.5 (20 samples: colour, size and
        position all right, shape 18/20) while at 4 colours turn muddy (colour accuracy 0.4).
        """
        return to_pil(self.decode(self.sampler(self, prompts, seeds, steps, guidance, height, width)))
