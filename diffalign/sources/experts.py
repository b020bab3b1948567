"""Diffusion-DRO (Wu et al. 2025, Alg. 1): stacked [expert; policy]; each expert image forward-noised at the policy
sample's t, the policy half at a stored trajectory step with the sampling snapshot's own prediction as target. Every
policy chain was sampled from its expert's caption, so one caption conditions both halves."""

from __future__ import annotations

import torch

from diffalign.engine.step import StepContext, pair_generator
from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule, per_sample_error, prediction_kl
from diffalign.sampling import Trajectory
from diffalign.sources.base import Denoise, ErrorInputs, Reference, Round, Source


def dro_inputs(
    family,
    denoise: Denoise,
    schedule: Schedule,
    expert_x0: torch.Tensor,
    eps: torch.Tensor,
    traj: Trajectory,
    cond: dict[str, torch.Tensor],
    idx_p: torch.Tensor,
    k: int,
    reference: Reference,
    with_kl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Errors (2B,) with grad and reference errors (2B,) of [experts expert_x0 (B, C, h, w) noised with eps (B, ...);
    policy chains idx_p (B,) at stored step k], and with `with_kl` the prediction_kl (2B,) to the reference at the
    same x_t (else None). The policy chains were prompted by their experts' captions, so their conditioning `cond`
    (2B, ...) = [caption rows; the same rows] conditions both halves."""
    if traj.predictions is None:
        raise ValueError("dro_inputs: the trajectory has no stored predictions (sample with keep_predictions=True)")
    device = family.device
    b = len(idx_p)
    t = traj.timesteps[k].expand(2 * b).to(device)  # (2B,) the expert is noised to the policy sample's t
    x0_e, eps = expert_x0.to(device), eps.to(device)  # (B, C, h, w)
    xt = torch.cat([schedule.add_noise(x0_e, eps, t[:b]), traj.latents[k][idx_p].to(device)])  # (2B, C, h, w)
    target = torch.cat([schedule.target(x0_e, eps, t[:b]), traj.predictions[k][idx_p].to(device)])
    with torch.no_grad(), reference():
        ref_pred = denoise(xt, t, cond)
    pred = denoise(xt, t, cond)
    kl = prediction_kl(pred, ref_pred) if with_kl else None
    return per_sample_error(pred, target), per_sample_error(ref_pred, target), kl  # (2B,), (2B,), (2B,) | None


class Experts(Source):
    name = "experts"
    stepwise = True
    experts = True
    keep_predictions = True

    def check(self, cfg) -> None:
        if cfg.sampling.guidance > 1:
            raise DiffalignError(
                f"sampling.guidance must be <= 1 for dro (the snapshot's conditional prediction is the target), "
                f"not {cfg.sampling.guidance:g}"
            )

    def rows(self, by_group, cfg, labels, r, pool_index):
        """Every policy chain is a negative of the expert whose caption prompted it: (chain idx, expert idx)."""
        return torch.arange(len(pool_index)), pool_index

    def inputs(self, ctx: StepContext, batch: dict, device) -> ErrorInputs:
        rnd: Round = batch["round"]
        rows = batch["rows"]
        expert_x0, _ = rnd.experts
        idx_p, idx_e = rnd.first[rows], rnd.second[rows]  # (B,) policy chains and the experts they were prompted by
        gens = [pair_generator(ctx.seed, rnd.index, batch["step"], r) for r in rows.tolist()]
        eps = torch.cat([torch.randn((1, *expert_x0.shape[1:]), generator=g) for g in gens])  # (B, C, h, w) keyed
        err, ref_err, kl = dro_inputs(
            ctx.family, ctx.denoise, ctx.schedule, expert_x0[idx_e], eps, rnd.traj, rnd.text.rows(torch.cat([idx_p, idx_p])), idx_p, batch["k"],
            ctx.reference, with_kl=ctx.kl_weight > 0,
        )  # fmt: skip
        return ErrorInputs(err, ref_err, kl=kl)
