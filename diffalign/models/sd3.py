"""Stable Diffusion 3 / 3.5: an MMDiT (SD3Transformer2DModel) on 16-channel VAE latents, trained by rectified flow.

Every SD3 quirk lives here:
- prompts go through the pipeline's own `encode_prompt`: CLIP-L and CLIP-G penultimate states (concatenated, padded
  to the T5 width) followed by T5 tokens along the sequence, (N, 77 + 256, 4096), plus both pooled CLIP embeds
  (N, 2048). Without T5 (`t5=False`, or a folder with text_encoder_3 null) the pipeline fills the T5 part with
  zeros, as diffusers does for `text_encoder_3=None`;
- prediction_type "flow": the transformer predicts the velocity eps - x0 at x_t = (1 - sigma_t) x0 + sigma_t eps;
- the training schedule is the folder's FlowMatchEulerDiscreteScheduler (shift 3.0 for SD3 / SD3.5): the integer t
  of the estimator indexes its sigma table (`Schedule.sigma`), and `denoise` calls the transformer with the
  matching scheduler timestep sigma_t * 1000, the value the pipeline uses at that sigma;
- the VAE has a shift_factor as well as a scaling_factor (vae_encode / vae_decode apply both).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from diffalign.likelihood import Schedule
from diffalign.models.base import Family
from diffalign.models.sd import generate_images, load_pipe

# Joint attention: image-stream projections + the text-stream ("added") ones (flow_grpo's SD3 LoRA targets).
# SD3.5-Medium's extra self-attention blocks (attn2) match to_q/k/v/out.0 too.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MAX_SEQUENCE_LENGTH = 256  # T5 tokens, the pipeline's default


class SD3Family(Family):
    """SD3 / SD3.5 checkpoint (StableDiffusion3Pipeline folder or hub id)."""

    max_sequence_length = MAX_SEQUENCE_LENGTH  # T5 tokens; model.max_sequence_length overrides it

    name = "sd3"
    lora_prefix = "transformer"
    lora_presets = {"attention": LORA_TARGET_MODULES}  # no convolutions in the blocks (only the patch embed)
    lora_target_modules = LORA_TARGET_MODULES
    prediction_type = "flow"
    lora_writer = StableDiffusion3Pipeline
    lora_key_style = "peft"  # as diffusers' SD3 scripts save (its UNet converter would rename only some keys)
    sdpa_processor = None  # the joint-attention processors already use torch SDPA
    # checked before loading; T5 (text_encoder_3, tokenizer_3) is optional and loaded as the folder says
    components = ["transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]

    def __init__(self, pipe: StableDiffusion3Pipeline, vae_config: dict, dtype: torch.dtype):
        self.pipe = pipe
        self.dtype = dtype
        self.denoiser = pipe.transformer
        # Training schedule: a copy of the folder's flow-matching scheduler (shift included), never set_timesteps'd
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.schedule = Schedule(self.scheduler, self.prediction_type)
        self.schedule.sigma(torch.zeros(1, dtype=torch.long))  # dynamic shifting (Flux-style) fails here, at load
        self.set_vae_geometry(vae_config)
        self.resolution = pipe.transformer.config.sample_size * self.vae_scale_factor

    @classmethod
    def load(
        cls, path: str, dtype: torch.dtype = torch.float32, load_encoders: bool = True, vae_path=None, t5: bool = True
    ):
        """Load from a local folder or hub id; load_encoders=False skips the VAE and all text encoders, t5=False
        only T5 (4.7 B params in SD3; the T5 part of the prompt embeds is then zeros)."""
        extra = dict(image_encoder=None, feature_extractor=None)
        if not (t5 and load_encoders):
            extra.update(text_encoder_3=None, tokenizer_3=None)
        pipe, vae_config = load_pipe(
            StableDiffusion3Pipeline, path, cls.components, dtype, load_encoders, vae_path, **extra
        )
        return cls(pipe, vae_config, dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, 77 + 256, D_joint), "pooled_prompt_embeds": (N, P)}, via the
        pipeline (CLIP-L + CLIP-G + T5, or zeros for T5 when it is not loaded)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts),
            None,
            None,
            device=self.pipe.text_encoder.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 16, h, w), integer t (N,) in [0, 1000) -> velocity (N, 16, h, w); the transformer sees sigma_t * 1000.

        "size_info" is ignored (SD3 has no micro-conditioning).
        """
        timestep = self.schedule.model_timestep(t)  # (N,) fp32, a value of the scheduler's timesteps
        return (self.denoiser if module is None else module)(
            hidden_states=xt.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"].to(self.dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(self.dtype),
            return_dict=False,
        )[0]

    def generate(self, prompts, seeds, steps: int = 28, guidance: float = 7.0, height=None, width=None):
        """-> list[PIL.Image], one per prompt; the pipeline runs the same transformer, so attached LoRAs are active.
        Defaults are the SD3 pipeline's (28 steps, CFG 7.0; SD3.5 model cards use CFG 3.5-4.5)."""
        return generate_images(
            self, prompts, seeds, steps, guidance, height, width, max_sequence_length=self.max_sequence_length
        )
