"""DiffusionNFT's old policy: a second LoRA adapter that samples the rounds and is an EMA of the trained one.

After each round (official: after each epoch, one optimizer step in its SD3 setting) with `step` = optimizer steps so
far (NVlabs/DiffusionNFT `return_decay`):

    θ_old ← d θ_old + (1 − d) θ,    linear (type 1, default): d = min(0.001 step, 0.5)
                                    delayed (type 2, OCR): d = 0 for step < 75, then min(0.0075 (step − 75), 0.999)
                                    awm (AWM's KL-EMA, kl_ema_decay 0.3 linear): d = min(0.001 step, 0.3)

d = 0 is fully on-policy (old = θ); a larger d keeps the sampler and the v_old of the loss behind θ, which the
authors found more stable (DiffusionNFT issue #30).
"""

from __future__ import annotations

import torch

OLD_ADAPTER = "old"  # peft adapter name of the old policy, next to "default" (the trained one)


def linear_decay(step: int) -> float:
    return min(0.001 * step, 0.5)


def awm_decay(step: int) -> float:
    return min(0.001 * step, 0.3)


def delayed_decay(step: int) -> float:
    return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)


OLD_DECAY = {"linear": linear_decay, "delayed": delayed_decay, "awm": awm_decay}


@torch.no_grad()
def update_old(policy: dict[str, torch.Tensor], old: dict[str, torch.Tensor], decay: float) -> None:
    """old adapter <- decay * old + (1 - decay) * policy ("...lora_A.default.weight" -> "...lora_A.old.weight").

    In fp32, then cast to the old adapter's dtype (the trained adapter is upcast, the old one may be bf16/fp16)."""
    for n, p in policy.items():
        o = old[n.replace(".default.", f".{OLD_ADAPTER}.")]
        o.copy_(o.float().lerp(p.float(), 1 - decay))
