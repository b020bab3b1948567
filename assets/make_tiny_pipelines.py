"""Write tiny, real diffusers pipeline folders (random weights) that load with `from_pretrained` like real checkpoints.

    python assets/make_tiny_pipelines.py          # writes assets/tiny/{sd15,sd15_v,sdxl}/

- sd15:    StableDiffusionPipeline, DDIMScheduler with SD1.5's folder settings (steps_offset=1, scaled_linear betas).
- sd15_v:  the same weights with prediction_type="v_prediction" (SD2-style), so v-prediction code paths are tested.
- sdxl:    StableDiffusionXLPipeline, two text encoders (CLIPTextModel + CLIPTextModelWithProjection), two tokenizers,
           EulerDiscreteScheduler, UNet with addition_embed_type="text_time".
Sizes follow reference/feasibility.md section 2: VAE with 4 levels (vae_scale_factor 8 as in real SD), UNet
sample_size 8 (so the native resolution is 64 px), text encoders with hidden size 32 and 2 layers. Seeded: the same
torch version writes the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.models.tokenizers import build_clip_tokenizer

OUT = Path(__file__).resolve().parent / "tiny"
WORDS = "a an the photo of cat dog red blue green circle square at left right top bottom painting drawing".split()
HIDDEN = 32  # text encoder width; SDXL cross-attention sees 2 * HIDDEN
# SD1.5 / SDXL noise schedules as in their scheduler_config.json files
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def text_encoder(tokenizer, with_projection: bool):
    torch.manual_seed(1 + with_projection)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,  # CLIPTextModel pools at the first eos id, so these must match
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def vae():
    torch.manual_seed(3)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),  # 4 levels -> vae_scale_factor 8
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    ).eval()


def sd15_unet():
    torch.manual_seed(4)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=HIDDEN,
        norm_num_groups=8,
    ).eval()


def sdxl_unet():
    torch.manual_seed(5)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN,  # 6 time ids * 8 + pooled text embeds
        cross_attention_dim=2 * HIDDEN,  # both text encoders' hidden states, concatenated
        transformer_layers_per_block=(1, 1),
        norm_num_groups=8,
    ).eval()


def save(pipe, name: str) -> None:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 1e6:.2f} MB")


def main() -> None:
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=77)
    sd15_parts = dict(
        vae=vae(),
        text_encoder=text_encoder(tokenizer, with_projection=False),
        tokenizer=tokenizer,
        unet=sd15_unet(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ddim = dict(SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    save(StableDiffusionPipeline(**sd15_parts, scheduler=DDIMScheduler(**ddim)), "sd15")
    v_scheduler = DDIMScheduler(**ddim, prediction_type="v_prediction", timestep_spacing="trailing")
    save(StableDiffusionPipeline(**sd15_parts, scheduler=v_scheduler), "sd15_v")

    sdxl = StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(tokenizer, with_projection=False),
        text_encoder_2=text_encoder(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=sdxl_unet(),
        scheduler=EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    save(sdxl, "sdxl")


if __name__ == "__main__":
    main()
