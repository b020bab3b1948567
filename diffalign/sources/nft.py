"""DiffusionNFT: the clean samples of the "old" policy (an EMA adapter that samples the rounds), each forward-noised
with its own keyed t (from the training schedule, or from the sampler's grid: objective.timesteps) and eps; the trained (with grad), old and reference (objective.kl_weight > 0) predictions at that
x_t, the family's target and x0 slope, and each sample's group-relative advantage."""

from __future__ import annotations

import math

import torch

from diffalign.engine.step import StepContext
from diffalign.lora import adapter_mode
from diffalign.objectives.nft import x0_scale
from diffalign.online.advantages import group_advantages
from diffalign.online.old_policy import OLD_ADAPTER
from diffalign.sources.base import Predictions, Round, Source, check_groups, keyed_draws, keyed_grid_draws


class NFT(Source):
    name = "nft"
    inputs_type = Predictions
    old_policy = True

    def check(self, cfg) -> None:
        check_groups(cfg, self.name, "advantages are relative to the group")

    def rows(self, by_group, cfg, labels, r, pool_index):
        """Every sample, with its group-relative advantage (per-prompt mean, global std; the objective clips it)."""
        advantages = group_advantages(by_group, global_std=True, clip=math.inf).flatten()  # (P, G) -> (N,)
        return torch.arange(advantages.numel()), advantages

    def inputs(self, ctx: StepContext, batch: dict, device) -> Predictions:
        rnd: Round = batch["round"]
        rows = batch["rows"]
        idx = rnd.first[rows]  # (N,)
        x0 = rnd.traj.x0[idx].to(device)  # (N, C, h, w)
        cond = rnd.text.rows(idx)  # encoded once per round
        if ctx.objective.timesteps == "sampler":  # the official code's: the round's own sampling grid
            t, eps = keyed_grid_draws(ctx, x0, rnd, batch["step"], rows, rnd.grid)  # (N,), (N, C, h, w)
        else:
            t, eps = keyed_draws(ctx, x0, rnd, batch["step"], rows)  # (N,), (N, C, h, w)
        xt, target = ctx.schedule.add_noise(x0, eps, t), ctx.schedule.target(x0, eps, t)
        with torch.no_grad(), adapter_mode(ctx.family.denoiser, OLD_ADAPTER):
            old_pred = ctx.denoise(xt, t, cond)
        ref_pred = None
        if ctx.objective.kl_weight > 0:
            with torch.no_grad(), ctx.reference():
                ref_pred = ctx.denoise(xt, t, cond)
        pred = ctx.denoise(xt, t, cond)
        advantages = rnd.second[rows].to(device)  # (N,)
        return Predictions(pred, old_pred, ref_pred, target, x0_scale(ctx.schedule, t), advantages)
