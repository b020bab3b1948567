"""Flow-DPPO (arXiv 2606.11025; Tencent-Hunyuan/UniRL unirl/algorithms/flowdppo.py): Flow-GRPO's rollout and
advantages with PPO's ratio clip replaced by a trust region on the exact KL between the old and new step Gaussians.

Idea: a sampled ratio is a noisy one-sample proxy of how far the policy moved; a flow SDE step is a Gaussian with a
fixed std, so the KL of the old and new steps is exact and cheap. An update passes unless it is both far (KL ≥ τ)
and still pushing the way its advantage already moved it (rho > 1 with A > 0, or rho < 1 with A < 0).

    rho_i  = exp(logp_θ(x_{k+1} | x_k) - logp_old(x_{k+1} | x_k))
    KL_i   = mean_dims (mu_θ - mu_old)² / (2 std²)           std: the step's (flow: s_σ sqrt(-Δt)), paper Eq. 14
    drop_i = KL_i ≥ τ and ((rho_i > 1 and A_i > 0) or (rho_i < 1 and A_i < 0))           paper Eq. 18
    L_i    = -A_i rho_i (0 where drop_i) + β KL_ref,i        KL_ref as GRPO's (Flow-DPPO has none: β = 0)

KL is a mean over dims (the official `kl_score`, the paper's KL / dims), so τ = 1e-5 is theirs. mu_old is the
sampler's step mean (old_policy_steps); the official code replays it at the pre-update weights, the same policy.
Advantages as Flow-GRPO's over the round's std (the recipe's adv_use_global_std), unclipped (adv_clip = inf). On the
first optimizer step of a round KL = 0 and rho = 1: L = -A.

Hand-computed check (tests/test_flow_dppo.py): τ = 0.1, std = 0.5, mean_dims Δmu² = [0.1, 0.01, 0.1, 0.1]
(KL = [0.2, 0.02, 0.2, 0.2]), rho = [1.5, 1.5, 0.5, 1.5], A = [1, 1, 1, -1]: only chain 0 is far and over-pushing,
L = [0, -1.5, -0.5, 1.5].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from diffalign.checks import NON_NEGATIVE, POSITIVE
from diffalign.likelihood import step_kl
from diffalign.objectives.base import Objective
from diffalign.online.advantages import group_advantages


@dataclass
class FlowDPPO(Objective):
    kl_threshold: Annotated[float, POSITIVE] = 1e-5
    """τ: a step whose mean-over-dims KL(old || new) is below it always trains (Flow-DPPO's kl_mask_threshold 1e-5)."""
    beta: Annotated[float, NON_NEGATIVE] = 0.0
    """β of Flow-GRPO's KL to the reference (Flow-DPPO has none: 0 = no reference pass)."""
    adv_clip: Annotated[float, POSITIVE] = math.inf
    """Advantages are clipped to [−c, c] (Flow-DPPO: no clip)."""
    global_std: bool = True
    """Divide by the std of all the round's rewards, not the prompt group's (Flow-DPPO's adv_use_global_std)."""

    needs_reference: ClassVar[bool] = True  # the KL term (skipped when beta is 0)
    own_kl: ClassVar[str] = "beta"
    paired: ClassVar[bool] = False
    xt_source: ClassVar[str] = "trajectory"
    sources: ClassVar[tuple[str, ...]] = ("old_policy_steps",)  # + the sampler's step mean and std

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(P, G) rewards of a round -> (P, G) group-relative advantages."""
        return group_advantages(rewards, self.global_std, clip=self.adv_clip)

    def __call__(self, log_prob, old_log_prob, advantages, mean, old_mean, std, ref_mean=None, kl_std=None):
        """log_prob (B,), mean (B, ...) with grad; old_log_prob (B,), advantages (B,), old_mean (B, ...) from the
        round; std the step std; ref_mean and kl_std for β > 0. -> loss (B,), metrics (B,)."""
        log_ratio = log_prob - old_log_prob.detach()  # (B,)
        ratio = torch.exp(log_ratio)
        a = advantages.to(log_prob)
        kl_old = step_kl(mean, old_mean, std).detach()  # (B, ...) -> (B,): the mask only, no gradient
        far = kl_old >= self.kl_threshold
        drop = far & (((ratio > 1) & (a > 0)) | ((ratio < 1) & (a < 0)))  # (B,) bool, no gradient
        loss = torch.where(drop, torch.zeros_like(ratio), -a * ratio)  # where, not a product: no inf * 0
        metrics = {
            "advantage": a,
            "ratio": ratio.detach(),
            "kl_old": kl_old,
            "far_frac": far.float(),
            "masked_frac": drop.float(),
            "approx_kl_old": 0.5 * log_ratio.detach() ** 2,
        }
        if self.beta > 0:
            kl = step_kl(mean, ref_mean, kl_std)  # (B, ...) -> (B,)
            loss = loss + self.beta * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
