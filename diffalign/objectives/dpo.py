"""Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, Eq. 14).

Idea: DPO on the denoising chain; the implicit reward of an image is how much better the policy denoises it than
the reference does, so the loss pushes the winner's error down relative to the loser's.

    Δ(x)   = err_θ(x) − err_ref(x)                         per-sample mean-over-dims MSE (diffalign.likelihood)
    inside = −β/2 · [Δ(x_w) − Δ(x_l)]
    loss   = −log σ(inside)                                 (hard label: w preferred)

β is the paper's β (SDXL 5000, SD1.5 2000–5000): it absorbs the paper's T·ω(λ_t) and the mean over latent dims;
the ½ is the official code's (`-0.5 * beta_dpo * ...`). With a soft label p = P(w ≻ l) the loss is the
label-smoothed form −[p log σ(inside) + (1−p) log σ(−inside)], which equals the paper's loss at p = 1.

Hand-computed check (tests/test_objectives.py): β = 2, err_w = 0.5, err_l = 0.8, ref_w = 0.6, ref_l = 0.6
    Δ_w = −0.1, Δ_l = 0.2, inside = −1 · (−0.1 − 0.2) = 0.3, loss = −log σ(0.3) = log(1 + e^−0.3) = 0.554355.
At LoRA init the policy equals the reference: Δ = 0, inside = 0, loss = ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F

from diffalign.checks import KL_STRENGTH, NON_NEGATIVE, OneOf
from diffalign.inversion import XT_SOURCES
from diffalign.objectives.base import Objective


@dataclass
class DiffusionDPO(Objective):
    beta: Annotated[float, KL_STRENGTH] = 5000.0
    """The paper's β (KL strength; larger = stay closer to the reference)."""
    sft_weight: Annotated[float, NON_NEGATIVE] = 0.0
    """Weight of an added SFT term: the policy's error on the winner."""
    xt_source: Annotated[str, OneOf(XT_SOURCES)] = "noise"
    """Where x_t comes from (diffalign.inversion.XT_SOURCES); "ddim_inversion" gives InPO."""

    needs_reference: ClassVar[bool] = True
    paired: ClassVar[bool] = True
    sources: ClassVar[tuple[str, ...]] = ("pairs", "round_pairs")  # offline pairs; DRAGON on generated x0

    def __call__(self, err: torch.Tensor, ref_err: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """err, ref_err: (2B,) stacked [w; l]; label: (B,) P(w preferred). Returns loss (B,) and metrics (B,)."""
        err_w, err_l = err.chunk(2)  # (2B,) -> (B,), (B,)
        ref_w, ref_l = ref_err.chunk(2)
        inside = -0.5 * self.beta * ((err_w - ref_w) - (err_l - ref_l))  # (B,)
        label = label.to(inside)
        loss = -(label * F.logsigmoid(inside) + (1 - label) * F.logsigmoid(-inside))  # (B,)
        if self.sft_weight:
            loss = loss + self.sft_weight * err_w
        metrics = {
            "implicit_acc": (inside > 0).float(),
            "reward_margin": inside.detach(),
            "err_w": err_w.detach(),
            "err_l": err_l.detach(),
            "ref_err_w": ref_w,
            "ref_err_l": ref_l,
        }
        return loss, metrics
