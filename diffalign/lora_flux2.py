"""FLUX.2 LoRAs in the layout ComfyUI and ai-toolkit load: Black Forest Labs' module names under `diffusion_model.`,
`lora_A` / `lora_B` weights, no alpha keys (the scale alpha / rank is folded into lora_B).

diffusers reads this layout back with `_convert_non_diffusers_flux2_lora_to_diffusers` (diffusers 0.42.1
loaders/lora_conversion_utils.py 2434-2593, called by `Flux2LoraLoaderMixin.lora_state_dict` for keys starting with
`diffusion_model.`). The names:

    double_blocks.i.img_attn.qkv  = transformer_blocks.i.attn.{to_q, to_k, to_v}
    double_blocks.i.txt_attn.qkv  = transformer_blocks.i.attn.{add_q_proj, add_k_proj, add_v_proj}
    double_blocks.i.img_attn.proj = transformer_blocks.i.attn.to_out.0   (txt_attn.proj = attn.to_add_out)
    double_blocks.i.img_mlp.0 / 2 = transformer_blocks.i.ff.linear_in / linear_out  (txt_mlp: ff_context)
    single_blocks.i.linear1 / 2   = single_transformer_blocks.i.attn.to_qkv_mlp_proj / attn.to_out

The fused qkv has one lora_A that the reader gives to each of q, k, v, and a lora_B it splits in three along its
rows. So the three LoRAs are written as A = [A_q; A_k; A_v] (3r, in) and B = blockdiag(B_q, B_k, B_v) (3 out, 3r):
each member gets back its own product B A (the zero blocks add nothing); a member without a LoRA gets zero blocks.
"""

from __future__ import annotations

import torch

from diffalign.errors import DiffalignError

PREFIX = "diffusion_model."
QKV = {  # BFL fused name -> diffusers members under transformer_blocks.<i>.attn
    "img_attn.qkv": ["to_q", "to_k", "to_v"],
    "txt_attn.qkv": ["add_q_proj", "add_k_proj", "add_v_proj"],
}
DOUBLE = {  # diffusers module under transformer_blocks.<i> -> BFL name under double_blocks.<i>
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}  # under single_transformer_blocks.<i>


class Flux2ComfyError(DiffalignError):
    """A module this layout has no name for."""


def _split(module: str) -> tuple[str, int, str]:
    """'transformer_blocks.3.attn.to_q' -> ('transformer_blocks', 3, 'attn.to_q')."""
    kind, index, rest = module.split(".", 2)
    return kind, int(index), rest


def to_comfy(weights: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """peft weights {"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)} (no "transformer."
    prefix) and each module's scale alpha / r -> {"diffusion_model.<BFL name>.lora_A.weight": ..., ...}."""
    pairs = {}  # module -> (A, scale * B)
    for key in weights:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            pairs[module] = (weights[key], weights[module + ".lora_B.weight"] * scales[module])
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in pairs.items():
        kind, i, rest = _split(module)
        if kind == "transformer_blocks" and rest.startswith("attn.") and rest[5:] in sum(QKV.values(), []):
            name = next(n for n, members in QKV.items() if rest[5:] in members)
            fused.setdefault((i, name), {})[rest[5:]] = (a, b)
        elif kind == "transformer_blocks" and rest in DOUBLE:
            out[f"{PREFIX}double_blocks.{i}.{DOUBLE[rest]}.lora_A.weight"] = a
            out[f"{PREFIX}double_blocks.{i}.{DOUBLE[rest]}.lora_B.weight"] = b
        elif kind == "single_transformer_blocks" and rest in SINGLE:
            out[f"{PREFIX}single_blocks.{i}.{SINGLE[rest]}.lora_A.weight"] = a
            out[f"{PREFIX}single_blocks.{i}.{SINGLE[rest]}.lora_B.weight"] = b
        else:
            raise Flux2ComfyError(f"no ComfyUI / BFL name for the FLUX.2 module '{module}'")
    for (i, name), members in fused.items():
        a0, b0 = next(iter(members.values()))
        rank, width = a0.shape[0], b0.shape[0]  # q, k and v share the inner width
        blocks = [members.get(m, (a0.new_zeros(a0.shape), b0.new_zeros(width, rank))) for m in QKV[name]]
        if any(a.shape[0] != rank for a, _ in blocks):
            raise Flux2ComfyError(f"double_blocks.{i}.{name}: q, k and v LoRAs of different ranks")
        out[f"{PREFIX}double_blocks.{i}.{name}.lora_A.weight"] = torch.cat([a for a, _ in blocks])  # (3r, in)
        out[f"{PREFIX}double_blocks.{i}.{name}.lora_B.weight"] = torch.block_diag(*[b for _, b in blocks])  # (3w, 3r)
    return out
