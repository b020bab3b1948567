"""DRAGON with Diffusion-KTO: desirable / undesirable samples of the round (pairing.split top_bottom), each with its
own keyed t and eps."""

from __future__ import annotations

from diffalign.engine.step import StepContext
from diffalign.likelihood import denoising_errors
from diffalign.online.pairing import SPLIT_RULES
from diffalign.sources.base import ErrorInputs, Round, Source, batch_baseline, keyed_draws


class RoundSets(Source):
    name = "round_sets"
    rules = SPLIT_RULES

    def rows(self, by_group, cfg, labels, r, pool_index):
        """Desirable / undesirable samples (idx, desirable) by the split rule."""
        return SPLIT_RULES[cfg.pairing.split](by_group, cfg.pairing.fraction)

    def inputs(self, ctx: StepContext, batch: dict, device) -> ErrorInputs:
        rnd: Round = batch["round"]
        rows = batch["rows"]
        idx = rnd.first[rows]  # (M,)
        x0 = rnd.traj.x0[idx].to(device)  # (M, C, h, w)
        cond = rnd.text.rows(idx)  # encoded once per round
        t, eps = keyed_draws(ctx, x0, rnd, batch["step"], rows)  # (M,), (M, C, h, w)
        e = denoising_errors(ctx.denoise, ctx.schedule, x0, cond, t, eps, ctx.reference, with_kl=ctx.kl_weight > 0)
        desirable = rnd.second[rows].to(device)
        return ErrorInputs(e.err, e.ref_err, desirable=desirable, z=batch_baseline(ctx, e.err, e.ref_err), kl=e.kl)
