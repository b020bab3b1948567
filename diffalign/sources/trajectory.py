"""D3PO: both chains of each pair at a stored trajectory step k, their step log-probs recomputed with CFG by the
same step density the sampler drew from (`sampler.log_prob`: DDIM-eta or the flow SDE); the policy with grad, the
reference without. Pairs by pairing.split (or a human label file), as DRAGON's."""

from __future__ import annotations

import torch

from diffalign.engine.step import StepContext
from diffalign.errors import DiffalignError
from diffalign.likelihood import step_kl
from diffalign.online.pairing import PAIR_RULES
from diffalign.sampling import Trajectory, guided_prediction
from diffalign.sources.base import Denoise, Reference, Round, Source, StepLogProbs, Through
from diffalign.sources.round_pairs import pair_rows


def d3po_inputs(
    family,
    denoise: Denoise,
    sampler,
    traj: Trajectory,
    cond: dict[str, torch.Tensor],
    idx_w: torch.Tensor,
    idx_l: torch.Tensor,
    k: int,
    reference: Reference,
    with_kl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step log-probs (2B,) with grad and reference (2B,) without, at trajectory step k for pairs (idx_w, idx_l),
    and with `with_kl` the step KL of the policy to the reference (2B,) with grad (else None). `cond`: the stacked
    [w; l] rows' guided conditioning (`EncodedPrompts.guided` or `encode_guided`: (2B, ...), (4B, ...) with CFG).

    `sampler` is the one the round was sampled with (diffalign.sampling: DDIM-eta or flow SDE); its `log_prob` is
    the step density the sampler drew from, its `mean_std` that density's mean and std.
    """
    device = family.device
    idx = torch.cat([idx_w, idx_l])  # (2B,) stacked [w; l]
    xt = traj.latents[k][idx].to(device)  # (2B, C, h, w)
    x_prev = traj.latents[k + 1][idx].to(device)
    t = traj.timesteps[k]
    policy = Through(family, denoise)
    with torch.no_grad(), reference():
        ref_pred = guided_prediction(policy, xt, t, cond, traj.guidance)
        ref_lp = sampler.log_prob(ref_pred, t, xt, x_prev)  # (2B,)
    pred = guided_prediction(policy, xt, t, cond, traj.guidance)
    kl = None
    if with_kl:
        (mean, std), (ref_mean, _) = sampler.mean_std(pred, t, xt), sampler.mean_std(ref_pred, t, xt)
        kl = step_kl(mean, ref_mean, std)  # (2B,)
    return sampler.log_prob(pred, t, xt, x_prev), ref_lp, kl  # (2B,), (2B,), (2B,) | None


class TrajectorySteps(Source):
    name = "trajectory"
    inputs_type = StepLogProbs
    stepwise = True
    rules = PAIR_RULES

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.sampling.eta <= 0:
            raise DiffalignError("sampling.eta must be > 0 for d3po (per-step log-probs need a stochastic step)")

    def rows(self, by_group, cfg, labels, r, pool_index):
        return pair_rows(by_group, cfg, labels, r, pool_index)

    def inputs(self, ctx: StepContext, batch: dict, device) -> StepLogProbs:
        rnd: Round = batch["round"]
        rows = batch["rows"]
        idx = torch.cat([rnd.first[rows], rnd.second[rows]])  # (2B,) stacked [w; l]
        lp, ref_lp, kl = d3po_inputs(
            ctx.family, ctx.denoise, ctx.sampler, rnd.traj, rnd.text.guided(idx, rnd.traj.guidance), rnd.first[rows],
            rnd.second[rows], batch["k"], ctx.reference, with_kl=ctx.kl_weight > 0,
        )  # fmt: skip
        return StepLogProbs(lp, ref_lp, torch.ones(len(rows), device=device), kl=kl)
