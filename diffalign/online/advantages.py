"""Group-relative advantages for GRPO-style on-line objectives (Flow-GRPO, DiffusionNFT).

A round's rewards come as (P, G): P prompt groups of G images each (flat index p * G + g, as in `pairs.py`).
Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; yifan123/flow_grpo `PerPromptStatTracker`) normalises every reward by
its own prompt's mean and either the std of all rewards of the round (`global_std`, its SD3.5 and FLUX default) or
its prompt's std:

    A_pg = (r_pg - mean_g r_pg) / (std + eps),    eps = 1e-4,    then A is clipped to [-clip, clip] (clip 5).

Subtracting the prompt's mean removes prompt difficulty (GRPO's group baseline replaces a learned value function);
the global std keeps a group whose images all score alike from getting inflated advantages. With one image per
prompt (G = 1) the prompt's mean is the reward itself (every A would be 0), so the round's mean and std are used, as
Flow-GRPO does when it turns its per-prompt tracker off for num_image_per_prompt == 1 (scripts/train_sd3.py).
DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) uses the same tracker, then maps A to an optimality probability
r = clip(A, -c, c) / c / 2 + 1/2 in [0, 1] (`optimality`).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, global_std: bool = True, eps: float = 1e-4, clip: float = 5.0):
    """(P, G) rewards -> (P, G) advantages: minus the prompt's mean, over the global (or per-prompt) std, clipped.
    G = 1: minus the round's mean, over the round's std (batch normalisation; a group of one has no baseline)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, group), got shape {tuple(rewards.shape)}")
    r = rewards.float()
    if r.shape[1] == 1:
        return ((r - r.mean()) / (r.std(unbiased=False) + eps)).clamp(-clip, clip)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(unbiased=False) if global_std else r.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + eps)).clamp(-clip, clip)


def optimality(advantages: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality probability: clip(A, -c, c) / c / 2 + 1/2, in [0, 1]."""
    return (advantages.clamp(-clip, clip) / clip * 0.5 + 0.5).clamp(0.0, 1.0)
