"""FLUX.1 (dev / schnell): a 12 B MMDiT (FluxTransformer2DModel) on 16-channel VAE latents, trained by rectified flow.

Every FLUX quirk lives here:
- prompts go through the pipeline's own `encode_prompt`: the CLIP-L pooled embed (N, 768) and the T5 last hidden
  states (N, 512, 4096); the text position ids are zeros (N_txt, 3), rebuilt in `denoise`;
- latents are 2x2-packed: x0 stays (N, 16, h, w) in the estimator and the cache; `denoise` packs it to
  (N, h/2 * w/2, 64) tokens with their latent image ids (0, row, column) by the pipeline's own `_pack_latents` /
  `_prepare_latent_image_ids`, and unpacks the prediction with `_unpack_latents`;
- FLUX.1-dev is guidance-distilled: the guidance scale is an *input* of the transformer (`guidance_embeds=True` in
  its config), there is no true CFG; training feeds `train_guidance` (1.0 by default, SimpleTuner's default
  `flux_guidance_value`; diffusers' train_dreambooth_lora_flux.py uses 3.5; a family attribute, not yet a config
  key). FLUX.1-schnell has no guidance input and gets None;
- prediction_type "flow": the transformer predicts the velocity eps - x0 at x_t = (1 - sigma) x0 + sigma eps, called
  with timestep sigma (the pipeline passes t / 1000);
- the scheduler shifts sigmas by image size (`use_dynamic_shifting`): mu = calculate_shift(image_seq_len) linear in
  the token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) of the scheduler
  config, sigma' = e^mu / (e^mu + 1/sigma - 1). That equals a static shift e^mu, so the training schedule is the
  folder's scheduler with `shift = e^mu` at the training resolution (`set_resolution`, native = the VAE's
  sample_size, 1024 for FLUX.1) and the shared estimator's table applies unchanged (1024 px: 4096 tokens, mu = 1.15,
  shift 3.16);
- the VAE has a shift_factor as well as a scaling_factor (vae_encode / vae_decode apply both).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffalign.likelihood import Schedule
from diffalign.models.base import Family
from diffalign.models.sd import load_pipe
from diffalign.quantize import pipeline_quantization

# Joint attention of the double blocks (image + text streams) and the single blocks' to_q/k/v: the attention part
# of diffusers' train_dreambooth_lora_flux.py default targets.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MAX_SEQUENCE_LENGTH = 512  # T5 tokens, FluxPipeline's default (FLUX.1-schnell was trained with 256)
TRAIN_GUIDANCE = 1.0  # guidance input while training FLUX.1-dev (see the module docstring)


def flow_shift(scheduler_config, image_seq_len: int) -> float:
    """The static shift equal to the scheduler's dynamic one at `image_seq_len` packed tokens: e^mu with
    mu = calculate_shift(...) from the config's base/max seq len and shift (the folder's `shift` without dynamic
    shifting)."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return float(scheduler_config["shift"])
    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu)


class FluxFamily(Family):
    """FLUX.1 checkpoint (FluxPipeline folder or hub id)."""

    max_sequence_length = MAX_SEQUENCE_LENGTH  # T5 tokens; model.max_sequence_length overrides it

    name = "flux"
    lora_prefix = "transformer"
    lora_target_modules = LORA_TARGET_MODULES
    prediction_type = "flow"
    lora_writer = FluxPipeline
    lora_key_style = "peft"  # as diffusers' FLUX scripts save; FluxPipeline.load_lora_weights reads it
    sdpa_processor = None  # FluxAttnProcessor already uses torch SDPA
    components = ["transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]

    def __init__(
        self, pipe: FluxPipeline, vae_config: dict, dtype: torch.dtype, train_guidance: float = TRAIN_GUIDANCE
    ):
        self.pipe, self.dtype, self.denoiser = pipe, dtype, pipe.transformer
        self.set_vae_geometry(vae_config)
        if self.denoiser.config.in_channels != 4 * self.latent_channels:
            raise ValueError(
                f"{self.name}: transformer in_channels {self.denoiser.config.in_channels} != 4 x "
                f"{self.latent_channels} VAE latent channels (2x2 packing)"
            )
        self.guidance_embeds = bool(self.denoiser.config.guidance_embeds)
        self.train_guidance = train_guidance
        self.resolution = int(vae_config.get("sample_size") or 1024)
        self.set_resolution(self.resolution)

    def set_resolution(self, resolution: int) -> None:
        """Build the training schedule for images of `resolution` px: the folder's scheduler with the static shift
        its dynamic shifting gives at that size (a fresh copy, never set_timesteps'd)."""
        tokens = (resolution // (2 * self.vae_scale_factor)) ** 2  # packed 2x2 latent patches
        shift = flow_shift(self.pipe.scheduler.config, tokens)
        self.train_tokens, self.resolution = tokens, resolution  # on-line rounds sample at the size of the shift
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            self.pipe.scheduler.config, use_dynamic_shifting=False, shift=shift
        )
        self.schedule = Schedule(self.scheduler, self.prediction_type)

    @classmethod
    def load(
        cls,
        path: str,
        dtype: torch.dtype = torch.float32,
        load_encoders: bool = True,
        vae_path=None,
        quantize: str = "none",
        device="cpu",
    ):
        """Load from a local folder or hub id; load_encoders=False skips the VAE, CLIP and T5 (latent cache).
        quantize (none | int8 | fp8 | nf4, diffalign.quantize) loads the transformer quantized for training on
        `device`."""
        extra = dict(image_encoder=None, feature_extractor=None)
        extra.update(pipeline_quantization(quantize, "transformer", dtype, device))
        pipe, vae_config = load_pipe(FluxPipeline, path, cls.components, dtype, load_encoders, vae_path, **extra)
        return cls(pipe, vae_config, dtype)

    def flow_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """FluxPipeline's sampling schedule: sigmas linspace(1, 1/steps, steps), shifted by the training size's
        shift (its dynamic e^mu: the same sigmas as the pipeline's time_shift at that size)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)  # static shift (set_resolution)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
        return scheduler

    def sampling_cfg(self, guidance: float) -> float:
        """FLUX has no true CFG on-line: FLUX.1-dev takes `guidance` as the transformer's input in sampling and
        training alike (Flow-GRPO's FLUX runs: 3.5), schnell ignores it; the CFG scale is 1 (one pass)."""
        if self.guidance_embeds:
            self.train_guidance = guidance
        return 1.0

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, 512, D_t5), "pooled_prompt_embeds": (N, D_clip)} via the pipeline."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            list(prompts),
            None,
            device=self.pipe.text_encoder.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h/2 * w/2, 4C), as FluxPipeline packs its latents."""
        n, c, h, w = x.shape
        return FluxPipeline._pack_latents(x, n, c, h, w)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, h/2 * w/2, 4C) -> (N, C, h, w) for latents of h x w (the pipeline's `_unpack_latents`)."""
        return FluxPipeline._unpack_latents(
            tokens, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor
        )

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 16, h, w), integer t (N,) in [0, 1000) -> velocity (N, 16, h, w); "size_info" is ignored.

        The transformer sees the packed tokens, their image ids, zero text ids, timestep sigma_t and (FLUX.1-dev)
        the guidance input `train_guidance`. The shift of sigma_t was fixed for `set_resolution`'s size; latents of
        another size raise (the schedule would be the wrong one).
        """
        n, _, h, w = xt.shape
        if (h // 2) * (w // 2) != self.train_tokens:
            raise ValueError(
                f"{self.name}: latents {h}x{w} give {(h // 2) * (w // 2)} tokens but the schedule's shift was set for "
                f"{self.train_tokens} (call family.set_resolution(px) for the training size first)"
            )
        embeds = cond["prompt_embeds"].to(self.dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, xt.device, self.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=xt.device, dtype=self.dtype)
        guidance = torch.full((n,), self.train_guidance, device=xt.device) if self.guidance_embeds else None
        out = (self.denoiser if module is None else module)(
            hidden_states=self.pack(xt.to(self.dtype)),
            timestep=self.schedule.model_timestep(t).to(xt.device) / self.schedule.num_train_timesteps,
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(self.dtype),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    @torch.no_grad()
    def sample_latents(self, prompts, seeds, steps: int = 28, guidance: float = 3.5, height=None, width=None):
        """x0 (N, 16, h, w) sampled by FluxPipeline (its own dynamic shift, guidance as an input); one CPU
        generator per image, so image i depends only on seed i."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if self.pipe.vae is None:
            raise RuntimeError(f"{self.name}: loaded with load_encoders=False, cannot generate")
        height, width = height or self.resolution, width or self.resolution
        packed = self.pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            max_sequence_length=self.max_sequence_length,
            output_type="latent",
        ).images
        return FluxPipeline._unpack_latents(packed, height, width, self.vae_scale_factor)

    def generate(self, prompts, seeds, steps: int = 28, guidance: float = 3.5, height=None, width=None):
        """-> list[PIL.Image], one per prompt; the pipeline runs the same transformer, so attached LoRAs are active.
        Defaults are FLUX.1-dev's (28 steps, guidance 3.5 as the transformer's input; ignored by schnell)."""
        images = self.decode(self.sample_latents(prompts, seeds, steps, guidance, height, width))
        return self.pipe.image_processor.postprocess(images, output_type="pil")
