"""DGPO (Luo et al. 2025, arXiv 2510.08425; Luo-Yihong/DGPO `scripts/train_sd3_dgpo.py`): group-level DPO on the
clean samples of a deterministic (ODE) sampler, with no step likelihood and no SDE.

Idea: a Bradley-Terry preference between the group's above-average and below-average samples, each sample weighted
by its group-relative advantage A (which sums to 0 over the group, so it splits the group into a preferred and a
rejected half); the implicit reward is Diffusion-DPO's, how much better the policy denoises x0 than the reference.

    Δ_i  = err_θ(x0_i) − err_ref(x0_i)            mean-over-dims flow-matching error (diffalign.likelihood), shared
                                                  t and eps within the group (official use_shared_noise)
    z_g  = β / G · Σ_{i∈g} A_i Δ_i                 A_i = clip(group advantage, −c, c), G the group size
    loss = softplus(z_g) / β = −log σ(−z_g) / β     per group; −z_g is the margin (preferred minus rejected)

The official code writes it as the surrogate mean_i sg(σ(z_g)) A_i err_θ(x0_i) (compute_group_dgpo_loss_allreduce,
lines 162-193), whose gradient is σ(z_g) Σ_i A_i ∇err_i / (B G); the mean over B groups of the loss above has exactly
that gradient (d softplus(z) / dz = σ(z), dz / d err_i = β A_i / G), so β, lr and grad clipping mean theirs.
β (official beta_dpo: 100 for OCR and GenEval, config/dgpo.py): the DPO KL strength; large β saturates σ(z) sooner,
i.e. stops pushing a group once its margin is clear. The KL to the base (official train.beta 0.02) is
online.kl_weight. Not here: the official PPO-style clip of the error ratio (clip_dsm) and the EMA reference
(use_ema_ref, off by default).

Hand-computed check (tests/test_dgpo.py): β = 2, one group of G = 2, A = (1, −1), Δ = (−0.1, 0.2):
    z = 2 / 2 · (1 · −0.1 − 1 · 0.2) = −0.3, loss = log(1 + e^−0.3) / 2 = 0.554355 / 2 = 0.277178.
At LoRA init the policy equals the reference: Δ = 0, z = 0, loss = ln 2 / β.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F

from diffalign.checks import KL_STRENGTH, POSITIVE
from diffalign.objectives.base import Objective
from diffalign.online.advantages import group_advantages


@dataclass
class DGPO(Objective):
    beta: Annotated[float, KL_STRENGTH] = 100.0
    """β of the group DPO (official beta_dpo 100, OCR and GenEval); larger = stay closer to the reference."""
    adv_clip: Annotated[float, POSITIVE] = 5.0
    """Advantages are clipped to [−c, c] (official train.adv_clip_max 5)."""
    global_std: bool = True
    """Divide by the std of all the round's rewards (official OCR) instead of the prompt group's (GenEval)."""

    needs_reference: ClassVar[bool] = True
    paired: ClassVar[bool] = False  # t and eps are shared by a whole group, not a pair (the source draws them)
    sources: ClassVar[tuple[str, ...]] = ("round_groups",)  # whole groups of a round's samples: `diffalign online`

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(P, G) rewards of a round -> (P, G) group-relative advantages (per-prompt mean, clipped)."""
        return group_advantages(rewards, self.global_std, clip=self.adv_clip)

    def __call__(
        self, err: torch.Tensor, ref_err: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """err (B·G,) with grad, ref_err (B·G,) group by group; advantages (B, G). -> loss (B,), metrics (B,)."""
        a = advantages.to(err)
        delta = (err - ref_err.detach()).view_as(a)  # (B·G,) -> (B, G)
        z = self.beta * (a * delta).mean(1)  # (B, G) -> (B,): β / G Σ A Δ
        loss = F.softplus(z) / self.beta  # (B,)
        metrics = {
            "implicit_acc": (z < 0).float(),
            "reward_margin": -z.detach(),
            "err_pos": (err.detach().view_as(a) * (a > 0)).sum(1) / (a > 0).sum(1).clamp(min=1),
            "err_neg": (err.detach().view_as(a) * (a < 0)).sum(1) / (a < 0).sum(1).clamp(min=1),
        }
        return loss, metrics
