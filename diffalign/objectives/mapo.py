"""MaPO (Hong, Paul et al., arXiv 2406.06424): margin-aware preference optimisation, no reference model.

Idea: fit the winner (SFT term) while widening a bounded-link margin between the winner's and the loser's
denoising errors, so no reference forward is needed (code form, mapo-t2i/mapo utils.compute_loss).

    f(L)   = s·L / (e^{s·L} − 1)                    bounded link ∈ (0, 1], decreasing, f(0) = 1 (limit)
    margin = T · (f(err_w) − f(err_l))              T = num_train_timesteps (1000)
    loss   = err_w − β · log σ(margin)               (hard label; a soft p uses p·logσ(m) + (1−p)·logσ(−m))

β is the code's `beta_mapo` = 0.1 ("ORPO contribution factor"), s = `snr_value` = 0.5, T = 1000; the mapping of
(s, β) to the paper's β₁ and link scale is unverified (docs/objectives.md §8.1). f is computed as x/expm1(x) with its
Taylor series 1 − x/2 + x²/12 near 0, so value and gradient stay finite at err → 0.

Hand-computed check (tests/test_objectives_more.py): β = 0.1, s = 0.5, T = 10, err = [0.2, 0.6]
    f(0.2) = 0.1/(e^0.1 − 1) = 0.950833, f(0.6) = 0.3/(e^0.3 − 1) = 0.857489, margin = 10·0.093344 = 0.933444,
    loss = 0.2 + 0.1·log(1 + e^−0.933444) = 0.233160. With err_w = err_l the margin is 0: loss = err_w + β ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F

from diffalign.checks import NON_NEGATIVE, POSITIVE
from diffalign.objectives.base import Objective


def bounded_link(x: torch.Tensor) -> torch.Tensor:
    """x / (e^x − 1) with the limit 1 at x = 0, finite gradient everywhere (double-where guard)."""
    small = x.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2 + x * x / 12, safe / torch.expm1(safe))


@dataclass
class MaPO(Objective):
    beta: Annotated[float, NON_NEGATIVE] = 0.1
    """The code's beta_mapo: weight of the margin term against the SFT term."""
    snr_value: Annotated[float, POSITIVE] = 0.5
    """s, the scale inside the link f(L) = s·L / (e^{s·L} − 1)."""
    num_train_timesteps: Annotated[float, POSITIVE] = 1000.0
    """T, multiplies the margin inside log σ (the code uses the scheduler's num_train_timesteps)."""

    needs_reference: ClassVar[bool] = False
    xt_source: ClassVar[str] = "noise"
    paired: ClassVar[bool] = True
    sources: ClassVar[tuple[str, ...]] = ("pairs",)

    def __call__(self, err: torch.Tensor, ref_err: None, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """err: (2B,) stacked [w; l]; ref_err: None; label: (B,) P(w preferred). -> loss (B,), metrics (B,)."""
        err_w, err_l = err.chunk(2)  # (2B,) -> (B,), (B,)
        f_w, f_l = bounded_link(self.snr_value * err_w), bounded_link(self.snr_value * err_l)
        margin = self.num_train_timesteps * (f_w - f_l)  # (B,)
        label = label.to(margin)
        ratio = label * F.logsigmoid(margin) + (1 - label) * F.logsigmoid(-margin)  # (B,)
        loss = err_w - self.beta * ratio
        metrics = {
            "implicit_acc": (margin > 0).float(),
            "reward_margin": margin.detach(),
            "err_w": err_w.detach(),
            "err_l": err_l.detach(),
        }
        return loss, metrics
