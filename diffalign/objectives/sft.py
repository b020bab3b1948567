"""SFT baseline (the `--sft` flag of the official Diffusion-DPO code, arXiv 2311.12908 §5.4): fit the preferred image.

Idea: plain denoising regression on the image people preferred; no reference, no loser term.

    loss = p · err_θ(x_w) + (1 − p) · err_θ(x_l)       (hard label p = 1: the winner's error only)

No β: the loss is the estimator's per-sample mean-over-dims MSE. With a soft label the loss is the expected error
of the preferred image, which equals the official winner-only SFT at p = 1 (x_t from forward noise).

Hand-computed check (tests/test_objectives_more.py): err = [0.3, 0.5], p = 1 → 0.3; p = 0.75 → 0.75·0.3 + 0.25·0.5
    = 0.35.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.objectives.base import Objective


@dataclass
class SFT(Objective):
    needs_reference: ClassVar[bool] = False
    xt_source: ClassVar[str] = "noise"
    paired: ClassVar[bool] = True
    sources: ClassVar[tuple[str, ...]] = ("pairs",)

    def __call__(self, err: torch.Tensor, ref_err: None, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """err: (2B,) stacked [w; l]; ref_err: None; label: (B,) P(w preferred). -> loss (B,), metrics (B,)."""
        err_w, err_l = err.chunk(2)  # (2B,) -> (B,), (B,)
        label = label.to(err_w)
        loss = label * err_w + (1 - label) * err_l
        return loss, {"err_w": err_w.detach(), "err_l": err_l.detach()}
