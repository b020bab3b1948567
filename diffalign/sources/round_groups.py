"""DGPO: whole groups of a round's clean samples (a row is a prompt's group of G), each group forward-noised with one
keyed t and eps shared by its G samples (the official use_shared_noise), policy and reference errors, and the
objective's group-relative advantages of the round's rewards. Not `nft` (no group index, an old-policy adapter) nor
`round_sets` (no advantages): the group-level preference needs every sample of a group in one micro-batch."""

from __future__ import annotations

import torch

from diffalign.engine.step import StepContext, draw_t_and_eps, pair_generator
from diffalign.likelihood import denoising_errors
from diffalign.sources.base import GroupErrors, Round, Source, check_groups


class RoundGroups(Source):
    name = "round_groups"
    inputs_type = GroupErrors

    def check(self, cfg) -> None:
        check_groups(cfg, cfg.objective.name, "its preference is within a group")

    def rows(self, by_group, cfg, labels, r, pool_index):
        """Every prompt's group is a row; the round's rewards (P, G) go along for the objective's advantages."""
        return torch.arange(by_group.shape[0]), by_group

    def inputs(self, ctx: StepContext, batch: dict, device) -> GroupErrors:
        rnd: Round = batch["round"]
        rows = batch["rows"]  # (B,) groups
        g = rnd.second.shape[1]
        idx = (rnd.first[rows][:, None] * g + torch.arange(g)).flatten()  # (B, G) -> (B·G,) sample indices
        x0 = rnd.traj.x0[idx].to(device)  # (B·G, C, h, w)
        cond = rnd.text.rows(idx)  # encoded once per round
        draws = [
            draw_t_and_eps(
                False,
                x0[i * g : i * g + 1],
                ctx.schedule,
                pair_generator(ctx.seed, rnd.index, batch["step"], r),
                ctx.estimator,
            )  # fmt: skip
            for i, r in enumerate(rows.tolist())
        ]  # B x ((1,), (1, C, h, w)): one t and eps per group
        t = torch.cat([d[0] for d in draws]).repeat_interleave(g)  # (B,) -> (B·G,)
        eps = torch.cat([d[1] for d in draws]).repeat_interleave(g, 0)  # (B, C, h, w) -> (B·G, C, h, w)
        e = denoising_errors(ctx.denoise, ctx.schedule, x0, cond, t, eps, ctx.reference, with_kl=ctx.kl_weight > 0)
        advantages = ctx.objective.advantages(rnd.second)[rnd.first[rows]].to(device)  # (P, G) -> (B, G)
        return GroupErrors(e.err, e.ref_err, advantages, kl=e.kl)
