"""GRPO for diffusion (Flow-GRPO: Liu et al. 2025, arXiv 2505.05470; DDPO's clipped surrogate on DDPM models):
a PPO-style policy gradient on the sampler's own steps, with a group-relative advantage instead of a value model.

Idea: each denoising step is an action with a Gaussian density (the flow SDE step, or DDIM-eta on DDPM families);
images whose reward beats their prompt group's mean make every step of their chain more likely, clipped to a trust
region around the policy that sampled them, with a KL pull towards the reference.

    A_i   = clip((r_i - mean_group r) / (std + 1e-4), -c, c)                (diffalign.online.advantages)
    rho_i = exp(logp_θ(x_{k+1} | x_k) - logp_old(x_{k+1} | x_k))             logp_old stored at sampling time
    L_i   = max(-A_i rho_i, -A_i clip(rho_i, 1 - ε, 1 + ε)) + β KL_i
    KL_i  = mean_dims (mu_θ - mu_ref)² / (2 s_k²)                            s_k = sampler.kl_std(t_k)

logp is a mean over latent dims (diffalign.likelihood.gaussian_log_prob), as in the official code. What β means:
- flow sampler: s_k is the SDE's noise scale a sqrt(σ/(1 - σ)), Flow-GRPO's `std_dev_t` (scripts/train_sd3.py), not
  the step std s_k sqrt(-Δt); the exact KL of the step Gaussians would be 1/(-Δt) times larger (x3.7-x25 on SD3.5-M's
  10 steps). The official code drops that Δt (flow_grpo#22; their first code kept it, with β 0.004), so β is theirs.
- DDIM-eta: s_k is the step std η sqrt(var(t, t_prev)), so the KL is the exact per-dimension KL of the two steps
  (DDPO has no KL; diffalign's own choice, no official scale to match).
The reference is the base model (LoRA off). With one image per prompt the advantage is over the round (Flow-GRPO's
batch normalisation); chains with A = 0 are dropped from the round (pairing.drop_zero_advantages, as Flow-GRPO), so
the KL is averaged over the informative chains only. On the first optimizer step of a round the policy is the
sampler, rho = 1 and the loss is -mean(A) (+ 0 KL at LoRA init).

Hand-computed check (tests/test_grpo.py): ε = 0.2, A = [1, -1], logp - logp_old = [ln 1.5, ln 0.5]:
    rho = [1.5, 0.5]; L_1 = max(-1.5, -1.2) = -1.2; L_2 = max(0.5, 0.8) = 0.8 (both clipped: no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from diffalign.checks import NON_NEGATIVE, POSITIVE
from diffalign.likelihood import step_kl
from diffalign.objectives.base import Objective
from diffalign.online.advantages import group_advantages


@dataclass
class GRPO(Objective):
    clip_range: Annotated[float, POSITIVE] = 1e-4
    """ε of the ratio clip [1 − ε, 1 + ε] (Flow-GRPO: 1e-4; Fast / CPS 1e-5; DDPO 1e-4)."""
    beta: Annotated[float, NON_NEGATIVE] = 0.04
    """β of the KL to the reference (Flow-GRPO GenEval / OCR: 0.04, PickScore 0.01; 0 = no reference pass)."""
    adv_clip: Annotated[float, POSITIVE] = 5.0
    """Advantages are clipped to [−c, c] (Flow-GRPO / DDPO: 5)."""
    global_std: bool = True
    """Divide by the std of all the round's rewards (Flow-GRPO's SD3.5 default) instead of the prompt group's."""

    needs_reference: ClassVar[bool] = True  # the KL term (skipped when beta is 0)
    own_kl: ClassVar[str] = "beta"  # its KL weight: online.kl_weight is refused
    paired: ClassVar[bool] = False
    xt_source: ClassVar[str] = "trajectory"  # x_t from stored sampled chains, not XT_SOURCES
    sources: ClassVar[tuple[str, ...]] = ("policy_steps",)  # stored steps + log-probs: `diffalign online`

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(P, G) rewards of a round -> (P, G) group-relative advantages."""
        return group_advantages(rewards, self.global_std, clip=self.adv_clip)

    def __call__(self, log_prob, old_log_prob, advantages, mean=None, ref_mean=None, kl_std=None):
        """log_prob (B,) with grad, old_log_prob (B,) and advantages (B,) from the round; for β > 0 the step means
        mean (B, ...) with grad, ref_mean (B, ...) and the KL's s (`sampler.kl_std`, not the flow step's std).
        -> loss (B,), metrics (B,)."""
        log_ratio = log_prob - old_log_prob.detach()  # (B,)
        ratio = torch.exp(log_ratio)
        a = advantages.to(log_prob)
        clipped = torch.clamp(ratio, 1 - self.clip_range, 1 + self.clip_range)
        loss = torch.maximum(-a * ratio, -a * clipped)  # (B,)
        metrics = {
            "advantage": a,
            "ratio": ratio.detach(),
            "clip_frac": ((ratio.detach() - 1).abs() > self.clip_range).float(),
            "approx_kl_old": 0.5 * log_ratio.detach() ** 2,
        }
        if self.beta > 0:
            kl = step_kl(mean, ref_mean, kl_std)  # (B, ...) -> (B,)
            loss = loss + self.beta * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
