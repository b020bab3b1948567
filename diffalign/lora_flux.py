"""FLUX LoRAs in kohya / ComfyUI key style (BFL module names) and back.

kohya sd-scripts, ComfyUI and most FLUX LoRAs shared online name modules by Black Forest Labs' original transformer:
`lora_unet_double_blocks_<i>_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha` (scale = alpha / rank).
BFL fuses some projections that diffusers keeps apart:

    double_blocks.i.img_attn.qkv  = transformer_blocks.i.attn.{to_q, to_k, to_v}
    double_blocks.i.txt_attn.qkv  = transformer_blocks.i.attn.{add_q_proj, add_k_proj, add_v_proj}
    single_blocks.i.linear1       = single_transformer_blocks.i.{attn.to_q, attn.to_k, attn.to_v, proj_mlp}

A fused module's LoRA is written as kohya does for split LoRAs: down = the members' downs stacked (n r, in),
up = block-diagonal (sum of outs, n r), alpha = n alpha, so alpha / rank and every member's product B A are
unchanged (diffusers' reader `_convert_kohya_flux_lora_to_diffusers` detects the block-diagonal up and splits it
the same way). Members without a LoRA (e.g. proj_mlp when only attention is trained) get zero blocks; reading back
drops all-zero members, so the round trip is exact. A fused kohya LoRA with one shared down (as kohya trains them)
reads as each member keeping that down with its rows of up, at the same alpha.
"""

from __future__ import annotations

import re

import torch

from diffalign.errors import DiffalignError

MLP_RATIO = 4  # FluxSingleTransformerBlock's proj_mlp width / inner width (fixed in diffusers' FLUX transformer)
DOUBLE = {  # BFL name -> diffusers member module(s) under transformer_blocks.<i>
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"],
    "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE = {  # under single_transformer_blocks.<i>
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
BLOCKS = {"double_blocks": ("transformer_blocks", DOUBLE), "single_blocks": ("single_transformer_blocks", SINGLE)}
MODULE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
KOHYA = re.compile(r"^lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)$")


class FluxKohyaError(DiffalignError, ValueError):
    """A FLUX LoRA that has no kohya / BFL equivalent here; the message names the module."""


def _bfl_of(module: str) -> tuple[str, int]:
    """diffusers module path -> (kohya module name, index among the fused members)."""
    match = MODULE.match(module)
    if match:
        kind, i, rest = match.groups()
        bfl_kind = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        for name, members in BLOCKS[bfl_kind][1].items():
            if rest in members:
                return f"lora_unet_{bfl_kind}_{i}_{name}", members.index(rest)
    raise FluxKohyaError(f"FLUX LoRA module '{module}' has no kohya (BFL) name")


def to_kohya(weights: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """peft weights {"<module>.lora_A.weight": (r, in), ".lora_B.weight": (out, r)} and {module: alpha} (module paths
    without the "transformer." prefix) -> kohya tensors {"lora_unet_...lora_down.weight", ".lora_up.weight", ".alpha"}."""
    groups: dict[str, dict[int, str]] = {}
    for key in weights:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            name, index = _bfl_of(module)
            groups.setdefault(name, {})[index] = module
    out = {}
    for name, present in groups.items():
        kind, _, rest = KOHYA.match(name).groups()
        members = BLOCKS[kind][1][rest]
        first = next(iter(present.values()))
        rank, in_dim = weights[first + ".lora_A.weight"].shape
        scales = {alphas[m] / weights[m + ".lora_A.weight"].shape[0] for m in present.values()}
        ranks = {weights[m + ".lora_A.weight"].shape[0] for m in present.values()}
        if len(scales) > 1 or len(ranks) > 1:
            raise FluxKohyaError(f"{name}: fused members {sorted(present.values())} differ in rank or alpha / rank")
        downs, ups = [], []
        for index, member in enumerate(members):
            module = present.get(index)
            if module is None:  # zero block of the right shape (FLUX attention projections are inner -> inner)
                width = MLP_RATIO * in_dim if member == "proj_mlp" else in_dim
                downs.append(torch.zeros(rank, in_dim, dtype=weights[first + ".lora_A.weight"].dtype))
                ups.append(torch.zeros(width, rank, dtype=weights[first + ".lora_B.weight"].dtype))
            else:
                downs.append(weights[module + ".lora_A.weight"])
                ups.append(weights[module + ".lora_B.weight"])
        out[name + ".lora_down.weight"] = torch.cat(downs).contiguous()
        out[name + ".lora_up.weight"] = torch.block_diag(*ups).contiguous()
        out[name + ".alpha"] = torch.tensor(float(scales.pop() * rank * len(members)))
    return out


def from_kohya(kohya: dict[str, torch.Tensor], file: str = "") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya tensors -> (peft weights with "transformer." prefix, {"transformer.<module>.alpha": alpha}); inverse of
    `to_kohya` (all-zero members dropped)."""
    weights, alphas = {}, {}
    for key in kohya:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        match = KOHYA.match(name)
        if match is None or match.group(3) not in BLOCKS[match.group(1)][1]:
            raise FluxKohyaError(f"{file}: kohya module '{name}' is not a FLUX double/single-block module read here")
        kind, i, rest = match.groups()
        prefix = f"transformer.{BLOCKS[kind][0]}.{i}."
        members = BLOCKS[kind][1][rest]
        down, up = kohya[key], kohya[name + ".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(kohya.get(name + ".alpha", torch.tensor(float(rank))))
        n = len(members)
        outs = _member_outs(members, up.shape[0], down.shape[1])
        rows = torch.split(up, outs)
        sparse = rank % n == 0 and all(
            not r[:, k * (rank // n) : (k + 1) * (rank // n)].any()
            for j, r in enumerate(rows)
            for k in range(n)
            if k != j
        )
        for j, member in enumerate(members):
            if sparse:
                a = down[j * (rank // n) : (j + 1) * (rank // n)]
                b = rows[j][:, j * (rank // n) : (j + 1) * (rank // n)]
                member_alpha = alpha / n
            else:
                a, b, member_alpha = down, rows[j], alpha
            if n > 1 and not a.any() and not b.any():
                continue
            weights[prefix + member + ".lora_A.weight"] = a.contiguous()
            weights[prefix + member + ".lora_B.weight"] = b.contiguous()
            alphas[prefix + member + ".alpha"] = member_alpha
    return weights, alphas


def _member_outs(members: list[str], total: int, in_dim: int) -> list[int]:
    """Output widths of the fused members: equal thirds for qkv; linear1 = 3 x inner + MLP_RATIO x inner."""
    if "proj_mlp" in members:
        inner = total // (3 + MLP_RATIO)
        return [inner, inner, inner, MLP_RATIO * inner]
    return [total // len(members)] * len(members)


def is_flux_kohya(keys) -> bool:
    return any(KOHYA.match(key.split(".")[0]) for key in keys)
