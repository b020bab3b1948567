"""What every model family shares: device moves, gradient checkpointing, the attention backend, VAE encode/decode,
and how its LoRA file is written. One small base class instead of the same methods in five files; each family file
keeps only its quirks (conditioning, prediction type, schedule, generation) and the class attributes below.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from diffalign.errors import DiffalignError

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the DDPM families train with


@torch.no_grad()
def vae_encode(vae, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/f, W/f), fp32.

    Uses the posterior mean, not a sample: the latent std of SD VAEs is tiny, and a deterministic latent is what a
    cache should hold.
    """
    shift, device, dtype = vae.config.shift_factor, vae.device, vae.dtype  # each a walk over the modules: once
    parts = []
    for chunk in images.split(batch_size):
        latents = vae.encode(chunk.to(device, dtype)).latent_dist.mode()
        if shift is not None:
            latents = latents - shift
        parts.append((latents * vae.config.scaling_factor).float())
    return torch.cat(parts)


@torch.no_grad()
def vae_decode(vae, x0: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f) in [-1, 1], fp32; the inverse of `vae_encode`."""
    shift, device, dtype = vae.config.shift_factor, vae.device, vae.dtype  # each a walk over the modules: once
    parts = []
    for chunk in x0.split(batch_size):
        latents = chunk.to(device, dtype) / vae.config.scaling_factor
        if shift is not None:
            latents = latents + shift
        parts.append(vae.decode(latents).sample.float().clamp(-1, 1))
    return torch.cat(parts)


def use_sdpa(family) -> None:
    """torch scaled_dot_product_attention: the family's SDPA processor (None: its own processors already use it)."""
    if family.sdpa_processor is not None:
        family.denoiser.set_attn_processor(family.sdpa_processor())


def use_xformers(family) -> None:
    """xformers memory-efficient attention (CUDA); a one-line error where the package or the GPU is missing."""
    if importlib.util.find_spec("xformers") is None:
        raise DiffalignError(
            f"{family.name}: xformers attention needs the xformers package (pip install 'diffalign[xformers]' on a "
            "CUDA machine); set xformers=false to use SDPA"
        )
    if family.device.type != "cuda":
        raise DiffalignError(f"{family.name}: xformers attention needs the model on a CUDA device (move it first)")
    family.denoiser.enable_xformers_memory_efficient_attention()


ATTENTION = {"sdpa": use_sdpa, "xformers": use_xformers}


class Family:
    """Base of the model families (diffalign.models): the methods that are the same for all of them."""

    lora_writer: ClassVar[type] = StableDiffusionPipeline
    """diffusers pipeline class whose `save_lora_weights` writes this family's LoRA file (its loader reads it)."""
    lora_key_style: ClassVar[str] = "diffusers"
    """Key style of the saved LoRA (diffalign.lora.KEY_STYLES): "diffusers" (UNet lora.down/up) or "peft"."""
    sdpa_processor: ClassVar[type | None] = AttnProcessor2_0
    """Attention processor for backend "sdpa"; None when the model's own processors already use SDPA."""
    max_sequence_length: int | None = None
    """T5 tokens of the prompt encoding (SD3, FLUX, PixArt: their pipeline's default, `model.max_sequence_length`
    sets it); None for the CLIP-only families (77 tokens, fixed)."""
    num_frames: int | None = None
    """Video families: pixel frames of a sampled video (4k + 1, `model.num_frames` sets it); None for images."""
    expert: str = ""
    """Two-expert families (Wan 2.2 A14B): the expert `denoiser` is ("high" / "low"), chosen by `choose_expert`;
    "" for every other family."""
    _empty: dict[str, torch.Tensor] | None = None  # encode_empty's kept copy

    def choose_expert(self, expert: str) -> None:
        """Train the LoRA on `expert` of a two-expert family; a one-line error for the others."""
        raise DiffalignError(f"model.expert: family '{self.name}' has one denoiser (only Wan 2.2 A14B has experts)")

    def expert_timesteps(self) -> tuple[int, int] | None:
        """[t_min, t_max) of the training timesteps the trained expert denoises (None: all of them)."""
        return None

    def denoising_modules(self) -> tuple[torch.nn.Module, ...]:
        """Every module `denoise` runs: the denoiser, and a two-expert family's frozen partner."""
        return (self.denoiser,)

    def lora_module(self, expert: str) -> torch.nn.Module:
        """The module a LoRA file trained on `expert` ("" for most) loads into: the denoiser."""
        return self.denoiser

    def encode_empty(self) -> dict[str, torch.Tensor]:
        """The "" prompt's conditioning (1, ...), CFG's unconditional one: `encode_prompts([""])`, run once and kept
        (the text encoders are frozen; `to` drops the copy)."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    @property
    def shard_blocks(self) -> tuple[str, ...]:
        """Class names of the denoiser's repeated blocks: the units FSDP2 shards the frozen base by (one
        `fully_shard` per block, then the root). The diffusers model's own `_no_split_modules` unless a family
        overrides it."""
        return tuple(getattr(self.denoiser, "_no_split_modules", None) or ())

    def flow_scheduler(self, steps: int):
        """Flow families: a FlowMatchEulerDiscreteScheduler with the timesteps their own pipeline samples `steps`
        steps with (SD3's pipeline: `set_timesteps(steps)`); diffalign.sampling.flow_sde reads its sigmas."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def sampling_cfg(self, guidance: float) -> float:
        """The CFG scale of on-line sampling (and D3PO's / GRPO's training forward) for the configured guidance: the
        same for families with true classifier-free guidance; guidance-distilled families override it."""
        return guidance

    def cfg(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
        """How the family's pipeline combines the conditional and unconditional predictions (N, ...) at CFG scale
        `guidance`: uncond + w (cond - uncond); a family whose pipeline does more (Qwen-Image's norm rescale)
        overrides it."""
        return pred_uncond + guidance * (pred_cond - pred_uncond)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's x0 at height x width px (None: the training resolution): (C, h, w); video
        families add the latent frames, (C, f, h, w). The samplers draw their initial noise in it."""
        h = (height or self.resolution) // self.vae_scale_factor
        return (self.latent_channels, h, (width or self.resolution) // self.vae_scale_factor)

    def check_trainable(self) -> None:
        """Raise a one-line DiffalignError where a LoRA cannot be trained on this checkpoint (before it is added)."""

    @property
    def device(self) -> torch.device:
        """The denoiser's device, read from its first parameter (diffusers' `denoiser.device` first walks every
        module for group-offloading hooks: ~2 ms a call on the tiny SD3 with LoRA, at every sampling chunk and training
        step)."""
        return next(self.denoiser.parameters()).device

    def to(self, device) -> Family:
        self._empty = None
        self.pipe.to(device)
        return self

    def set_resolution(self, resolution: int) -> None:
        """Prepare the training schedule for images of `resolution` px; only families whose noise schedule depends on
        the image size (FLUX's dynamic shift) override this."""

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()

    def use_attention(self, backend: str) -> None:
        """Pick the attention implementation: "sdpa" (torch scaled_dot_product_attention, the default) or "xformers"."""
        if backend not in ATTENTION:
            raise ValueError(f"unknown attention backend '{backend}' (known: {', '.join(ATTENTION)})")
        ATTENTION[backend](self)

    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> x0 (N, C, H/f, W/f) = (latents - shift) * scaling_factor, fp32."""
        return vae_encode(self.pipe.vae, images, batch_size)

    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """x0 (N, C, h, w) -> images (N, 3, f*h, f*w) in [-1, 1], fp32."""
        return vae_decode(self.pipe.vae, x0, batch_size)

    def init_ddpm(self, pipe, denoiser, vae_config: dict, dtype: torch.dtype, **scheduler_kwargs) -> None:
        """The state of a DDPM-trained latent family (SD, SDXL, PixArt): pipe, denoiser, dtype, the *training* noise
        schedule (DDPM with the checkpoint's betas, timestep settings and prediction type), VAE geometry, resolution."""
        self.pipe, self.denoiser, self.dtype = pipe, denoiser, dtype
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **scheduler_kwargs)
        self.prediction_type = self.scheduler.config.prediction_type
        self.check_prediction_type()
        self.set_vae_geometry(vae_config)
        self.resolution = denoiser.config.sample_size * self.vae_scale_factor

    def set_vae_geometry(self, vae_config: dict) -> None:
        """vae_scale_factor (pixels per latent pixel) and latent_channels from the VAE config."""
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.latent_channels = vae_config["latent_channels"]

    def check_prediction_type(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"{self.name}: unsupported prediction_type '{self.prediction_type}'")
