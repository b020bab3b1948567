"""GRPO-Guard (arXiv 2510.22319, 2025; yifan123/flow_grpo scripts/train_sd3_GRPO_Guard.py): Flow-GRPO
with the importance ratio re-centred and rescaled per step (RatioNorm) and each step's gradient reweighted.

Idea: with logp a mean over dims and x' = mu_old + s eps, log rho = mean(eps Δmu)/s - mean(Δmu²)/(2 s²): the second
term pulls rho below 1 (most at low-noise steps), so the clip never catches an over-confident positive-advantage
update ("implicit over-optimization"). Adding it back and multiplying by s leaves mean_dims(eps Δmu), whose scale is
the same at every step; dividing the loss by -Δt balances the steps' gradients.

    s      = std_k = s_σ sqrt(-Δt)                                  the step std (official: mean(std_dev_t) mean(sqrt_dt))
    b_i    = mean_dims (mu_θ - mu_old)² / (2 s²)                    mu_old: the sampler's step mean (old_policy_steps)
    rho_i  = exp((logp_θ - logp_old + b_i) s)
    L_i    = max(-A_i rho_i, -A_i clip(rho_i, 1 - ε, 1 + ε)) / (-Δt) + β KL_i    -Δt = (std / kl_std)², KL as GRPO's

b keeps its gradient, as the official code (its gradient with logp's is mean_dims(eps ∂mu_θ): no 1/s). On DDIM-eta
kl_std is the step std, so -Δt reads 1: the ratio normalisation without a reweight (the paper's steps are the flow
SDE's). ε is tiny because log rho is now O(s) (official 2e-6 OCR / GenEval, 4e-6 PickScore). On the first optimizer
step of a round mu_θ = mu_old: rho = 1 and L = -A / (-Δt).

Hand-computed check (tests/test_grpo_guard.py): s = 0.5, -Δt = 0.25, mean_dims (Δmu)² = 0.02 (b = 0.04),
logp - logp_old = [0.16, -0.44], A = [1, -1], ε = 0.05: rho = exp([0.1, -0.2]) = [1.105, 0.819];
L = [max(-1.105, -1.05), max(0.819, 0.95)] / 0.25 = [-4.2, 3.8] (both clipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from diffalign.checks import NON_NEGATIVE, POSITIVE
from diffalign.likelihood import step_kl
from diffalign.objectives.grpo import GRPO


@dataclass
class GRPOGuard(GRPO):
    clip_range: Annotated[float, POSITIVE] = 2e-6
    """ε of the clip of the normalised ratio (GRPO-Guard: 2e-6 OCR / GenEval, 4e-6 PickScore; SD3.5-M, 10 steps)."""
    beta: Annotated[float, NON_NEGATIVE] = 0.0
    """β of Flow-GRPO's KL to the reference (GRPO-Guard's configs: 0 = no reference pass)."""
    global_std: bool = False
    """Divide by the std of all the round's rewards instead of the prompt group's (GRPO-Guard's configs: False)."""

    sources: ClassVar[tuple[str, ...]] = ("old_policy_steps",)  # + the sampler's step mean and std

    def __call__(self, log_prob, old_log_prob, advantages, mean, old_mean, std, ref_mean=None, kl_std=None):
        """log_prob (B,), mean (B, ...) with grad; old_log_prob (B,), advantages (B,), old_mean (B, ...) from the
        round; std the step std, kl_std (`sampler.kl_std`) the noise scale s_σ. -> loss (B,), metrics (B,)."""
        s = std.to(log_prob).mean()  # one step per micro-batch: a scalar, as the official mean over the batch
        dt = (s / kl_std.to(log_prob).mean()) ** 2  # -Δt: flow std = s_σ sqrt(-Δt)
        bias = step_kl(mean, old_mean, s)  # (B, ...) -> (B,) mean_dims Δmu² / (2 s²), with mu_θ's gradient
        log_ratio = log_prob - old_log_prob.detach()  # (B,)
        ratio = torch.exp((log_ratio + bias) * s)
        a = advantages.to(log_prob)
        clipped = torch.clamp(ratio, 1 - self.clip_range, 1 + self.clip_range)
        loss = torch.maximum(-a * ratio, -a * clipped) / dt  # (B,)
        metrics = {
            "advantage": a,
            "ratio": ratio.detach(),
            "clip_frac": ((ratio.detach() - 1).abs() > self.clip_range).float(),
            "approx_kl_old": 0.5 * log_ratio.detach() ** 2,
            "step_weight": (1 / dt).detach().expand_as(a),
        }
        if self.beta > 0:
            kl = step_kl(mean, ref_mean, kl_std)  # (B, ...) -> (B,)
            loss = loss + self.beta * kl
            metrics["kl"] = kl.detach()
        return loss, metrics
