"""Z-Image (Tongyi-MAI/Z-Image, Z-Image-Turbo): a 6 B single-stream DiT (ZImageTransformer2DModel) on FLUX.1's
16-channel VAE latents with a Qwen3-4B text encoder, trained by rectified flow.

Every Z-Image quirk lives here (file:line of diffusers 0.42.1, pipelines/z_image/pipeline_z_image.py):
- prompts go through the pipeline's own `encode_prompt` (:168): each prompt is wrapped in the Qwen3 chat template
  with `add_generation_prompt=True, enable_thinking=True` (:217-227), tokenized to max_sequence_length (512) and
  encoded by Qwen3; the embedding is the *last-but-one* hidden state (:240-244) with the padding dropped (:248-249),
  so each prompt gives a tensor of its own length. To cache and concatenate it, `encode_prompts` returns
  {"prompt_embeds": (N, 512, D) zero-padded, "prompt_mask": (N, 512) bool} and `denoise` takes `embeds[i][mask[i]]`
  again, the list the transformer wants;
- the transformer takes *lists* of per-image tensors: latents (C, 1, h, w) with a frame axis of 1 (:530-531) and
  caption features (L_i, D); it patchifies 2x2 itself (all_patch_size (2,)) and returns a list (:533-539);
- the transformer predicts x0 - eps, the negative of the velocity: the pipeline negates it (:567-568) before the
  Euler step, so `denoise` returns -output, the velocity eps - x0 (prediction_type "flow");
- its timestep input is 1 - sigma, not sigma: the pipeline passes (1000 - t) / 1000 for scheduler timestep
  t = sigma * 1000 (:510-511; the model multiplies by t_scale 1000 inside);
- CFG is `pos + g (pos - neg)` (:551) with the "" negative prompt (:187-188), on when g > 0 (:283): the pipeline's
  guidance g is standard CFG at scale 1 + g, and `sampling_cfg(g)` gives 1 + g (g = 0: no CFG, one pass).
  Z-Image-Turbo is distilled to run without CFG (guidance 0, 8 steps: the pipeline's example, :50-57); Z-Image
  (base) uses CFG (Flow-Factory's z_image configs: guidance 4.0). `cfg_normalization` / `cfg_truncation` (:307-308,
  :498-559) are off at the pipeline's defaults (False, 1.0) and are not part of the on-line sampler;
- sampling sigmas are linspace(1, 1/steps, steps) (:137-138), shifted by the scheduler; the pipeline always passes
  mu = calculate_shift(image tokens) (:474-483), which the scheduler uses only with `use_dynamic_shifting`.
  Z-Image-Turbo's scheduler_config.json has a static shift 3.0 and no dynamic shifting; a dynamic one becomes the
  equal static shift at the training size (`set_resolution`, as diffalign.models.flux);
- latents are (N, 16, H/8, W/8) with H, W multiples of 16 (:402-412); the VAE decode is x / scaling + shift (:593),
  FLUX.1's factors (0.3611, 0.1159), applied by vae_encode / vae_decode.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from diffalign.likelihood import Schedule
from diffalign.models.base import Family
from diffalign.models.flux import flow_shift
from diffalign.models.sd import load_pipe
from diffalign.quantize import pipeline_quantization

# Flow-Factory's Z-Image default LoRA targets (src/flow_factory/models/z_image/z_image.py, `default_target_modules`):
# the attention projections and the SwiGLU feed-forward of every block (main layers and both refiners).
ATTENTION = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
LORA_TARGET_MODULES = ATTENTION + ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
MAX_SEQUENCE_LENGTH = 512  # Qwen3 tokens, ZImagePipeline's default (chat template included)


class ZImageFamily(Family):
    """Z-Image / Z-Image-Turbo checkpoint (ZImagePipeline folder or hub id)."""

    max_sequence_length = MAX_SEQUENCE_LENGTH  # model.max_sequence_length overrides it

    name = "zimage"
    lora_prefix = "transformer"
    lora_target_modules = LORA_TARGET_MODULES
    lora_presets = {"attention": ATTENTION}
    prediction_type = "flow"
    lora_writer = ZImagePipeline
    lora_key_style = "peft"  # ZImagePipeline.load_lora_weights reads peft keys unconverted
    sdpa_processor = None  # ZSingleStreamAttnProcessor already dispatches to torch SDPA
    components = ["transformer", "scheduler", "vae", "text_encoder", "tokenizer"]

    def __init__(self, pipe: ZImagePipeline, vae_config: dict, dtype: torch.dtype):
        self.pipe, self.dtype, self.denoiser = pipe, dtype, pipe.transformer
        self.set_vae_geometry(vae_config)
        if self.denoiser.config.in_channels != self.latent_channels:
            raise ValueError(
                f"{self.name}: transformer in_channels {self.denoiser.config.in_channels} != "
                f"{self.latent_channels} VAE latent channels"
            )
        self.resolution = int(vae_config.get("sample_size") or 1024)
        self.set_resolution(self.resolution)

    def set_resolution(self, resolution: int) -> None:
        """The training schedule for `resolution` px: the folder's scheduler with its static shift (Z-Image-Turbo:
        3.0), or the static shift equal to its dynamic one at that size."""
        if resolution % (2 * self.vae_scale_factor):
            raise ValueError(
                f"{self.name}: resolution {resolution} must be a multiple of {2 * self.vae_scale_factor} "
                "(VAE factor x the transformer's 2x2 patches, as ZImagePipeline checks)"
            )
        tokens = (resolution // (2 * self.vae_scale_factor)) ** 2  # 2x2 patches, the pipeline's image_seq_len
        self.train_tokens, self.resolution = tokens, resolution  # on-line rounds sample at the size of the shift
        self.dynamic_shift = bool(self.pipe.scheduler.config.get("use_dynamic_shifting", False))
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            self.pipe.scheduler.config,
            use_dynamic_shifting=False,
            shift=flow_shift(self.pipe.scheduler.config, tokens),
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
        """Load from a local folder or hub id; load_encoders=False skips the VAE and Qwen3 (latent cache).
        quantize (none | int8 | fp8 | nf4, diffalign.quantize) loads the transformer quantized on `device`."""
        extra = {}
        if not load_encoders:
            extra["tokenizer"] = None
        extra.update(pipeline_quantization(quantize, "transformer", dtype, device))
        pipe, vae_config = load_pipe(ZImagePipeline, path, cls.components, dtype, load_encoders, vae_path, **extra)
        return cls(pipe, vae_config, dtype)

    def flow_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """ZImagePipeline's sampling schedule: sigmas linspace(1, 1/steps, steps) shifted by the training schedule's
        (static) shift."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
        return scheduler

    def sampling_cfg(self, guidance: float) -> float:
        """The pipeline's guidance g is CFG at scale 1 + g (pos + g (pos - neg)); g <= 0 is one conditional pass
        (Z-Image-Turbo)."""
        return 1.0 + guidance if guidance > 0 else 1.0

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, L, D) zero-padded, "prompt_mask": (N, L) bool}, L =
        max_sequence_length: the pipeline's per-prompt embeddings (chat template, Qwen3's last-but-one hidden
        state, padding dropped) laid into one tensor."""
        embeds = self.pipe.encode_prompt(
            list(prompts),  # the pipeline writes the templated text into the list it gets
            device=self.pipe.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )[0]
        first = embeds[0]
        padded = first.new_zeros(len(embeds), self.max_sequence_length, first.shape[-1])
        mask = torch.zeros(len(embeds), self.max_sequence_length, dtype=torch.bool, device=first.device)
        for i, e in enumerate(embeds):
            padded[i, : len(e)], mask[i, : len(e)] = e, True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 16, h, w), integer t (N,) in [0, 1000) -> velocity (N, 16, h, w); "size_info" is ignored.

        The transformer sees the list of latents (16, 1, h, w), timestep 1 - sigma_t and the list of unpadded
        caption features; its output x0 - eps is negated, as the pipeline does."""
        n, _, h, w = xt.shape
        if self.dynamic_shift and (h // 2) * (w // 2) != self.train_tokens:
            raise ValueError(
                f"{self.name}: latents {h}x{w} give {(h // 2) * (w // 2)} tokens but the schedule's shift was set for "
                f"{self.train_tokens} (call family.set_resolution(px) for the training size first)"
            )
        embeds, mask = cond["prompt_embeds"].to(self.dtype), cond["prompt_mask"].bool()
        captions = [embeds[i][mask[i]] for i in range(n)]
        total = self.schedule.num_train_timesteps
        timestep = (total - self.schedule.model_timestep(t).to(xt.device)) / total  # 1 - sigma_t
        out = (self.denoiser if module is None else module)(
            list(xt.to(self.dtype).unsqueeze(2).unbind(0)), timestep, captions, return_dict=False
        )[0]
        return -torch.stack(out).squeeze(2)

    @torch.no_grad()
    def sample_latents(self, prompts, seeds, steps: int = 8, guidance: float = 0.0, height=None, width=None):
        """x0 (N, 16, h, w) sampled by ZImagePipeline; one CPU generator per image, so image i depends only on
        seed i."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if self.pipe.vae is None:
            raise RuntimeError(f"{self.name}: loaded with load_encoders=False, cannot generate")
        return self.pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height or self.resolution,
            width=width or self.resolution,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            max_sequence_length=self.max_sequence_length,
            output_type="latent",
        ).images

    def generate(self, prompts, seeds, steps: int = 8, guidance: float = 0.0, height=None, width=None):
        """-> list[PIL.Image], one per prompt; the pipeline runs the same transformer, so attached LoRAs are active.
        Defaults are Z-Image-Turbo's (the pipeline's example: 8 steps, guidance 0 = no CFG); Z-Image (base) wants
        guidance ~4 and 28-50 steps."""
        images = self.decode(self.sample_latents(prompts, seeds, steps, guidance, height, width))
        return self.pipe.image_processor.postprocess(images, output_type="pil")
