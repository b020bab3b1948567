"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117; NVlabs/DiffusionNFT `scripts/train_nft_sd3.py`): on-line
reinforcement on the forward process, with no likelihood, no sampler trajectory and no CFG.

Idea: split the old policy's clean samples by reward into an implicit positive and negative policy, both built from
the trained model v_θ and the old (sampling) model v_old, and fit each to the samples it should explain:

    v⁺ = β v_θ + (1 − β) v_old            v⁻ = (1 + β) v_old − β v_θ            (v_old without gradient)
    x̂0± = x0 estimate from v± at (x_t, t);     L± = mean_dims (x̂0± − x0)² / sg(max(mean_dims |x̂0± − x0|, 1e-5))
    r   = clip(A, −c, c) / c / 2 + 1/2                    (diffalign.online.advantages.optimality, c = adv_clip)
    loss = c · (r L⁺ + (1 − r) L⁻) / β + kl_weight · mean_dims (v_θ − v_ref)²          per sample

A = group-relative advantage (per-prompt mean, global std), x_t = forward noise of the sample with fresh eps.
β (paper 1.0; 0.1 for OCR / multi-reward): how far v_θ extrapolates from v_old; it is the step size of the implicit
guidance (smaller is faster, less stable). kl_weight (official `train.beta`, 1e-4): pull towards the base (LoRA off).
The old policy is an EMA of the trained LoRA (`old_decay`), updated after every round; it samples the rounds.

Any family: at fixed (x_t, t) every parameterisation's x0 estimate is affine in the model output with the same
slope for v_θ, v_old and v±, so x̂0± − x0 = scale_t · (v± − target) with the family's target (eps − x0, v or eps)
and scale_t = sigma_t (flow), sqrt(1 − abar_t) (v-prediction), sqrt((1 − abar_t) / abar_t) (epsilon) (`x0_scale`).

Hand-computed check (tests/test_nft.py): β = 1, c = 5, one dim, scale 1, v_θ = 0.5, v_old = 0, target 1, A = 5:
    r = 1, v⁺ = 0.5, d⁺ = −0.5, L⁺ = 0.25 / 0.5 = 0.5, loss = 5 · 0.5 = 2.5 (A = −5: v⁻ = −0.5, L⁻ = 1.5, loss 7.5).
At LoRA init (v_θ = v_old) both policies equal v_θ and loss = c · L(v_θ) / β: adaptive-weighted flow matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from diffalign.checks import POSITIVE, OneOf, Range
from diffalign.objectives.base import Objective
from diffalign.online.advantages import optimality
from diffalign.online.old_policy import OLD_DECAY

# x̂0 − x0 = x0_scale · (target − model output), by prediction type; abar = alpha_bar_t (N,), sigma = sigma_t (N,)
X0_SCALE = {
    "flow": lambda schedule, t: schedule.sigma(t),
    "v_prediction": lambda schedule, t: (1 - schedule.alpha_bar(t)).sqrt(),
    "epsilon": lambda schedule, t: ((1 - schedule.alpha_bar(t)) / schedule.alpha_bar(t)).sqrt(),
}


def x0_scale(schedule, t: torch.Tensor) -> torch.Tensor:
    """(N,) slope of the x0 estimate in the model output at timesteps t (N,), for `schedule.prediction_type`."""
    return X0_SCALE[schedule.prediction_type](schedule, t).float()


def adaptive_x0_loss(pred, target, scale) -> torch.Tensor:
    """mean (x̂0 − x0)² / sg(mean |x̂0 − x0|) with x̂0 − x0 = scale (pred − target): (N, C, h, w) -> (N,)."""
    d = scale.view(-1, *[1] * (pred.ndim - 1)) * (pred.float() - target.float())  # (N, C, h, w)
    weight = d.detach().abs().flatten(1).mean(1).clamp(min=1e-5)  # (N,)
    return d.pow(2).flatten(1).mean(1) / weight


@dataclass
class DiffusionNFT(Objective):
    beta: Annotated[float, Range(gt=0, le=1)] = 1.0
    """β of the implicit policies v± (paper 1.0; 0.1 for OCR and multi-reward)."""
    kl_weight: Annotated[float, Range(ge=0)] = 1e-4
    """Weight of mean (v_θ − v_ref)² to the base model, LoRA off (official train.beta 1e-4; 0 skips that forward)."""
    adv_clip: Annotated[float, POSITIVE] = 5.0
    """c: advantages clipped to [−c, c] before the optimality probability; also the loss scale (official 5)."""
    old_decay: Annotated[str, OneOf(OLD_DECAY)] = "linear"
    """Old-policy EMA decay d(step) (θ_old ← d θ_old + (1 − d) θ after each round): linear = min(0.001 step, 0.5)
    (official type 1), delayed = 0 for 75 steps, then min(0.0075 (step − 75), 0.999) (type 2, OCR)."""
    timesteps: Annotated[str, OneOf("schedule", "sampler")] = "schedule"
    """Where each visit's t comes from (one keyed draw per visit): schedule = uniform over the training schedule
    (flow: the shifted σ), the same marginal as the official code's on SD3.5; sampler = uniform over the round's
    sampling grid (`sampling.steps` t), the official code's own choice (it trains each sample at 9 of its 10 sampler
    σ), and what a step-distilled base (Z-Image-Turbo, distilled FLUX.2-klein) needs: it predicts the flow only on its
    grid."""
    negate_advantages: bool = False
    """For sign tests only: train on −A, i.e. towards low reward."""

    needs_reference: ClassVar[bool] = True
    own_kl: ClassVar[str] = "kl_weight"  # its KL weight: online.kl_weight is refused
    paired: ClassVar[bool] = False
    xt_source: ClassVar[str] = "predictions"  # forward noise, but the loss takes predictions, not errors (XT_SOURCES)
    sources: ClassVar[tuple[str, ...]] = ("nft",)  # the old policy's clean samples + advantages: `diffalign online`

    def __call__(self, pred, old_pred, ref_pred, target, scale, advantages) -> tuple[torch.Tensor, dict]:
        """pred (N, C, h, w) with grad; old_pred, ref_pred (None if kl_weight 0), target likewise; scale,
        advantages (N,). -> loss (N,), metrics (N,)."""
        r = optimality(-advantages if self.negate_advantages else advantages, self.adv_clip)  # (N,)
        old = old_pred.detach().float()
        pos = self.beta * pred.float() + (1 - self.beta) * old
        neg = (1 + self.beta) * old - self.beta * pred.float()
        loss_pos, loss_neg = adaptive_x0_loss(pos, target, scale), adaptive_x0_loss(neg, target, scale)
        loss = self.adv_clip * (r * loss_pos + (1 - r) * loss_neg) / self.beta  # (N,)
        metrics = {"optimality": r, "loss_pos": loss_pos.detach(), "loss_neg": loss_neg.detach()}
        metrics["old_deviate"] = (pred.detach().float() - old).pow(2).flatten(1).mean(1)
        if ref_pred is not None:
            kl = (pred.float() - ref_pred.detach().float()).pow(2).flatten(1).mean(1)  # (N,)
            loss = loss + self.kl_weight * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
