"""Turn a collated batch (cached or not) into the estimator's inputs: x0 stacked [w; l], cond, label."""

from __future__ import annotations

import torch


def model_inputs(family, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Batch of B pairs -> (x0 (2B, C, h, w) stacked [w; l], cond {key: (2B, ...)}, label (B,)).

    A cached batch (keys x0_w, x0_l, cond) is only stacked; an uncached one (pixels_w, pixels_l, prompt) is
    encoded with the family's VAE and text encoders, without gradients. x0 is fp32 either way (a cache may store
    fp16/bf16 latents); cond keeps the dtype it was stored or encoded in (the family casts it in `denoise`). cond["size_info"] (2B, 4) long carries
    (orig_h, orig_w, crop_top, crop_left) for families with micro-conditioning; the others ignore it.
    """
    if "x0_w" in batch:  # from CachedPairs
        x0 = torch.cat([batch["x0_w"], batch["x0_l"]]).float()  # 2 x (B, C, h, w) -> (2B, C, h, w), fp32 as encoded
        prompt_cond = batch["cond"]  # {key: (B, ...)}
    else:  # from PreferencePairs / PreferencePairStream
        with torch.no_grad():
            pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])  # 2 x (B, 3, H, W) -> (2B, 3, H, W)
            x0 = family.encode_images(pixels)  # (2B, 3, H, W) -> (2B, C, h, w)
            prompt_cond = family.encode_prompts(batch["prompt"])  # list[str] (B) -> {key: (B, ...)}
    cond = {key: torch.cat([value, value]) for key, value in prompt_cond.items()}  # (B, ...) -> (2B, ...): w, l
    size_info = torch.cat([batch["size_info_w"], batch["size_info_l"]])  # 2 x (B, 4) -> (2B, 4)
    cond["size_info"] = size_info.to(x0.device)
    return x0, cond, batch["label"].to(x0.device)  # label (B,)
