"""Memory accounting of one Diffusion-DPO LoRA step (1 pair = 2 images) per family and setting, on CPU, no weights.

    python benchmarks/memory.py                      # every family below: SD1.5@512, SDXL, SD3.5-M, FLUX.1-dev,
                                                     # Z-Image, Qwen-Image, FLUX.2-klein 4B / 9B, FLUX.2-dev @1024;
                                                     # Wan 2.1 1.3B / 14B (one 81-frame 480p video pair)
    python benchmarks/memory.py --families zimage    # one family
    python benchmarks/memory.py --families sd15 --json out.json
    python benchmarks/memory.py --shards 8           # plus the per-GPU figure with 8-way FSDP2 next to DDP's

Each denoiser is built on the `meta` device from its published config (written below: nothing is downloaded) and
counted exactly:
- frozen weights: parameter bytes in the setting's dtype; quantized settings (diffalign.quantize) hold the Linear
  weights as torchao int8 (1 byte) or bitsandbytes NF4 (0.5 byte + one fp32 absmax per 64 weights) and the rest bf16;
- LoRA: rank 16 on the family's default attention targets, fp32 params + grads + AdamW's two moments (16 B/param);
- activations: the bytes autograd saves for backward in the policy forward on 2 latents (winner + loser), counted
  with saved-tensor hooks while the real model runs on meta tensors. With gradient checkpointing: the inputs of every
  block plus the largest single block's saved tensors (it is recomputed and freed one block at a time), plus what is
  saved outside the blocks. The reference forward runs without grad and saves nothing.
- FSDP2 over N GPUs (`--shards N`, configs/accelerate/fsdp.yaml): the frozen weights and the LoRA state are split N
  ways; activations are not (each GPU runs its own batch); plus two blocks' weights all-gathered at a time (the one
  computing and the one prefetched: FSDP2's default). The DDP figure is the unsharded total (every GPU holds it all).
  Quantized settings get no FSDP2 figure: diffalign refuses model.quantize under sharding.
Text encoders and the VAE are not counted: training reads the latent + text-embedding cache (`diffalign cache`).
Not counted either: allocator fragmentation, attention workspace, CUDA context (~0.5-1 GB): real peaks are higher;
`benchmarks/gpu.sh --memory` measures them on a GPU (benchmarks/memory_measure.py: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from diffusers.utils import logging as diffusers_logging

GB = 1024**3
RANK = 16
SD15 = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
)
SDXL = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
SD35M = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
ZIMAGE = dict(  # Tongyi-MAI/Z-Image-Turbo transformer/config.json (Z-Image base: the same architecture)
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,  # Qwen3-4B hidden size (its 4.0 B params: 7.5 GB in bf16, not counted, as every encoder)
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)
QWEN_IMAGE = dict(  # Qwen/Qwen-Image transformer/config.json (20.4 B)
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
# FLUX.2: black-forest-labs/FLUX.2-klein-4B transformer/config.json (5 double + 20 single blocks, 24 heads x 128,
# joint_attention_dim 7680 = 3 x Qwen3-4B's 2560, no guidance input: 3.88 B params); Klein 9B with 8 + 24 blocks,
# 32 heads, 3 x Qwen3-8B's 4096 (9.08 B params, the model card's 9B); FLUX.2-dev = diffusers' Flux2Transformer2DModel
# defaults (8 + 48 blocks, 48 heads, 3 x Mistral-Small-3.1's 5120, guidance input: 32.2 B params)
FLUX2_KLEIN_4B = dict(
    num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
)
FLUX2_KLEIN_9B = dict(
    num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False
)
FLUX2_DEV = dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360)
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT = ATTN + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FLUX2_TARGETS = JOINT + [
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "to_qkv_mlp_proj",
]  # diffalign.models.flux2 LORA_TARGET_MODULES
WAN_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json; each expert of Wan2.2-T2V-A14B (transformer,
# transformer_2) has the same config, so an A14B run holds this twice (the other expert frozen, for sampling)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT = ATTN + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
WAN_LORA = ATTN + ["ffn.net.0.proj", "ffn.net.2"]  # diffalign.models.wan's default (attn1, attn2, feed-forward)


def _unet_inputs(res, ch, text, width, sdxl=False):
    def make(n, dtype):
        lat = res // 8
        kw = dict(sample=torch.empty(n, ch, lat, lat, dtype=dtype), timestep=torch.zeros(n, dtype=torch.long))
        kw["encoder_hidden_states"] = torch.empty(n, text, width, dtype=dtype)
        if sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(n, 1280, dtype=dtype), "time_ids": torch.empty(n, 6)}
        return kw

    return make


def _sd3_inputs(n, dtype):
    return dict(
        hidden_states=torch.empty(n, 16, 128, 128, dtype=dtype),
        timestep=torch.zeros(n),
        encoder_hidden_states=torch.empty(n, 77 + 256, 4096, dtype=dtype),
        pooled_projections=torch.empty(n, 2048, dtype=dtype),
    )


def _flux_inputs(n, dtype):
    return dict(
        hidden_states=torch.empty(n, 64 * 64, 64, dtype=dtype),  # 1024 px: 128x128 latents, 2x2-packed
        timestep=torch.zeros(n),
        guidance=torch.ones(n),
        encoder_hidden_states=torch.empty(n, 512, 4096, dtype=dtype),
        pooled_projections=torch.empty(n, 768, dtype=dtype),
        txt_ids=torch.zeros(512, 3),
        img_ids=torch.zeros(64 * 64, 3),
    )


def _zimage_inputs(n, dtype):
    return dict(  # 1024 px: 128x128 latents with a frame axis; 128 caption tokens (a prompt + the chat template)
        x=[torch.empty(16, 1, 128, 128, dtype=dtype) for _ in range(n)],
        t=torch.zeros(n),
        cap_feats=[torch.empty(128, 2560, dtype=dtype) for _ in range(n)],
    )


def _qwenimage_inputs(n, dtype):
    return dict(
        hidden_states=torch.empty(n, 64 * 64, 64, dtype=dtype),  # 1024 px: 128x128 latents, 2x2-packed
        timestep=torch.zeros(n),
        encoder_hidden_states=torch.empty(n, 512, 3584, dtype=dtype),  # Qwen2.5-VL states, the 512-token cap
        img_shapes=[[(1, 64, 64)]] * n,
    )


def _flux2_inputs(joint, guidance):
    def make(n, dtype):
        return dict(
            hidden_states=torch.empty(n, 64 * 64, 128, dtype=dtype),  # 1024 px: 32 x 128 x 128 latents, 2x2 patches
            timestep=torch.zeros(n),
            guidance=torch.ones(n) if guidance else None,
            encoder_hidden_states=torch.empty(n, 512, joint, dtype=dtype),
            txt_ids=torch.zeros(512, 4),
            img_ids=torch.zeros(64 * 64, 4),
        )

    return make


def _wan_inputs(n, dtype):
    return dict(  # 81 frames at 480 x 832 (WanPipeline's defaults): latents (16, 21, 60, 104), 32 760 tokens
        hidden_states=torch.empty(n, 16, 21, 60, 104, dtype=dtype),
        timestep=torch.zeros(n),
        encoder_hidden_states=torch.empty(n, 512, 4096, dtype=dtype),  # UMT5-XXL, 512 tokens
    )


# name -> (label, model class, config, inputs(n, dtype), LoRA targets, checkpointing units: UNITS key)
FAMILIES = {
    "sd15": ("SD1.5 @ 512", UNet2DConditionModel, SD15, _unet_inputs(512, 4, 77, 768), ATTN, "unet"),
    "sdxl": (
        "SDXL @ 1024",
        UNet2DConditionModel,
        SDXL,
        _unet_inputs(1024, 4, 77, 2048, sdxl=True),
        ATTN,
        "unet",
    ),
    "sd35m": ("SD3.5-M @ 1024", SD3Transformer2DModel, SD35M, _sd3_inputs, JOINT, "dit"),
    "flux": (
        "FLUX.1-dev @ 1024",
        FluxTransformer2DModel,
        FLUX_DEV,
        _flux_inputs,
        JOINT,
        "dit",
    ),
    "zimage": ("Z-Image @ 1024", ZImageTransformer2DModel, ZIMAGE, _zimage_inputs, ATTN, "zimage"),
    "qwenimage": ("Qwen-Image @ 1024", QwenImageTransformer2DModel, QWEN_IMAGE, _qwenimage_inputs, JOINT, "dit"),
    "flux2_klein_4b": (
        "FLUX.2-klein-4B @ 1024",
        Flux2Transformer2DModel,
        FLUX2_KLEIN_4B,
        _flux2_inputs(7680, False),
        FLUX2_TARGETS,
        "dit",
    ),
    "flux2_klein_9b": (
        "FLUX.2-klein-9B @ 1024",
        Flux2Transformer2DModel,
        FLUX2_KLEIN_9B,
        _flux2_inputs(12288, False),
        FLUX2_TARGETS,
        "dit",
    ),
    "flux2_dev": (
        "FLUX.2-dev @ 1024",
        Flux2Transformer2DModel,
        FLUX2_DEV,
        _flux2_inputs(15360, True),
        FLUX2_TARGETS,
        "dit",
    ),
    "wan13b": ("Wan2.1-1.3B 81f@480p", WanTransformer3DModel, WAN_1_3B, _wan_inputs, WAN_LORA, "wan"),
    "wan14b": ("Wan2.1-14B 81f@480p", WanTransformer3DModel, WAN_14B, _wan_inputs, WAN_LORA, "wan"),
}
SETTINGS = {  # name -> (weights dtype, quantized Linear weights: QUANT_BYTES key or False, gradient checkpointing)
    "fp32": (torch.float32, False, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16+ckpt": (torch.bfloat16, False, True),
    "int8+ckpt": (torch.bfloat16, "int8", True),
    "nf4+ckpt": (torch.bfloat16, "nf4", True),
}
# frozen Linear weight bytes per weight: torchao int8 (+ one bf16 scale per output row, ~0), bitsandbytes NF4
# (0.5 B + one fp32 absmax per 64 weights)
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}


def _targets(model, suffixes):
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith(s) for s in suffixes)
    ]


class Saved:
    """Sums the bytes autograd saves for backward (meta tensors: numel x element size)."""

    def __init__(self):
        self.total, self.seen = 0, set()

    def pack(self, t):
        key = (t.data_ptr() if t.device.type != "meta" else id(t), t.shape, t.dtype)
        if not (t.requires_grad and t.is_leaf) and key not in self.seen:  # parameters are counted as weights
            self.seen.add(key)
            self.total += t.numel() * t.element_size()
        return t


_SDPA = torch.nn.functional.scaled_dot_product_attention


class FlashAttention(torch.autograd.Function):
    """SDPA that saves what flash / memory-efficient attention saves on a GPU (q, k, v, out and the fp32 logsumexp,
    O(L)), not the L x L attention matrix that the math fallback, which runs on meta tensors, would save."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):
        with torch.no_grad():
            out = _SDPA(q, k, v, **kwargs)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("accounting only")


def _flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return FlashAttention.apply(query, key, value, kwargs)


def unet_units(model):
    """What diffusers' UNet gradient checkpointing recomputes: each resnet and each transformer of every block."""
    blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
    return [m for b in blocks for attr in ("resnets", "attentions") for m in getattr(b, attr, None) or []]


def transformer_units(model):
    """Each (single-stream) transformer block, as diffusers' DiT gradient checkpointing."""
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


def zimage_units(model):
    """Z-Image's checkpointed blocks: both refiners and the main layers (transformer_z_image.py forward)."""
    return [*model.noise_refiner, *model.context_refiner, *model.layers]


UNITS = {  # gradient-checkpointing units
    "unet": unet_units,
    "dit": transformer_units,
    "zimage": zimage_units,
    "wan": lambda model: list(model.blocks),
}


def activation_bytes(model, inputs, blocks_attrs) -> tuple[int, int, int]:
    """(saved by the whole forward, saved inside blocks, sum of block input bytes, largest single block's saved)."""
    saved = Saved()
    per_block, block_inputs = [], []

    def pre(module, args, kwargs):
        module._start = saved.total
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        block_inputs.append(sum(t.numel() * t.element_size() for t in tensors))

    def post(module, args, kwargs, out):
        per_block.append(saved.total - module._start)

    blocks = blocks_attrs(model)
    hooks = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    hooks += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    torch.nn.functional.scaled_dot_product_attention = _flash
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            model(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA
    for h in hooks:
        h.remove()
    return saved.total, sum(per_block), sum(block_inputs), max(per_block)


def account(name: str, shards: int = 1) -> dict:
    label, cls, config, make_inputs, suffixes, blocks_attrs = FAMILIES[name]
    with torch.device("meta"):
        model = cls(**config)
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to(dtype)
    params = sum(p.numel() for p in model.parameters())
    targets = _targets(model, suffixes)
    lora = sum(RANK * (m.in_features + m.out_features) for m in targets)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    largest_block = max(sum(p.numel() for p in unit.parameters()) for unit in UNITS[blocks_attrs](model))
    rows = {}
    acts = {}
    for setting, (dtype, quant, ckpt) in SETTINGS.items():
        if dtype not in acts:
            model.to(dtype)
            # LoRA params need grad, so everything after the first adapted layer is saved: mark the targets' weights
            for m in targets:
                m.weight.requires_grad_(True)
            with torch.device("meta"):
                acts[dtype] = activation_bytes(model, make_inputs(2, dtype), UNITS[blocks_attrs])
        whole, sum_blocks, block_in, largest = acts[dtype]
        size = torch.finfo(dtype).bits // 8
        weights = linear * QUANT_BYTES[quant] + (params - linear) * size if quant else params * size
        activations = whole if not ckpt else whole - sum_blocks + block_in + largest
        rows[setting] = {
            "weights_gb": weights / GB,
            "lora_states_gb": lora * 16 / GB,
            "activations_gb": activations / GB,
            "total_gb": (weights + lora * 16 + activations) / GB,
        }
        if shards > 1 and not quant:  # per GPU: 1/N of the weights and LoRA state, all activations, 2 blocks gathered
            gathered = 2 * largest_block * weights / params
            rows[setting]["fsdp_gb"] = (weights / shards + lora * 16 / shards + activations + gathered) / GB
    return {"label": label, "params": params, "lora_params": lora, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--json", default="")
    parser.add_argument("--shards", type=int, default=1, help="also the per-GPU GB with N-way FSDP2 (N > 1)")
    args = parser.parse_args(argv)
    results = {name: account(name, args.shards) for name in args.families}
    print(f"DPO-LoRA step, 1 pair (2 latents), LoRA r{RANK} + AdamW; GB = 2^30 bytes; estimate (see docstring)")
    print(
        f"{'family':<20}{'params':>9}{'LoRA':>8}  "
        + "".join(f"{s:>11}" for s in SETTINGS)
        + "   (weights + LoRA state + activations)"
    )
    for r in results.values():
        cells = "".join(f"{r['rows'][s]['total_gb']:>10.1f} " for s in SETTINGS)
        print(f"{r['label']:<20}{r['params'] / 1e9:>8.2f}B{r['lora_params'] / 1e6:>7.1f}M  {cells}")
        if args.shards > 1:
            fsdp = [r["rows"][s].get("fsdp_gb") for s in SETTINGS]  # a quantized base is not sharded: "-"
            cells = "".join(f"{v:>10.1f} " if v is not None else f"{'-':>10} " for v in fsdp)
            print(f"{'  FSDP2 x' + str(args.shards) + ' per GPU':<37}{cells}")
    for r in results.values():
        parts = ", ".join(
            f"{s}: {v['weights_gb']:.1f} + {v['lora_states_gb']:.2f} + {v['activations_gb']:.1f}"
            for s, v in r["rows"].items()
        )
        print(f"  {r['label']}: {parts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
