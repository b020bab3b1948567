"""Qwen-Image: a 20 B MMDiT (QwenImageTransformer2DModel, 60 double-stream blocks) on the 16-channel latents of a
Wan-style 3-D VAE, conditioned on Qwen2.5-VL-7B's last hidden states, trained by rectified flow.

Every Qwen-Image quirk lives here (line numbers: diffusers 0.42.1 pipelines/qwenimage/pipeline_qwenimage.py unless
another file is named):
- prompts go through the pipeline's own `encode_prompt` (l.225-268): each prompt is put in a fixed chat template
  with a system turn (l.175), run through Qwen2.5-VL, and of each prompt's valid tokens the last hidden states are
  kept minus the first `prompt_template_encode_start_idx` = 34 (the system turn, l.176 and l.211). The pipeline pads a
  batch to its longest prompt with a 0/1 mask (None when no row is padded, l.265). diffalign pads every prompt to
  `max_sequence_length` (512, the pipeline's default, l.432) with zeros and mask 0, so conditionings of different
  batches cache, stack and concatenate; `denoise` trims a batch back to its longest prompt and drops an all-ones mask,
  which is what the transformer gets from the pipeline (one host read per call);
- latents are 2x2-packed (`_pack_latents` / `_unpack_latents`, l.332-354) and the transformer takes their grid as
  `img_shapes` [(1, h/2, w/2)] per image for its RoPE (l.595); x0 stays (N, 16, h, w) in the estimator and the cache;
- the VAE is 3-D (AutoencoderKLQwenImage): images go in as one-frame videos (N, 3, 1, H, W), latents come out as
  (N, 16, 1, h, w); x0 drops the frame axis and `encode_images` / `decode` put it back. No scaling / shift factor but a
  per-channel normalisation x0 = (z - latents_mean) * (1 / latents_std) (pipeline_qwenimage_img2img.py l.242-251;
  decoding inverts it, l.705-714); vae_scale_factor = 2 ** len(temperal_downsample) = 8 (l.170), and sizes are
  multiples of 16 (2x2 packing, l.283);
- true CFG (l.553-672): `true_cfg_scale` with a negative prompt, two passes, and the guided velocity rescaled to the
  conditional one's norm, per packed token over its 64 channels: comb * ||cond|| / ||comb|| (l.668-672). `cfg` does
  the same, so the on-line sampler, GRPO's training forward and the pipeline agree. The negative prompt is ""
  (diffalign's unconditional prompt everywhere; Flow-Factory's default for Qwen-Image too). There is no guidance
  input (`guidance_embeds` False in Qwen-Image's transformer config);
- prediction_type "flow", the transformer called with timestep sigma (the pipeline passes t / 1000, l.647);
- the sampling grid: sigmas linspace(1, 1/steps, steps) (l.598), exponentially shifted by mu = calculate_shift(image
  tokens) (l.599-606; Qwen-Image's scheduler_config.json: 0.5 at 256 tokens to 0.9 at 8192), then stretched so the last
  sigma is `shift_terminal` 0.02 (scheduling_flow_match_euler_discrete.py `set_timesteps` step 3). `flow_scheduler`
  calls `set_timesteps` with these sigmas and mu, as the pipeline does. The training schedule (the estimator's sigma
  table) is the static shift e^mu at the training size, as for FLUX (1024 px: 4096 tokens, mu 0.69, shift 2.0), on the
  scheduler's own table, which has no terminal stretch. (diffusers' train_dreambooth_lora_qwen_image.py l.1210 asks
  for shift=3.0, which its table ignores: with use_dynamic_shifting the scheduler's __init__ applies no shift.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from diffalign.likelihood import Schedule
from diffalign.models.base import Family
from diffalign.models.sd import load_pipe
from diffalign.quantize import pipeline_quantization

# Joint attention of the image stream and the text ("added") stream: the attention part of Flow-Factory's Qwen-Image
# default (src/flow_factory/models/qwen_image/qwen_image.py `default_target_modules`, which adds the MLPs' first
# linears); diffusers' train_dreambooth_lora_qwen_image.py (l.1284) takes the image stream's four only.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MAX_SEQUENCE_LENGTH = 512  # text tokens after the template drop, QwenImagePipeline.__call__'s default
NATIVE_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (latent pixels): 1024 px at the VAE's 8x


class QwenImageFamily(Family):
    """Qwen-Image checkpoint (QwenImagePipeline folder or hub id, e.g. Qwen/Qwen-Image, Qwen/Qwen-Image-2512)."""

    max_sequence_length = MAX_SEQUENCE_LENGTH  # model.max_sequence_length overrides it

    name = "qwenimage"
    lora_prefix = "transformer"
    lora_presets = {"attention": LORA_TARGET_MODULES}
    lora_target_modules = LORA_TARGET_MODULES
    prediction_type = "flow"
    lora_writer = QwenImagePipeline
    lora_key_style = "peft"  # as diffusers' Qwen-Image script saves; QwenImagePipeline.load_lora_weights reads it
    sdpa_processor = None  # QwenDoubleStreamAttnProcessor2_0 already uses torch SDPA
    components = ["transformer", "scheduler", "vae", "text_encoder", "tokenizer"]

    def __init__(self, pipe: QwenImagePipeline, vae_config: dict, dtype: torch.dtype):
        self.pipe, self.dtype, self.denoiser = pipe, dtype, pipe.transformer
        self.vae_scale_factor = 2 ** len(vae_config["temperal_downsample"])  # pipeline_qwenimage.py l.170
        self.latent_channels = int(vae_config["z_dim"])
        if self.denoiser.config.in_channels != 4 * self.latent_channels:
            raise ValueError(
                f"{self.name}: transformer in_channels {self.denoiser.config.in_channels} != 4 x "
                f"{self.latent_channels} VAE latent channels (2x2 packing)"
            )
        config = pipe.scheduler.config
        if config.get("use_dynamic_shifting") and config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{self.name}: only the exponential dynamic shift equals a static one (scheduler config)")
        # (1, C, 1, 1, 1): per-channel latent statistics, shaped as the pipeline shapes them (l.705-712)
        self.latents_mean = torch.tensor(vae_config["latents_mean"]).view(1, -1, 1, 1, 1)
        self.latents_inv_std = 1.0 / torch.tensor(vae_config["latents_std"]).view(1, -1, 1, 1, 1)
        self.resolution = int(vae_config.get("sample_size") or NATIVE_SAMPLE_SIZE * self.vae_scale_factor)
        self.set_resolution(self.resolution)

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
        """Load from a local folder or hub id; load_encoders=False skips the VAE and Qwen2.5-VL (latent cache).
        quantize (none | int8 | fp8 | nf4, diffalign.quantize) loads the transformer quantized for training on
        `device`."""
        extra = {}
        extra.update(pipeline_quantization(quantize, "transformer", dtype, device))
        pipe, vae_config = load_pipe(
            QwenImagePipeline, path, cls.components, dtype, load_encoders, vae_path, AutoencoderKLQwenImage, **extra
        )
        return cls(pipe, vae_config, dtype)

    def set_resolution(self, resolution: int) -> None:
        """Build the training schedule for images of `resolution` px: the folder's scheduler with the static shift
        e^mu its dynamic shifting gives at that size (a fresh copy, never set_timesteps'd); mu is kept for
        `flow_scheduler`. `resolution` becomes the family's size, so on-line rounds and `generate` sample at the size
        the shift was set for (`denoise` refuses any other)."""
        tokens = (resolution // (2 * self.vae_scale_factor)) ** 2  # packed 2x2 latent patches
        config = self.pipe.scheduler.config
        self.train_tokens, self.resolution = tokens, resolution
        self.mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )  # the pipeline's l.600-606
        shift = math.exp(self.mu) if config.get("use_dynamic_shifting") else float(config["shift"])
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=False, shift=shift)
        self.schedule = Schedule(self.scheduler, self.prediction_type)

    def flow_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """QwenImagePipeline's sampling schedule at the training size: its scheduler, `set_timesteps` with sigmas
        linspace(1, 1/steps, steps) and mu (l.598-613), so the dynamic shift and the terminal stretch are its own."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=self.mu)
        return scheduler

    def cfg(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
        """Qwen-Image's true CFG (l.668-672): uncond + w (cond - uncond), rescaled per packed token to the norm of the
        conditional prediction. (N, 16, h, w) each -> (N, 16, h, w)."""
        _, _, h, w = pred_cond.shape
        cond = self.pack(pred_cond)  # (N, h/2 * w/2, 64)
        comb = self.pack(pred_uncond + guidance * (pred_cond - pred_uncond))
        scale = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)  # (N, tokens, 1)
        return self.unpack(comb * scale, h, w)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, M, D), "prompt_embeds_mask": (N, M) long}, M = max_sequence_length:
        the pipeline's `encode_prompt` (template, 34-token drop), zero-padded to M with mask 0."""
        embeds, mask = self.pipe.encode_prompt(
            list(prompts), device=self.pipe.text_encoder.device, max_sequence_length=self.max_sequence_length
        )
        n, length, _ = embeds.shape
        if mask is None:  # the pipeline's way of saying no row is padded
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - length
        return {"prompt_embeds": F.pad(embeds, (0, 0, 0, pad)), "prompt_embeds_mask": F.pad(mask.long(), (0, pad))}

    def text_inputs(self, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The padded cond -> (embeds (N, L, D), mask (N, L) or None) as the pipeline feeds them: L the batch's
        longest prompt, no mask when every prompt is that long."""
        mask = cond["prompt_embeds_mask"]
        lengths = mask.sum(dim=1)  # (N, M) -> (N,)
        shortest, longest = torch.stack([lengths.min(), lengths.max()]).tolist()  # one host read
        embeds = cond["prompt_embeds"][:, :longest].to(self.dtype)
        return embeds, None if shortest == longest else mask[:, :longest]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h/2 * w/2, 4C), as QwenImagePipeline packs its latents."""
        n, c, h, w = x.shape
        return QwenImagePipeline._pack_latents(x, n, c, h, w)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, h/2 * w/2, 4C) -> (N, C, h, w) for latents of h x w (the pipeline's `_unpack_latents`, frame dropped)."""
        f = self.vae_scale_factor
        return QwenImagePipeline._unpack_latents(tokens, h * f, w * f, f)[:, :, 0]  # (N, C, 1, h, w) -> (N, C, h, w)

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 16, h, w), integer t (N,) in [0, 1000) -> velocity (N, 16, h, w); "size_info" is ignored.

        The transformer sees the packed tokens, their grid (img_shapes), the batch's text states and mask and
        timestep sigma_t. The shift of sigma_t was fixed for `set_resolution`'s size; latents of another size raise.
        """
        n, _, h, w = xt.shape
        if (h // 2) * (w // 2) != self.train_tokens:
            raise ValueError(
                f"{self.name}: latents {h}x{w} give {(h // 2) * (w // 2)} tokens but the schedule's shift was set for "
                f"{self.train_tokens} (call family.set_resolution(px) for the training size first)"
            )
        embeds, mask = self.text_inputs(cond)
        out = (self.denoiser if module is None else module)(
            hidden_states=self.pack(xt.to(self.dtype)),
            timestep=self.schedule.model_timestep(t).to(xt.device) / self.schedule.num_train_timesteps,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * n,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> x0 (N, 16, H/8, W/8) = (z - latents_mean) / latents_std, fp32; z the posterior
        mean of each image as a one-frame video."""
        vae, parts = self.pipe.vae, []
        mean, inv_std = self.latents_mean.to(vae.device, vae.dtype), self.latents_inv_std.to(vae.device, vae.dtype)
        for chunk in images.split(batch_size):
            frames = chunk.to(vae.device, vae.dtype)[:, :, None]  # (n, 3, H, W) -> (n, 3, 1, H, W)
            z = vae.encode(frames).latent_dist.mode()  # (n, 16, 1, h, w)
            parts.append(((z - mean) * inv_std)[:, :, 0].float())  # -> (n, 16, h, w)
        return torch.cat(parts)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """x0 (N, 16, h, w) -> images (N, 3, 8h, 8w) in [-1, 1], fp32: the pipeline's own un-normalisation (l.705-714)."""
        vae, parts = self.pipe.vae, []
        mean, inv_std = self.latents_mean.to(vae.device, vae.dtype), self.latents_inv_std.to(vae.device, vae.dtype)
        for chunk in x0.split(batch_size):
            z = chunk.to(vae.device, vae.dtype)[:, :, None] / inv_std + mean  # (n, 16, h, w) -> (n, 16, 1, h, w)
            parts.append(vae.decode(z, return_dict=False)[0][:, :, 0].float().clamp(-1, 1))  # -> (n, 3, H, W)
        return torch.cat(parts)

    @torch.no_grad()
    def sample_latents(self, prompts, seeds, steps: int = 50, guidance: float = 4.0, height=None, width=None):
        """x0 (N, 16, h, w) sampled by QwenImagePipeline (its shift, true CFG with negative prompt "" when
        guidance > 1); one CPU generator per image, so image i depends only on seed i."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if self.pipe.vae is None:
            raise RuntimeError(f"{self.name}: loaded with load_encoders=False, cannot generate")
        height, width = height or self.resolution, width or self.resolution
        packed = self.pipe(
            prompt=list(prompts),
            negative_prompt=[""] * len(prompts) if guidance > 1 else None,
            true_cfg_scale=guidance,
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            max_sequence_length=self.max_sequence_length,
            output_type="latent",
        ).images
        f = self.vae_scale_factor
        return self.unpack(packed, height // f, width // f)

    def generate(self, prompts, seeds, steps: int = 50, guidance: float = 4.0, height=None, width=None):
        """-> list[PIL.Image], one per prompt; the pipeline runs the same transformer, so attached LoRAs are active.
        Defaults are QwenImagePipeline's (50 steps, true_cfg_scale 4.0)."""
        images = self.decode(self.sample_latents(prompts, seeds, steps, guidance, height, width))
        return self.pipe.image_processor.postprocess(images, output_type="pil")
