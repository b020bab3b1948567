"""Diffusion-DRO (Wu, Ruan, Tseng, Shuai; NeurIPS 2025, arXiv 2510.18353, Alg. 1 / Eq. 15): inverse RL as a hinge.

Idea: a reward parameterised by the diffusion model itself should rank expert images above the policy's own
samples; training the model to win that ranking (no sigmoid, no β) moves the policy towards the experts.

    diff = (err_θ(expert) − err_ref(expert)) − (err_θ(policy) − err_ref(policy))
    loss = max(diff − m, 0),  m = −0.001            (code form; = paper's max(m, diff) − m, same gradient)

The stacked batch is [expert; policy] (2B,); `label` is ignored (the order carries it). What the trainer feeds:
  expert half: offline top-K images (K = 500 by PickScore/HPSv2) forward-noised with fresh eps at the same t as
               the matching policy sample (forward noise); target = eps.
  policy half: x_t and t read from a stored trajectory of a *snapshot* policy (DPMSolver++ 20 steps, CFG 1, random
               timestep offsets), target = the snapshot's own prediction ε_θpol(x_t, t, c), not fresh noise;
               the snapshot is re-synced to the trained model every M steps (code: 16 micro-steps).
  Both halves use the same reference (frozen base / LoRA off): err_ref under no_grad.
The trainer therefore needs the sampler's trajectory buffer; this class is only the loss (docs/objectives.md §6.1–6.2).

Hand-computed check (tests/test_objectives_more.py): err = [0.7, 0.5], ref = [0.6, 0.6]
    diff = (0.7 − 0.6) − (0.5 − 0.6) = 0.2, loss = 0.2 + 0.001 = 0.201. err = [0.5, 0.7]: diff = −0.2, loss 0.
    At init (model = reference) diff = 0 and loss = −m = 0.001, so the hinge is active and the gradient is ±1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.objectives.base import Objective


@dataclass
class DiffusionDRO(Objective):
    margin: float = -0.001
    """m of the hinge max(m, diff); the official −0.001 keeps the hinge open at init."""

    needs_reference: ClassVar[bool] = True
    xt_source: ClassVar[str] = "noise"
    paired: ClassVar[bool] = False
    sources: ClassVar[tuple[str, ...]] = ("experts",)  # experts vs the policy's own samples: `diffalign online`

    def __call__(
        self, err: torch.Tensor, ref_err: torch.Tensor, label: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict]:
        """err, ref_err: (2B,) stacked [expert; policy]; label ignored. -> loss (B,), metrics (B,)."""
        err_e, err_p = err.chunk(2)  # (2B,) -> (B,), (B,)
        ref_e, ref_p = ref_err.chunk(2)
        diff = (err_e - ref_e) - (err_p - ref_p)  # (B,)
        loss = torch.relu(diff - self.margin)
        metrics = {
            "implicit_acc": (diff < 0).float(),
            "reward_margin": -diff.detach(),
            "err_expert": err_e.detach(),
            "err_policy": err_p.detach(),
            "ref_err_expert": ref_e,
            "ref_err_policy": ref_p,
        }
        return loss, metrics
