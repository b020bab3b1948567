"""Write tiny, real diffusers pipeline folders (random weights) that load with `from_pretrained` like real checkpoints.

    python assets/make_tiny_pipelines.py          # writes every folder under assets/tiny/
    python assets/make_tiny_pipelines.py flux     # writes only assets/tiny/flux/
    python assets/make_tiny_pipelines.py flux2_klein flux2_klein_distilled   # the FLUX.2-Klein folders

- sd15:    StableDiffusionPipeline, DDIMScheduler with SD1.5's folder settings (steps_offset=1, scaled_linear betas).
- sd15_v:  the same weights with prediction_type="v_prediction" (SD2-style), so v-prediction code paths are tested.
- sdxl:    StableDiffusionXLPipeline, two text encoders (CLIPTextModel + CLIPTextModelWithProjection), two tokenizers,
           EulerDiscreteScheduler, UNet with addition_embed_type="text_time".
- sd3:     StableDiffusion3Pipeline shaped like SD3.5-Medium: SD3Transformer2DModel with qk_norm="rms_norm" and a
           dual-attention block (attn2), two CLIPTextModelWithProjection (pooled 32 + 32 = pooled_projection_dim),
           a T5EncoderModel with d_model = joint_attention_dim = 64, FlowMatchEulerDiscreteScheduler(shift=3.0), and a
           16-channel VAE with SD3's shift_factor / scaling_factor and no quant convs.
- pixart:  PixArtSigmaPipeline: PixArtTransformer2DModel with out_channels 8 (learned sigma: [eps; variance]),
           a T5EncoderModel (d_model 32 = caption_channels), the SD VAE, DPMSolverMultistepScheduler with PixArt's
           linear betas.
- flux:    FluxPipeline shaped like FLUX.1-dev (diffusers' own FLUX test sizes): FluxTransformer2DModel with
           guidance_embeds=True, 1 double + 1 single block, in_channels 64 (16 VAE channels, 2x2-packed), CLIPTextModel
           (pooled 32) + T5 (d_model 64), FLUX.1-dev's dynamic-shift FlowMatchEulerDiscreteScheduler, a 16-channel VAE
           with FLUX.1's shift_factor / scaling_factor.
- zimage:  ZImagePipeline shaped like Z-Image-Turbo (diffusers' tests/pipelines/z_image/test_z_image.py sizes):
           ZImageTransformer2DModel (dim 32, 2 layers, 1 refiner layer each, cap_feat_dim 16), a Qwen3Model text encoder
           (hidden 16) with the byte-level Qwen2 tokenizer and Qwen3 chat template, Z-Image-Turbo's static-shift
           FlowMatchEulerDiscreteScheduler (shift 3.0), a 16-channel VAE with FLUX.1's shift / scaling factors.
- qwenimage: QwenImagePipeline shaped like Qwen-Image (diffusers' tests/pipelines/qwenimage/test_qwenimage.py, with
           Qwen-Image's 16 latent channels and 8x VAE): QwenImageTransformer2DModel (2 blocks, in_channels 64 =
           16 x 2x2 packed), a Qwen2_5_VLForConditionalGeneration text encoder (hidden 32 = joint_attention_dim),
           a Qwen2 byte-level BPE tokenizer whose template prefix is 34 tokens as with the real one (the pipeline's
           prompt_template_encode_start_idx), an AutoencoderKLQwenImage with Qwen-Image's per-channel latents_mean /
           latents_std and `sample_size` 64 in its config (the native size diffalign reads; the real VAE has none,
           so 1024), and Qwen-Image's scheduler_config.json (dynamic exponential shift 0.5..0.9 between 256 and 8192
           tokens, shift_terminal 0.02).
- flux2_klein: Flux2KleinPipeline shaped like FLUX.2-klein-base (diffusers' own Klein test sizes): Flux2Transformer2DModel
           without a guidance input (true CFG), in_channels 16 (4 VAE channels, 2x2-patchified), a 28-layer Qwen3 (the
           pipeline reads hidden states 9, 18, 27; width 16 -> joint_attention_dim 48), an AutoencoderKLFlux2 with
           seeded batch-norm statistics (not the identity), FLUX.2's dynamic-shift scheduler; `is_distilled` false.
- flux2_klein_distilled: the same weights with `is_distilled` true (FLUX.2-klein-4B: 4 steps, no CFG).
- flux2_dev: Flux2Pipeline shaped like FLUX.2-dev (diffusers' own Flux2 test sizes): the Klein transformer shape with
           guidance_embeds=True, a 30-layer Mistral3ForConditionalGeneration (the pipeline reads hidden states 10, 20,
           30) with a tiny Pixtral vision tower, and a PixtralProcessor whose tokenizer is the byte-level BPE plus
           Mistral's specials and a reduced Mistral chat template ([SYSTEM_PROMPT] ... [INST] ... [/INST]).
- wan:     WanPipeline shaped like Wan 2.1 T2V (diffusers' tests/pipelines/wan/test_wan.py sizes): WanTransformer3DModel
           patch (1, 2, 2), a UMT5EncoderModel (d_model 32 = text_dim), AutoencoderKLWan (16 channels, 4x temporal /
           8x spatial, the real latents_mean / latents_std), Wan2.1-T2V-1.3B's scheduler_config.json
           (UniPCMultistepScheduler, flow_prediction, use_flow_sigmas, flow_shift 3.0).
- wan22:   the same with a second expert transformer_2 (low noise, its own seed) and boundary_ratio 0.875, as
           Wan2.2-T2V-A14B's model_index.json.
The T5 tokenizers are real T5Tokenizers (Unigram) built in code, no sentencepiece file.
Sizes are the smallest that keep every code path of the real models: VAE with 4 levels (vae_scale_factor 8 as in real SD), UNet and
transformer sample_size 8 (so the native resolution is 64 px), text encoders with hidden size 32 and 2 layers.
Seeded (every builder seeds itself, so adding one leaves the others' weights unchanged): the same torch version
writes the same weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from diffalign.models.tokenizers import build_clip_tokenizer, build_qwen2_tokenizer, build_t5_tokenizer

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


def t5_encoder(tokenizer, d_model: int, seed: int, config_class=T5Config, model_class=T5EncoderModel):
    """T5 v1.1-style encoder (gated-gelu), as PixArt's and SD3's t5-v1_1-xxl (Wan: UMT5, the same shape); d_model is
    the consumer's width."""
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_class(config).eval()


def vae16(seed: int, shift_factor: float, scaling_factor: float):
    """A 16-latent-channel AutoencoderKL (SD3 / FLUX shape) at 64 px, seeded."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        sample_size=64,  # the families' native resolution here (FLUX.1's VAE config says 1024)
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    ).eval()


def sd3_vae():
    return vae16(6, shift_factor=0.0609, scaling_factor=1.5035)  # SD3's VAE values


def sd3_transformer():
    torch.manual_seed(7)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * HIDDEN,  # CLIP-L + CLIP-G states (32 + 32) and the T5 width
        caption_projection_dim=32,  # = heads * head_dim
        pooled_projection_dim=2 * HIDDEN,  # both pooled CLIP embeds
        pos_embed_max_size=16,  # up to 16 x 16 patches = 256 px
        dual_attention_layers=(0,),  # SD3.5-Medium style extra self-attention (attn2) in block 0
        qk_norm="rms_norm",
    ).eval()


def pixart_transformer():
    torch.manual_seed(8)
    return PixArtTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # learned sigma: [eps; variance]
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=HIDDEN,  # the T5 width
        use_additional_conditions=False,  # as PixArt-Σ
        norm_num_groups=8,
    ).eval()


def flux_vae():
    return vae16(11, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE values


def flux_transformer():
    """As diffusers' tests/pipelines/flux/test_pipeline_flux.py, with 16 latent channels (64 after 2x2 packing)."""
    torch.manual_seed(12)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=2 * HIDDEN,  # the T5 width
        pooled_projection_dim=HIDDEN,  # the CLIP pooled embed
        guidance_embeds=True,  # FLUX.1-dev style
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()


def flux(tokenizer, t5_tokenizer) -> FluxPipeline:
    """FluxPipeline shaped like FLUX.1-dev: CLIPTextModel (pooled) + T5, guidance embedding, FLUX.1-dev's
    scheduler_config.json (dynamic shifting between 256 and 4096 tokens, base_shift 0.5, max_shift 1.15)."""
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=flux_vae(),
        text_encoder=text_encoder(tokenizer, with_projection=False),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(t5_tokenizer, d_model=2 * HIDDEN, seed=13),
        tokenizer_2=t5_tokenizer,
        transformer=flux_transformer(),
    )


def zimage_transformer():
    """As diffusers' tests/pipelines/z_image/test_z_image.py; the pad tokens (torch.empty in __init__) seeded."""
    torch.manual_seed(15)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=16,  # the Qwen3 width
        axes_dims=[8, 4, 4],  # sums to the head dim 16
        axes_lens=[256, 32, 32],  # caption positions, then up to 32 x 32 patches (512 px)
    )
    with torch.no_grad():
        model.x_pad_token.copy_(torch.randn_like(model.x_pad_token) * 0.02)
        model.cap_pad_token.copy_(torch.randn_like(model.cap_pad_token) * 0.02)
    return model.eval()


def zimage() -> ZImagePipeline:
    """ZImagePipeline shaped like Z-Image-Turbo: Qwen3Model (last-but-one hidden states, width 16 = cap_feat_dim),
    Z-Image-Turbo's scheduler_config.json (shift 3.0, no dynamic shifting)."""
    tokenizer = build_qwen2_tokenizer(WORDS)
    torch.manual_seed(16)
    encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae16(17, shift_factor=0.1159, scaling_factor=0.3611),  # Z-Image uses FLUX.1's VAE
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=zimage_transformer(),
    )


# the words of QwenImagePipeline's system prompt, so its template prefix is 34 tokens as with Qwen2.5-VL's tokenizer
QWEN_TEMPLATE_WORDS = (
    "system user assistant image by detailing color shape size texture quantity text spatial relationships objects "
    "and background"
).split()


def qwen_text_encoder(tokenizer):
    """Qwen2.5-VL with a 2-layer, width-32 language model (diffusers' qwenimage test config, its vocab ours) and a
    1-block vision tower the pipeline never runs; the vision token ids lie past the vocabulary (no images)."""
    torch.manual_seed(14)
    n = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},  # head_dim 16 / 2
            rope_theta=1000000.0,
            vocab_size=n,
            bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=HIDDEN),
        hidden_size=HIDDEN,
        vocab_size=n,
        vision_start_token_id=n,
        vision_end_token_id=n + 1,
        vision_token_id=n + 2,
        image_token_id=n + 3,
        video_token_id=n + 4,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwenimage() -> QwenImagePipeline:
    """QwenImagePipeline shaped like Qwen-Image (see the module docstring)."""
    tokenizer = build_qwen2_tokenizer(WORDS + QWEN_TEMPLATE_WORDS)
    tokenizer.add_tokens(["Describe"])  # the capitalised first word of the system prompt, one token as in Qwen's
    torch.manual_seed(15)
    vae = AutoencoderKLQwenImage(  # latents_mean / latents_std: the class defaults, Qwen-Image's values
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    vae.register_to_config(sample_size=64)  # the tiny's native size (diffalign's QwenImageFamily reads it)
    torch.manual_seed(16)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 packing
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,  # the text encoder width
        guidance_embeds=False,  # Qwen-Image: true CFG, no guidance input
        axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image scheduler/scheduler_config.json
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=qwen_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def flux2_vae():
    """AutoencoderKLFlux2 at 64 px (4 levels, vae_scale_factor 8), 4 latent channels (FLUX.2: 32), seeded batch-norm
    running statistics over the 2x2-patchified 16 channels, so the pipeline's normalisation is not the identity."""
    torch.manual_seed(14)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,  # the family's native resolution here (FLUX.2's VAE config says 1024)
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(16) * 0.2)
        vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    return vae


def flux2_klein(tokenizer, is_distilled: bool) -> Flux2KleinPipeline:
    """Flux2KleinPipeline as diffusers' tests/pipelines/flux2/test_pipeline_flux2_klein.py builds it, with 4 latent
    channels, a Qwen3 deep enough for the pipeline's default hidden-state layers (9, 18, 27) and FLUX.2's
    scheduler_config.json (dynamic shifting, exponential time shift; the pipeline's mu is compute_empirical_mu)."""
    torch.manual_seed(15)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 VAE channels x 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,  # three Qwen3 hidden states of width 16, stacked
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,  # Klein: no guidance input
    ).eval()
    torch.manual_seed(16)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = Qwen3ForCausalLM(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        time_shift_type="exponential",
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


MISTRAL_SPECIALS = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral-Small-3.1's chat template reduced to text turns (content given as a string or as [{"type": "text", ...}])
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else message['content'] "
    "| selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{% else %}{{ text + eos_token }}{% endif %}{% endfor %}"
)


def mistral_processor() -> PixtralProcessor:
    """A PixtralProcessor (what FLUX.2-dev's `tokenizer` is): byte-level BPE with <s>, </s>, <pad>, Mistral's
    instruction and image specials, the reduced chat template, and a Pixtral image processor."""
    tok = build_qwen2_tokenizer(WORDS)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tok.add_special_tokens({**specials, "additional_special_tokens": MISTRAL_SPECIALS})
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(), tokenizer=tok, patch_size=6, chat_template=MISTRAL_CHAT_TEMPLATE
    )


def flux2_dev(processor) -> Flux2Pipeline:
    """Flux2Pipeline as diffusers' tests/pipelines/flux2/test_pipeline_flux2.py builds it, with the Klein tiny's
    latent shape, a guidance input and a Mistral3 deep enough for the default hidden-state layers (10, 20, 30)."""
    tok = processor.tokenizer
    torch.manual_seed(17)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,  # FLUX.2-dev: guidance-distilled
    ).eval()
    torch.manual_seed(18)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=1024,
            num_attention_heads=2,
            num_hidden_layers=30,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=None,
            **ids,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=30,
            patch_size=6,
            head_dim=8,
        ),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
        vision_feature_layer=-1,
        **ids,
    )
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    pipe = flux2_klein(build_qwen2_tokenizer(WORDS), is_distilled=False)  # the same scheduler and VAE
    return Flux2Pipeline(
        scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=text_encoder, tokenizer=processor, transformer=transformer
    )


def wan_transformer(seed: int):
    """As diffusers' tests/pipelines/wan/test_wan.py (text_dim = the UMT5 width)."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=HIDDEN,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def wan(t5_tokenizer, expert: bool = False) -> WanPipeline:
    """WanPipeline like Wan 2.1 T2V; expert=True adds Wan 2.2 A14B's low-noise transformer_2 and boundary_ratio."""
    torch.manual_seed(14)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    text_encoder = t5_encoder(t5_tokenizer, HIDDEN, 15, UMT5Config, UMT5EncoderModel)  # Wan's UMT5, T5 v1.1-shaped
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (UniPC on flow sigmas, shift 3.0)
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )
    return WanPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=wan_transformer(16),
        transformer_2=wan_transformer(17) if expert else None,
        boundary_ratio=0.875 if expert else None,  # Wan2.2-T2V-A14B-Diffusers model_index.json
    )


def save(pipe, name: str) -> None:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 1e6:.2f} MB")


def main(only: list[str]) -> None:
    """Write every pipeline, or only the named ones (e.g. `flux`)."""
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=77)
    if only:
        t5_tokenizer = build_t5_tokenizer(WORDS)
        qwen = build_qwen2_tokenizer(WORDS)
        builders = {
            "flux": lambda: flux(tokenizer, t5_tokenizer),
            "qwenimage": qwenimage,
            "zimage": zimage,
            "flux2_klein": lambda: flux2_klein(qwen, is_distilled=False),
            "flux2_klein_distilled": lambda: flux2_klein(qwen, is_distilled=True),
            "flux2_dev": lambda: flux2_dev(mistral_processor()),
            "wan": lambda: wan(t5_tokenizer),
            "wan22": lambda: wan(t5_tokenizer, expert=True),
        }
        for name in only:
            save(builders[name](), name)
        return
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

    t5_tokenizer = build_t5_tokenizer(WORDS)
    sd3 = StableDiffusion3Pipeline(
        transformer=sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=sd3_vae(),
        text_encoder=text_encoder(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder(tokenizer, with_projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder(t5_tokenizer, d_model=2 * HIDDEN, seed=9),
        tokenizer_3=t5_tokenizer,
    )
    save(sd3, "sd3")

    pixart = PixArtSigmaPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=t5_encoder(t5_tokenizer, d_model=HIDDEN, seed=10),
        vae=vae(),
        transformer=pixart_transformer(),
        # PixArt-Σ's scheduler_config.json
        scheduler=DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
        ),
    )
    save(pixart, "pixart")
    save(flux(tokenizer, t5_tokenizer), "flux")
    save(zimage(), "zimage")
    save(qwenimage(), "qwenimage")
    save(flux2_klein(build_qwen2_tokenizer(WORDS), is_distilled=False), "flux2_klein")
    save(flux2_klein(build_qwen2_tokenizer(WORDS), is_distilled=True), "flux2_klein_distilled")
    save(flux2_dev(mistral_processor()), "flux2_dev")
    save(wan(t5_tokenizer), "wan")
    save(wan(t5_tokenizer, expert=True), "wan22")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
