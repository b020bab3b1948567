"""Qwen-Image and Z-Image LoRAs in the layout ComfyUI loads: diffusers' module names under `diffusion_model.`, peft's
`lora_A` / `lora_B` weights and one `.alpha` per module (scale = alpha / rank), as for Wan (diffalign.lora_wan).

ComfyUI (comfy/lora.py `model_lora_keys_unet`, Comfy-Org/ComfyUI at 17358c8) reads these names directly:
- Qwen-Image: ComfyUI's transformer (comfy/ldm/qwen_image/model.py, comfyanonymous/ComfyUI at 01f4512) keeps
  diffusers' module names (`transformer_blocks.<i>.attn.to_q`, ..., `to_add_out`, `img_mlp.net.0.proj`,
  `img_mlp.net.2`, `img_mod.1`; `img_in`, `txt_in`, `proj_out`, `norm_out.linear`), so `diffusion_model.<name>` is
  its generic "lora format without any weird key names" and the QwenImage branch's key.
- Z-Image: ComfyUI's Lumina2 branch maps `diffusion_model.<diffusers name>` through comfy/utils.py
  `z_image_to_diffusers`: `attention.to_q/k/v` onto row slices of its fused `attention.qkv`, `attention.to_out.0`
  onto `attention.out`, `feed_forward.w1/2/3` and `adaLN_modulation.0` as they are, in `layers`,
  `noise_refiner` and `context_refiner`; `all_x_embedder.2-1`, `all_final_layer.2-1.*`, `cap_embedder.1` and
  `t_embedder.mlp.*` onto its `x_embedder`, `final_layer.*`, ... .

diffusers reads the same file back (diffusers 0.42.1 loaders/lora_pipeline.py:
`QwenImageLoraLoaderMixin.lora_state_dict` l.5062 and `ZImageLoraLoaderMixin.lora_state_dict` l.5456 call the
converters for `diffusion_model.` keys);
`_convert_non_diffusers_qwen_lora_to_diffusers` (loaders/lora_conversion_utils.py l.2221, lora_A branch l.2355) and
`_convert_non_diffusers_z_image_lora_to_diffusers` (l.2935, lora_A branch l.3075) drop the prefix, fold alpha / rank
into the weights and prefix `transformer.`: the inverse of `to_comfy` (tests/test_qwenimage.py, tests/test_zimage.py).
"""

from __future__ import annotations

import re

import torch

from diffalign.errors import DiffalignError

PREFIX = "diffusion_model."
_QWEN_BLOCK = (
    r"attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|(?:img|txt)_mlp\.net\.(?:0\.proj|2)|(?:img|txt)_mod\.1"
)
_QWEN_TOP = r"img_in|txt_in|proj_out|norm_out\.linear|time_text_embed\.timestep_embedder\.linear_[12]"
_ZIMAGE_BLOCK = r"attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0"
_ZIMAGE_TOP = (
    r"all_x_embedder\.2-1|all_final_layer\.2-1\.(?:linear|adaLN_modulation\.1)|cap_embedder\.1|t_embedder\.mlp\.[02]"
)
MODULES = {  # family -> the diffusers modules ComfyUI has a name for (a LoRA on any other module is refused)
    "qwenimage": rf"transformer_blocks\.\d+\.(?:{_QWEN_BLOCK})|{_QWEN_TOP}",
    "zimage": rf"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:{_ZIMAGE_BLOCK})|{_ZIMAGE_TOP}",
}
NAMES = {"qwenimage": "Qwen-Image", "zimage": "Z-Image"}


class ComfyExportError(DiffalignError):
    """A module ComfyUI has no name for."""


def to_comfy(family: str, weights: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """peft weights "<module>.lora_A.weight" (r, in) / ".lora_B.weight" (out, r) (module relative to the transformer)
    and each module's alpha -> "diffusion_model.<module>.lora_A.weight" / ".lora_B.weight" / ".alpha"."""
    out = {}
    for module, alpha in alphas.items():
        if re.fullmatch(MODULES[family], module) is None:
            raise ComfyExportError(
                f"{NAMES[family]} LoRA module '{module}' has no ComfyUI name (diffalign.lora_comfy.MODULES)"
            )
        out[f"{PREFIX}{module}.lora_A.weight"] = weights[f"{module}.lora_A.weight"]
        out[f"{PREFIX}{module}.lora_B.weight"] = weights[f"{module}.lora_B.weight"]
        out[f"{PREFIX}{module}.alpha"] = torch.tensor(float(alpha))
    return out
