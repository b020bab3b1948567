"""SmPO-Diffusion (Lu et al., ICML 2025, arXiv 2506.02698): DPO with a smoothed, reward-derived preference.

Idea: replace the hard "w beats l" by how much a reward model prefers w, which scales the DPO logit by γ(2p − 1),
and score both images at ReNoise-inverted latents instead of forward noise.

    p      = softmax_w(n_w, n_l) = σ(n_w − n_l),  n = (score − lo) / (hi − lo)      (smpo_preference)
    inside = −½ · β · γ · (2p − 1) · [Δ(x_w) − Δ(x_l)],  Δ = err_θ − err_ref at the inverted x_t
    loss   = −log σ(inside)

From the smoothed distribution p̃(x_w) ∝ p(x_w)^α p(x_l)^(γ−α): the logit is scaled by (2α − γ) = γ(2p − 1) with
α/γ = p; α = γ = 1 recovers DPO. β is the paper's β (SD1.5 2000, SDXL 5000) and absorbs ½, T and the mean over
latent dims as in Diffusion-DPO; γ = 10 in the official code. `label` carries p (from `smpo_preference`, computed
by the data layer when `data.label_scorer` relabels every pair with `data.label_mode: smpo`); p = ½ gives zero
weight, p < ½ flips the pair. On 0/1 labels SmPO is DPO with β·γ at inverted latents, so `diffalign train` refuses
smpo without a scorer's labels unless `hard_labels` is set (`objective.hard_labels=true`).

Score bounds are in the scorer's own units. Official code: PickScore raw cosine, (lo, hi) = (0.11544, 0.28202),
pairs ordered by PickScore so p ∈ [0.5, 0.73]. diffalign's `pickscore` returns logit_scale.exp() · cos, about
100× the cosine, so the same bounds there are `data.score_min: 11.544`, `data.score_max: 28.202` (only hi − lo
matters). x_t from ReNoise inversion: 10 grid steps for SDXL (`renoise_inversion`, the default), 5 for SD1.5
(`objective.xt_source=renoise_inversion_5`).

Hand-computed check (tests/test_objectives_more.py): β = 2, γ = 10, p = 0.6, err = [0.5, 0.8], ref = [0.6, 0.6]
    Δ_w − Δ_l = −0.1 − 0.2 = −0.3, inside = −0.5·2·10·0.2·(−0.3) = 0.6, loss = log(1 + e^−0.6) = 0.437488.
    smpo_preference(0.25, 0.20, 0.11544, 0.28202) = σ(0.05 / 0.16658) = σ(0.300156) = 0.574481.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F

from diffalign.checks import KL_STRENGTH, POSITIVE, OneOf
from diffalign.inversion import XT_SOURCES
from diffalign.objectives.base import Objective


def smpo_preference(score_w: torch.Tensor, score_l: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """p = softmax over the pair of min-max-normalised scores, (B,) each -> (B,). Only hi − lo matters."""
    n_w, n_l = (score_w - lo) / (hi - lo), (score_l - lo) / (hi - lo)
    return torch.sigmoid(n_w - n_l)  # e^{n_w} / (e^{n_w} + e^{n_l})


@dataclass
class SmPO(Objective):
    beta: Annotated[float, KL_STRENGTH] = 5000.0
    """The paper's β (SDXL 5000, SD1.5 2000)."""
    gamma: Annotated[float, POSITIVE] = 10.0
    """γ of the smoothed distribution; the logit is scaled by γ(2p − 1)."""
    xt_source: Annotated[str, OneOf(XT_SOURCES)] = "renoise_inversion"
    """Key of diffalign.inversion.XT_SOURCES the trainer must use for x_t and the target."""
    hard_labels: bool = False
    """Opt-in: train on the dataset's own (0/1) labels instead of a scorer's smoothed p."""

    needs_reference: ClassVar[bool] = True
    soft_labels: ClassVar[bool] = True  # the trainer checks that p comes from a scorer (data.label_mode: smpo)
    paired: ClassVar[bool] = True
    sources: ClassVar[tuple[str, ...]] = ("pairs",)

    def __call__(self, err: torch.Tensor, ref_err: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """err, ref_err: (2B,) stacked [w; l]; label: (B,) the smoothed preference p. -> loss (B,), metrics (B,)."""
        err_w, err_l = err.chunk(2)  # (2B,) -> (B,), (B,)
        ref_w, ref_l = ref_err.chunk(2)
        weight = self.gamma * (2 * label.to(err_w) - 1)  # (B,)
        inside = -0.5 * self.beta * weight * ((err_w - ref_w) - (err_l - ref_l))  # (B,)
        loss = -F.logsigmoid(inside)
        metrics = {
            "implicit_acc": (inside > 0).float(),
            "reward_margin": inside.detach(),
            "pref_weight": weight.detach(),
            "err_w": err_w.detach(),
            "err_l": err_l.detach(),
            "ref_err_w": ref_w,
            "ref_err_l": ref_l,
        }
        return loss, metrics
