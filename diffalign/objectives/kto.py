"""Diffusion-KTO (Li et al., NeurIPS 2024, arXiv 2404.04465, Eq. 8): unpaired, Kahneman–Tversky utility.

Idea: each image is only "desirable" or "undesirable"; push its implicit reward above (or below) a batch baseline
through a saturating sigmoid utility, so no pairs are needed.

    g    = −(err_θ − err_ref)                      implicit reward per sample (policy denoises it better → g > 0)
    z    = max(0, mean_batch g), detached           KL baseline Q_ref (official code: all-reduced over processes)
    loss = λ_y · (1 − σ(sgn · β · (g − z))),  sgn = +1 desirable, −1 undesirable; λ_d = λ_u = 1

β is the paper's β = 5000 (the official example run leaves `--beta_dpo` at its code default 1000); it absorbs T
and the mean over latent dims. Samples should get their own t and eps (`paired = False`); the official data
marks an image desirable if it was preferred at least once.

Signature: the usual `(err, ref_err, label)` with err (2B,) stacked [w; l] is read as 2B unpaired samples, w
desirable and l undesirable (sgn_w = sign(2·label − 1), sgn_l = −sgn_w; a tie gives 0, no gradient); the loss is
returned per pair (B,) as the mean of its two samples, so loss.mean() equals the official per-sample mean. For a
truly unpaired batch pass `desirable` (N,) bool and label None: the loss is then per sample (N,). `z` overrides the
baseline, e.g. `accelerator.reduce(-(err - ref_err).detach().mean(), "mean").clamp(min=0)` across processes.

Hand-computed check (tests/test_objectives_more.py): β = 2, err = [0.5, 0.8], ref = [0.6, 0.6]
    g = [0.1, −0.2], mean −0.05 → z = 0; loss_w = 1 − σ(0.2) = 0.450166, loss_l = 1 − σ(0.4) = 0.401312,
    pair loss = 0.425739. At init (policy = reference) g = z = 0 and every sample's loss is 1 − σ(0) = ½.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from diffalign.checks import KL_STRENGTH, NON_NEGATIVE
from diffalign.objectives.base import Objective


@dataclass
class DiffusionKTO(Objective):
    beta: Annotated[float, KL_STRENGTH] = 5000.0
    """The paper's β (official example run: code default 1000)."""
    desirable_weight: Annotated[float, NON_NEGATIVE] = 1.0
    """λ_d, weight of desirable samples."""
    undesirable_weight: Annotated[float, NON_NEGATIVE] = 1.0
    """λ_u, weight of undesirable samples."""

    needs_reference: ClassVar[bool] = True
    xt_source: ClassVar[str] = "noise"
    paired: ClassVar[bool] = False
    sources: ClassVar[tuple[str, ...]] = ("pairs", "round_sets")  # offline pairs; DRAGON-KTO sets
    batch_baseline: ClassVar[bool] = True  # the program passes z, averaged over the batch on every process

    def __call__(
        self,
        err: torch.Tensor,
        ref_err: torch.Tensor,
        label: torch.Tensor | None,
        desirable: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """err, ref_err: (N,); label (N/2,) for stacked [w; l] or desirable (N,) bool. -> loss (N/2,) or (N,)."""
        if (label is None) == (desirable is None):
            raise ValueError("pass exactly one of label (stacked [w; l] pairs) or desirable (unpaired samples)")
        if desirable is None:
            sgn_w = torch.sign(2 * label.to(err) - 1)  # (B,)
            sgn = torch.cat([sgn_w, -sgn_w])  # (B,) -> (2B,) stacked [w; l]
        else:
            sgn = desirable.to(err) * 2 - 1  # (N,) ±1
        g = -(err - ref_err)  # (N,)
        z = g.detach().mean().clamp(min=0) if z is None else z.detach()  # scalar baseline, no gradient
        weight = torch.where(sgn > 0, self.desirable_weight, self.undesirable_weight)
        loss = weight * (1 - torch.sigmoid(sgn * self.beta * (g - z)))  # (N,)
        acc = (sgn * (g - z) > 0).float()  # (N,)
        if desirable is not None:
            return loss, {
                "implicit_acc": acc,
                "reward": g.detach(),
                "kl_baseline": z.expand_as(g),
                "err": err.detach(),
            }
        g_w, g_l = g.detach().chunk(2)  # (2B,) -> (B,), (B,)
        metrics = {
            "implicit_acc": torch.stack(acc.chunk(2)).mean(0),
            "reward_w": g_w,
            "reward_l": g_l,
            "kl_baseline": z.expand_as(g_w),
            "err_w": err.detach().chunk(2)[0],
            "err_l": err.detach().chunk(2)[1],
        }
        return torch.stack(loss.chunk(2)).mean(0), metrics  # per pair: mean of its two samples, (2B,) -> (B,)
