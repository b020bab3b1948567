"""AWM, advantage-weighted matching (Xue et al. 2025, arXiv 2509.25050; scxue/advantage_weighted_matching
`advantage_weighted_matching/scripts/train_sd3_awm.py`): on-line RL with the pretraining loss itself, flow matching
on the policy's own clean samples, weighted by their group advantages.

    m    = mean_dims (v_θ − target)²                  target = ε − x0 (flow) at x_t = forward noise of x0
    ℓ    = −((m + 1e-10)^p − 1e-10^p) · s_t / p        log-likelihood surrogate ("ghuber" weighting, p = ghuber_power)
    a    = clip(A, −c, c) / c                          (official adv_clip_max c = 5, advantage_max 1)
    loss = −a · exp(ℓ − sg(ℓ)) + kl_weight · mean_dims (v_θ − v_ref)² + old_weight · mean_dims (v_θ − v_old)²

The ratio exp(ℓ − sg(ℓ)) is 1 with gradient ∇ℓ: the official on-policy PPO ratio, whose clip (clip_range 1) never
binds, so the policy gradient is a · s_t · m^(p−1) · ∇m: flow matching towards samples with a positive advantage
and away from those with a negative one, generalised-Huber weighted (p = 1: plain t-weighted flow matching).
A = group-relative advantage (per-prompt mean, global std). s_t is the official timestep t, which is σ_t on flow
families; elsewhere the family's x0 slope (diffalign.objectives.nft.x0_scale) plays its part. v_ref: the base (LoRA
off); v_old: an EMA of the trained LoRA (`old_decay`), updated after each round, a second anchor ("KL-EMA, mimics
TRPO"). Unlike DiffusionNFT the trained policy samples the rounds (source `awm`, official off_policy False).

Hand-computed check (tests/test_awm.py): p = ¼, s = ½, v_θ = 0.5, target 1, A = 5: m = ¼, a = 1, loss −1,
dloss/dv_θ = a s m^(p−1) · 2 (v_θ − target) = ½ · 4^¾ · (−1) = −√2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from diffalign.checks import POSITIVE, OneOf, Range
from diffalign.objectives.base import Objective
from diffalign.online.old_policy import OLD_DECAY

HUBER_EPS = 1e-10  # the official m + 1e-10, which keeps m^(p-1) finite at m = 0


@dataclass
class AWM(Objective):
    ghuber_power: Annotated[float, Range(gt=0, le=1)] = 0.25
    """p of the generalised-Huber weight m^(p−1) on the flow-matching error m (official 0.25; 1: t-weighted MSE)."""
    kl_weight: Annotated[float, Range(ge=0)] = 1e-4
    """Weight of mean (v_θ − v_ref)² to the base, LoRA off (official train.beta: PickScore 1e-4, GenEval 1e-3,
    OCR 3e-3; 0 skips that forward)."""
    old_weight: Annotated[float, Range(ge=0)] = 1.0
    """Weight of mean (v_θ − v_old)² to the EMA old adapter (official train.ema_beta 1)."""
    adv_clip: Annotated[float, POSITIVE] = 5.0
    """c: advantages clipped to [−c, c], then divided by c (official adv_clip_max 5, advantage_max 1)."""
    old_decay: Annotated[str, OneOf(OLD_DECAY)] = "awm"
    """Old-adapter EMA decay d(step) after each round: awm = min(0.001 step, 0.3) (official kl_ema_decay 0.3,
    linear); linear and delayed are DiffusionNFT's."""

    needs_reference: ClassVar[bool] = True
    own_kl: ClassVar[str] = "kl_weight"  # its KL weight: online.kl_weight is refused
    paired: ClassVar[bool] = False
    xt_source: ClassVar[str] = "predictions"  # forward noise, the loss takes predictions (XT_SOURCES)
    sources: ClassVar[tuple[str, ...]] = ("awm",)  # the policy's clean samples + advantages: `diffalign online`

    def __call__(self, pred, old_pred, ref_pred, target, scale, advantages) -> tuple[torch.Tensor, dict]:
        """pred (N, C, h, w) with grad; old_pred, ref_pred (None if kl_weight 0), target likewise; scale,
        advantages (N,). -> loss (N,), metrics (N,). In float64, as the official code."""
        p = self.ghuber_power
        mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)  # (N, C, h, w) -> (N,)
        log_prob = -((mse + HUBER_EPS) ** p - HUBER_EPS**p) * scale.double() / p  # (N,)
        a = advantages.double().clamp(-self.adv_clip, self.adv_clip) / self.adv_clip  # (N,)
        loss = -a * torch.exp(log_prob - log_prob.detach())  # value −a, gradient −a ∇ℓ
        old_kl = (pred.double() - old_pred.detach().double()).pow(2).flatten(1).mean(1)  # (N,)
        loss = loss + self.old_weight * old_kl
        metrics = {
            "mse": mse.detach().float(),
            "log_prob": log_prob.detach().float(),
            "old_kl": old_kl.detach().float(),
        }
        if ref_pred is not None:
            kl = (pred.double() - ref_pred.detach().double()).pow(2).flatten(1).mean(1)  # (N,)
            loss = loss + self.kl_weight * kl
            metrics["kl"] = kl.detach().float()
        return loss.float(), metrics
