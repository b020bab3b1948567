"""DRAGON with Diffusion-DPO: the round's pairs by pairing.split (or a human label file), the generated x0 treated as
offline data: forward noise shared within a pair, keyed on (seed, round, optimizer step, row)."""

from __future__ import annotations

import torch

from diffalign.engine.step import StepContext, keyed_t_and_eps
from diffalign.likelihood import denoising_errors
from diffalign.online.pairing import PAIR_RULES, pairs_from_labels
from diffalign.sources.base import ErrorInputs, Round, Source


def pair_rows(by_group: torch.Tensor, cfg, labels, r: int, pool_index) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (idx_w, idx_l) by the split rule, or from the human label file (round numbers as in the grids)."""
    if labels is not None:
        return pairs_from_labels(labels, r + 1, cfg.sampling.images_per_prompt)
    return PAIR_RULES[cfg.pairing.split](by_group, cfg.pairing.min_gap)


class RoundPairs(Source):
    name = "round_pairs"
    rules = PAIR_RULES

    def rows(self, by_group, cfg, labels, r, pool_index):
        return pair_rows(by_group, cfg, labels, r, pool_index)

    def inputs(self, ctx: StepContext, batch: dict, device) -> ErrorInputs:
        rnd: Round = batch["round"]
        rows = batch["rows"]
        idx = torch.cat([rnd.first[rows], rnd.second[rows]])  # (2B,) stacked [w; l]
        x0 = rnd.traj.x0[idx].to(device)  # (2B, C, h, w)
        cond = rnd.text.rows(idx)  # encoded once per round
        keys = [(rnd.index, batch["step"], r) for r in rows.tolist()]
        t, eps, _ = keyed_t_and_eps(True, x0, ctx.schedule, ctx.seed, keys, ctx.estimator)
        e = denoising_errors(ctx.denoise, ctx.schedule, x0, cond, t, eps, ctx.reference, with_kl=ctx.kl_weight > 0)
        return ErrorInputs(e.err, e.ref_err, torch.ones(len(rows), device=device), kl=e.kl)
