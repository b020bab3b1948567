"""DDIM-InPO (Lu et al., CVPR 2025 Highlight, arXiv 2503.18454): Diffusion-DPO at DDIM-inverted latents.

Idea: give each preference image the latent the current policy would have denoised into it (DDIM inversion, no
grad) and apply the per-timestep DPO loss there, so the optimised latents are tied to x0.

    x_t    = DDIM inversion of x0 with the policy (diffalign.inversion.ddim_inversion: 10-step grid, eta 0.1)
    tau    = (x_t − √ᾱ_t x0) / √(1 − ᾱ_t)                           back-solved target noise
    inside = −β/2 · [Δ(x_w) − Δ(x_l)],  Δ = err_θ − err_ref at (x_t, t, tau)
    loss   = −log σ(inside)

Decision: InPO is a *configuration*, not a new loss. The paper derives a per-timestep DPO objective from the joint
KL over (x0, x_t) and the official train.py computes exactly Diffusion-DPO's `−0.5·β·(Δ_w − Δ_l)`, logsigmoid, on
the inverted latents with human labels (docs/objectives.md §4.1). So this class only changes `xt_source` and delegates
the maths to DiffusionDPO (one copy of the loss). β is the paper's β (SD1.5 2000 from an SFT'd UNet, SDXL 5000);
it absorbs the ½, T and the mean over latent dims exactly as in Diffusion-DPO.

Hand-computed check = Diffusion-DPO's: β = 2, err = [0.5, 0.8], ref = [0.6, 0.6] → inside 0.3, loss 0.554355.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch

from diffalign.checks import KL_STRENGTH, NON_NEGATIVE, OneOf
from diffalign.inversion import XT_SOURCES
from diffalign.objectives.base import Objective
from diffalign.objectives.dpo import DiffusionDPO


@dataclass
class InPO(Objective):
    beta: Annotated[float, KL_STRENGTH] = 5000.0
    """The paper's β (SDXL 5000, SD1.5 2000)."""
    sft_weight: Annotated[float, NON_NEGATIVE] = 0.0
    """Weight of an added SFT term (the policy's error on the winner); 0 in the paper."""
    xt_source: Annotated[str, OneOf(XT_SOURCES)] = "ddim_inversion"
    """Key of diffalign.inversion.XT_SOURCES the trainer must use for x_t and the target."""

    needs_reference: ClassVar[bool] = True
    paired: ClassVar[bool] = True
    sources: ClassVar[tuple[str, ...]] = ("pairs",)

    def __call__(self, err: torch.Tensor, ref_err: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """err, ref_err: (2B,) stacked [w; l] at inverted latents; label: (B,) P(w preferred). -> loss (B,), metrics."""
        return DiffusionDPO(beta=self.beta, sft_weight=self.sft_weight)(err, ref_err, label)
