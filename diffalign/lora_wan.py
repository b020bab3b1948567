"""Wan LoRAs in the original / ComfyUI key style, the file Wan's ComfyUI users load.

Wan's original transformer (Wan-Video/Wan2.1 `wan/modules/model.py`), and with it ComfyUI and most Wan LoRAs shared
online, names the block modules `blocks.<i>.self_attn.{q,k,v,o}`, `blocks.<i>.cross_attn.{q,k,v,o}` and
`blocks.<i>.ffn.{0,2}`, under `diffusion_model.`, with peft's `lora_A` / `lora_B` and one `.alpha` per module
(scale = alpha / rank). diffusers' reader `_convert_non_diffusers_wan_lora_to_diffusers` (WanPipeline's
`load_lora_weights`) maps them back to `blocks.<i>.attn1.to_q`, ..., `ffn.net.0.proj`, `ffn.net.2`, folding alpha /
rank into the weights, so the same network comes back (tests/test_wan.py).
"""

from __future__ import annotations

import re

import torch

from diffalign.errors import DiffalignError

MODULES = {  # diffusers module under blocks.<i> -> original name
    **{f"attn1.{d}": f"self_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
    **{f"attn2.{d}": f"cross_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


class WanExportError(DiffalignError):
    """A Wan LoRA module with no original name."""


def to_original(weights: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """peft weights "<module>.lora_A.weight" / "lora_B.weight" (module relative to the transformer) and each module's
    alpha -> "diffusion_model.blocks.<i>.<original>.lora_A.weight" / ".lora_B.weight" / ".alpha"."""
    out = {}
    for module, alpha in alphas.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if match is None or match.group(2) not in MODULES:
            raise WanExportError(
                f"Wan LoRA module '{module}' has no original (ComfyUI) name; exportable: blocks.<i>.{{{', '.join(MODULES)}}}"
            )
        name = f"diffusion_model.blocks.{match.group(1)}.{MODULES[match.group(2)]}"
        out[f"{name}.lora_A.weight"] = weights[f"{module}.lora_A.weight"]
        out[f"{name}.lora_B.weight"] = weights[f"{module}.lora_B.weight"]
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out
