"""D3PO (Yang et al., CVPR 2024, arXiv 2311.13231, Eq. 14): DPO on every step of two sampled denoising chains.

Idea: denoising is an MDP whose actions are the DDIM-eta steps; if chain w (started from the same x_T as chain l)
is preferred, every step of w is taken to be better, so per step a DPO loss on the step log-prob ratios.

    r    = clamp(exp(logp_θ(x_{t-1} | x_t) − logp_ref(x_{t-1} | x_t)), 1 − ε, 1 + ε)      per chain, per step
    loss = −log σ(β · log r_w − β · log r_l)

logp is diffalign.sampling.step_log_prob (mean over latent dims, CFG prediction), which is why β = 0.1 is small.
The clamp acts on the ratio *before* the log, as the official code (`scripts/train.py`: torch.clamp(torch.exp(...)),
then torch.log); ε = 0.1 after issue #4. A ratio outside [1 − ε, 1 + ε] gets no gradient (PPO-like trust region).
`label` (B,) is P(w preferred): 1 or 0 (chains swapped); the official h = ±1 from the comparison, ties (h = 0 on both
chains, loss ln 2 with no gradient) are dropped by the pair builder instead.

Calling convention of diffalign.objectives, with log-probs in place of errors: `objective(log_prob, ref_log_prob,
label)`, log_prob (2B,) stacked [w; l] with grad, ref_log_prob (2B,) without.

Hand-computed check (tests/test_online.py): β = 1, logp = [0.05, −0.2], ref = [0, 0]
    log r_w = log clamp(e^0.05 = 1.05127) = 0.05, log r_l = log clamp(e^−0.2 = 0.81873 → 0.9) = −0.105361,
    inside = 0.155361, loss = log(1 + e^−0.155361) = 0.618481. At LoRA init logp = ref: inside 0, loss = ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F

from diffalign.checks import KL_STRENGTH, Range
from diffalign.objectives.base import Objective


def clipped_log_ratio(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, eps: float) -> torch.Tensor:
    """log clamp(exp(logp − logp_ref), 1 − ε, 1 + ε), elementwise, as the official code orders the ops."""
    return torch.log(torch.clamp(torch.exp(log_prob - ref_log_prob), 1 - eps, 1 + eps))


@dataclass
class D3PO(Objective):
    beta: Annotated[float, KL_STRENGTH] = 0.1
    """The paper's β (official config: 0.1)."""
    clip: Annotated[float, Range(gt=0, lt=1)] = 0.1
    """ε of the ratio clamp [1 − ε, 1 + ε] (official: 0.1)."""

    needs_reference: ClassVar[bool] = True
    paired: ClassVar[bool] = True
    xt_source: ClassVar[str] = "trajectory"  # x_t from stored sampled chains (diffalign.sampling), not XT_SOURCES
    sources: ClassVar[tuple[str, ...]] = ("trajectory",)  # stored sampled chains: `diffalign online`

    def __call__(
        self, log_prob: torch.Tensor, ref_log_prob: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """log_prob, ref_log_prob: (2B,) stacked [w; l]; label (B,) in {0, 1}. -> loss (B,), metrics (B,)."""
        log_r = clipped_log_ratio(log_prob, ref_log_prob.detach(), self.clip)  # (2B,)
        log_r_w, log_r_l = log_r.chunk(2)  # (2B,) -> (B,), (B,)
        sgn = 2 * label.to(log_r) - 1  # (B,) +1: w preferred, −1: l preferred
        inside = sgn * self.beta * (log_r_w - log_r_l)  # (B,)
        loss = -F.logsigmoid(inside)
        delta = (log_prob - ref_log_prob).detach()  # (2B,)
        clipped = (delta.exp() - 1).abs() > self.clip  # (2B,)
        metrics = {
            "implicit_acc": (inside > 0).float(),
            "reward_margin": inside.detach(),
            "log_ratio_w": delta.chunk(2)[0],
            "log_ratio_l": delta.chunk(2)[1],
            "clip_frac": torch.stack(clipped.float().chunk(2)).mean(0),
        }
        return loss, metrics
