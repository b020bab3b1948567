"""FLUX.2 (dev and Klein): a Flux2Transformer2DModel (MMDiT, fused single-stream blocks) on 2x2-patchified,
batch-norm-normalised AutoencoderKLFlux2 latents, trained by rectified flow. One family; the variant is the folder's
pipeline class (model_index `_class_name`) and its config. Line numbers: diffusers 0.42.1
pipelines/flux2/pipeline_flux2_klein.py (K) and pipeline_flux2.py (D).

Every FLUX.2 quirk lives here:
- variants: `Flux2KleinPipeline` (FLUX.2-klein 4B / 9B, Qwen3 text encoder) and `Flux2Pipeline` (FLUX.2-dev 32B,
  Mistral-Small-3.1 text encoder with the pipeline's system message, D 65-129 / 304-353). Klein's `is_distilled`
  (model_index.json, K 186 / 198) tells the 4-step distilled checkpoints (FLUX.2-klein-4B / 9B) from the base ones
  (FLUX.2-klein-base-4B / 9B);
- guidance, three kinds: Klein base uses *true CFG* with the "" prompt, pred = uncond + w (cond - uncond) when
  w > 1 (K 595-596, 749-760, 864-877); distilled Klein uses none (`do_classifier_free_guidance` is False whatever
  guidance_scale says, K 596); FLUX.2-dev is guidance-distilled: w is the transformer's `guidance` input
  (`guidance_embeds=True`, D 950-952, 977), no CFG pass; offline training feeds `train_guidance` 3.5 (the default of
  diffusers' train_dreambooth_lora_flux2.py), on-line `sampling.guidance`. `sampling_cfg` returns the CFG scale the
  sampler must use;
- prompts: the pipeline's own `encode_prompt` -> prompt_embeds (N, 512, 3 D_text), the text model's hidden states
  of layers (9, 18, 27) for Qwen3 (K 215, 257-261) or (10, 20, 30) for Mistral (D 312), stacked along features,
  prompts rendered by the chat template (Qwen3 with enable_thinking=False, K 226-232). The text position ids
  (0, 0, 0, l) are rebuilt in `denoise` with the pipeline's `_prepare_text_ids` (K 267);
- latents: the VAE's latents (N, 32, H/8, W/8) are 2x2-patchified to (N, 128, H/16, W/16) and normalised by the
  VAE's batch-norm running statistics, (z - mean) / sqrt(var + eps) (K 464-476, the training script
  examples/dreambooth/train_dreambooth_lora_flux2_klein.py does the same), and the noise is drawn in that space
  (K 496). x0 here *is* that normalised, patchified latent: `latent_channels` = 4 x the VAE's, `vae_scale_factor`
  = 2 x the VAE's (16 pixels per x0 cell), so the on-line samplers' initial noise is the pipeline's. `denoise`
  packs it to (N, h w, 128) tokens (`_pack_latents`, K 389) with 4-D position ids (0, row, col, 0)
  (`_prepare_latent_ids`, K 287); `encode_images` / `decode` apply and undo patchify + normalisation (K 911-916);
- prediction_type "flow": velocity eps - x0 at x_t = (1 - sigma) x0 + sigma eps, the transformer called with
  timestep sigma (the pipeline passes t / 1000, K 853);
- the sampling grid: sigmas linspace(1, 1/S, S), shifted by the scheduler's exponential time shift at
  mu = compute_empirical_mu(image tokens, S) (K 63-78, 814-825): the shift depends on the size *and the step count*
  (1024 px: e^mu = 7.6 at 50 steps, 9.9 at 4). `flow_scheduler(S)` is exactly that grid. The training schedule
  (`set_resolution`) is the folder's scheduler with the static shift e^mu at the training size and the variant's
  own step count (`default_steps`: 4 distilled, 50 otherwise), as flux.py does for FLUX.1's dynamic shift.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import (
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from diffalign.likelihood import Schedule
from diffalign.models.base import Family
from diffalign.models.sd import _one_line, check_components
from diffalign.quantize import pipeline_quantization

# Flow-Factory's FLUX.2-klein default targets (src/flow_factory/models/flux/flux2_klein.py `default_target_modules`):
# both streams' attention and feed-forwards in the double blocks, the fused qkv+mlp input of the single blocks.
LORA_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_TARGET_MODULES = LORA_ATTENTION + [
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "to_qkv_mlp_proj",
]
MAX_SEQUENCE_LENGTH = 512  # text tokens, both pipelines' default
TRAIN_GUIDANCE = 3.5  # FLUX.2-dev's guidance input offline (examples/dreambooth/train_dreambooth_lora_flux2.py)
PIPELINES = {"Flux2KleinPipeline": Flux2KleinPipeline, "Flux2Pipeline": Flux2Pipeline}  # model_index _class_name


def pipeline_class(path: str) -> type:
    """The folder's (or hub id's) pipeline class from model_index.json: Flux2KleinPipeline or Flux2Pipeline."""
    name = DiffusionPipeline.load_config(path)["_class_name"]
    if name not in PIPELINES:
        raise ValueError(f"{path}: '{name}' is not a FLUX.2 pipeline ({', '.join(PIPELINES)})")
    return PIPELINES[name]


class Flux2Family(Family):
    """FLUX.2-dev or FLUX.2-klein (base or distilled) checkpoint: a Flux2Pipeline / Flux2KleinPipeline folder or hub
    id."""

    max_sequence_length = MAX_SEQUENCE_LENGTH  # model.max_sequence_length overrides it

    name = "flux2"
    lora_prefix = "transformer"
    lora_presets = {"attention": LORA_ATTENTION, "attention+mlp": LORA_TARGET_MODULES}
    lora_target_modules = LORA_TARGET_MODULES
    prediction_type = "flow"
    lora_key_style = "peft"  # as diffusers' FLUX.2 scripts save; Flux2LoraLoaderMixin.load_lora_weights reads it
    sdpa_processor = None  # Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor already use torch SDPA
    components = ["transformer", "scheduler", "vae", "text_encoder", "tokenizer"]

    def __init__(self, pipe, vae_config: dict, dtype: torch.dtype, train_guidance: float = TRAIN_GUIDANCE):
        self.pipe, self.dtype, self.denoiser = pipe, dtype, pipe.transformer
        self.lora_writer = type(pipe)  # its save_lora_weights / load_lora_weights (Flux2LoraLoaderMixin)
        self.klein = isinstance(pipe, Flux2KleinPipeline)
        self.distilled = bool(self.klein and pipe.config.is_distilled)
        self.default_steps = 4 if self.distilled else 50  # model cards: klein-4B/9B 4 steps; base and dev 50
        self.guidance_embeds = bool(self.denoiser.config.guidance_embeds)
        self.train_guidance = train_guidance
        self.set_vae_geometry(vae_config)
        if self.denoiser.config.in_channels != self.latent_channels:
            raise ValueError(
                f"{self.name}: transformer in_channels {self.denoiser.config.in_channels} != 4 x "
                f"{self.latent_channels // 4} VAE latent channels (2x2 patches)"
            )
        self.resolution = int(vae_config.get("sample_size") or 1024)
        self.set_resolution(self.resolution)

    def set_vae_geometry(self, vae_config: dict) -> None:
        """x0 is the 2x2-patchified latent: 4 x the VAE's channels, 2 x its downsampling per x0 cell."""
        self.vae_scale_factor = 2 ** len(vae_config["block_out_channels"])  # 2 x 2^(levels - 1)
        self.latent_channels = 4 * vae_config["latent_channels"]

    def set_resolution(self, resolution: int) -> None:
        """Training schedule for `resolution` px: the folder's scheduler with the static shift e^mu,
        mu = compute_empirical_mu(tokens, default_steps) (a fresh copy, never set_timesteps'd)."""
        tokens = (resolution // self.vae_scale_factor) ** 2
        self.train_tokens = tokens
        shift = math.exp(compute_empirical_mu(tokens, self.default_steps))
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
        """Load from a local folder or hub id; load_encoders=False skips the VAE and the text encoder (latent cache).
        The VAE is an AutoencoderKLFlux2, loaded fp32; quantize (none | int8 | fp8 | nf4) loads the transformer
        quantized for training on `device`."""
        check_components(path, [c for c in cls.components if load_encoders or c not in ("vae", "text_encoder")])
        kwargs = {}
        kwargs.update(pipeline_quantization(quantize, "transformer", dtype, device))
        vae_source = dict(pretrained_model_name_or_path=vae_path or path, subfolder=None if vae_path else "vae")
        try:
            klass = pipeline_class(path)
            vae_config = AutoencoderKLFlux2.load_config(**vae_source)
            if load_encoders:
                kwargs["vae"] = AutoencoderKLFlux2.from_pretrained(**vae_source, dtype=torch.float32)
            else:
                kwargs.update(vae=None, text_encoder=None)
            pipe = klass.from_pretrained(path, dtype=dtype, **kwargs)
        except (OSError, ValueError) as err:
            raise OSError(f"{path}: cannot load the FLUX.2 pipeline ({_one_line(err)})") from err
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, vae_config, dtype)

    def flow_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """The pipeline's sampling grid for `steps` steps at the training size: sigmas linspace(1, 1/steps, steps)
        time-shifted at mu = compute_empirical_mu(tokens, steps) (K 814-825)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        mu = compute_empirical_mu(self.train_tokens, steps)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
        return scheduler

    def sampling_cfg(self, guidance: float) -> float:
        """CFG scale of on-line sampling: Klein base `guidance` (true CFG with ""); distilled Klein 1 (none, as its
        pipeline ignores guidance_scale); FLUX.2-dev 1, with `guidance` as the transformer's input."""
        if self.guidance_embeds:
            self.train_guidance = guidance
            return 1.0
        return 1.0 if self.distilled else guidance

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, L, 3 D_text)} via the pipeline's encode_prompt."""
        embeds, _ = self.pipe.encode_prompt(
            list(prompts), device=self.pipe.text_encoder.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds}

    def bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE batch-norm mean and std (1, 4C, 1, 1) the pipeline normalises patchified latents with."""
        bn = self.pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.pipe.vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> x0 (N, 4C, H/16, W/16): posterior mode, patchified, batch-norm normalised
        (the pipeline's `_encode_vae_image`, K 464-476), fp32."""
        vae, parts = self.pipe.vae, []
        for chunk in images.split(batch_size):
            z = Flux2KleinPipeline._patchify_latents(vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mode())
            mean, std = self.bn_stats(z)
            parts.append(((z - mean) / std).float())
        return torch.cat(parts)

    def raw_latents(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (N, 4C, h, w) -> the VAE's latents (N, C, 2h, 2w): de-normalised and unpatchified (K 911-916)."""
        mean, std = self.bn_stats(x0)
        return Flux2KleinPipeline._unpatchify_latents(x0 * std + mean)

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """VAE latents (N, C, h, w) -> images (N, 3, 8h, 8w) in [-1, 1], fp32."""
        vae = self.pipe.vae
        return torch.cat(
            [vae.decode(c.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1) for c in latents.split(batch_size)]
        )

    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """x0 (N, 4C, h, w) -> images (N, 3, 16h, 16w) in [-1, 1], fp32."""
        return self.decode_raw(self.raw_latents(x0.to(self.pipe.vae.device, torch.float32)), batch_size)

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 4C, h, w), integer t (N,) in [0, 1000) -> velocity (N, 4C, h, w); "size_info" is ignored.

        The transformer sees the packed tokens (N, h w, 4C), their ids (0, row, col, 0), the text ids (0, 0, 0, l),
        timestep sigma_t and (FLUX.2-dev) the guidance input `train_guidance`, as the pipelines call it. The shift of
        sigma_t was fixed for `set_resolution`'s size; latents of another size raise.
        """
        n, c, h, w = xt.shape
        if h * w != self.train_tokens:
            raise ValueError(
                f"{self.name}: latents {h}x{w} give {h * w} tokens but the schedule's shift was set for "
                f"{self.train_tokens} (call family.set_resolution(px) for the training size first)"
            )
        embeds = cond["prompt_embeds"].to(self.dtype)
        x = xt.to(self.dtype)
        guidance = torch.full((n,), self.train_guidance, device=xt.device) if self.guidance_embeds else None
        out = (self.denoiser if module is None else module)(
            hidden_states=Flux2KleinPipeline._pack_latents(x),  # (N, 4C, h, w) -> (N, h w, 4C)
            timestep=self.schedule.model_timestep(t).to(xt.device) / self.schedule.num_train_timesteps,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds[:1]).to(xt.device),  # (1, L, 4), shared by the batch
            img_ids=Flux2KleinPipeline._prepare_latent_ids(x[:1]).to(xt.device),  # (1, h w, 4)
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(n, c, h, w)  # (N, h w, 4C) -> (N, 4C, h, w), row-major tokens

    @torch.no_grad()
    def generate(self, prompts, seeds, steps: int | None = None, guidance: float = 4.0, height=None, width=None):
        """-> list[PIL.Image], one per prompt, sampled by the family's diffusers pipeline (the same transformer, so
        attached LoRAs are active). Defaults: the variant's steps (4 distilled Klein, 50 otherwise) and guidance 4.0
        (both pipelines' default: CFG on Klein base, the transformer's input on dev, ignored by distilled Klein)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if self.pipe.vae is None:
            raise RuntimeError(f"{self.name}: loaded with load_encoders=False, cannot generate")
        height, width = height or self.resolution, width or self.resolution
        out = self.pipe(
            prompt=list(prompts),
            num_inference_steps=steps or self.default_steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            max_sequence_length=self.max_sequence_length,
            output_type="latent",
        ).images
        if not self.klein:  # Flux2Pipeline returns the packed tokens (D 1014): (N, h w, 4C) -> VAE latents
            n, f = out.shape[0], self.vae_scale_factor
            out = self.raw_latents(out.permute(0, 2, 1).reshape(n, -1, height // f, width // f).float())
        images = self.decode_raw(out)  # Klein returns the VAE's latents already (K 911-918)
        return self.pipe.image_processor.postprocess(images, output_type="pil")
