"""GRPO (Flow-GRPO / DDPO): single chains at a stored step k; the policy's step log-prob and mean, the sampler's
stored log-prob, the reference's step mean and the s the KL divides by; group advantages from the round's rewards
(the objective's rule), chains with A = 0 dropped by default as Flow-GRPO's mask."""

from __future__ import annotations

import math

import torch

from diffalign.engine.step import StepContext
from diffalign.errors import DiffalignError
from diffalign.online.advantages import group_advantages
from diffalign.sampling import Trajectory, guided_prediction
from diffalign.sources.base import Denoise, PolicySteps, Reference, Round, Source, Through


def grpo_inputs(family, denoise: Denoise, sampler, traj: Trajectory, cond: dict, idx: torch.Tensor, k: int,
                reference: Reference | None):  # fmt: skip
    """GRPO at stored step k of chains idx (B,): log_prob (B,) with grad, old_log_prob (B,) stored by the sampler,
    the policy's step mean (B, C, h, w) with grad, the reference's (None without `reference`) and the s the KL
    divides by, `sampler.kl_std(t)`: on the flow sampler the noise scale s_sigma without the step's sqrt(-dt), as
    Flow-GRPO's train_sd3.py (so objective.beta means theirs); on DDIM-eta the step std (the exact KL).

    `sampler` is the one the round was sampled with (diffalign.sampling); its `mean_std` is the step it drew from.
    """
    if traj.log_probs is None:
        raise ValueError("grpo_inputs: the trajectory has no log-probs (sample with eta / noise level > 0)")
    device = family.device
    xt, x_next = traj.latents[k][idx].to(device), traj.latents[k + 1][idx].to(device)  # (B, C, h, w)
    t = traj.timesteps[k]
    policy = Through(family, denoise)
    ref_mean = None
    if reference is not None:
        with torch.no_grad(), reference():
            ref_mean, _ = sampler.mean_std(guided_prediction(policy, xt, t, cond, traj.guidance), t, xt)
    mean, std = sampler.mean_std(guided_prediction(policy, xt, t, cond, traj.guidance), t, xt)
    kl_std = sampler.kl_std(t).to(device)  # not `std`: flow's step std has a sqrt(-dt) the official KL drops
    return sampler.density(x_next, mean, std), traj.log_probs[k][idx].to(device), mean, ref_mean, kl_std


class PolicyStepsSource(Source):
    name = "policy_steps"
    inputs_type = PolicySteps
    stepwise = True

    def check(self, cfg) -> None:
        if cfg.sampling.eta <= 0:
            raise DiffalignError(
                f"sampling.eta must be > 0 for {cfg.objective.name} (its ratio needs step log-probs: DDIM eta or "
                "the flow noise level)"
            )

    def rows(self, by_group, cfg, labels, r, pool_index):
        """Every chain is a row, or with pairing.drop_zero_advantages (Flow-GRPO's mask) every chain whose group
        advantage is not 0 (that needs no std or clip: A = 0 exactly where r = its group's mean); the round's rewards
        (P, G) go along for the objective's group advantages."""
        rows = torch.arange(by_group.numel())
        if cfg.pairing.drop_zero_advantages:
            rows = rows[group_advantages(by_group, clip=math.inf).flatten() != 0]  # (P, G) -> (N,) -> (R,)
        return rows, by_group

    def inputs(self, ctx: StepContext, batch: dict, device) -> PolicySteps:
        rnd: Round = batch["round"]
        rows = batch["rows"]
        idx = rnd.first[rows]  # (B,) chain indices
        advantages = ctx.objective.advantages(rnd.second).flatten()[idx].to(device)  # (P, G) -> (N,) -> (B,)
        reference = ctx.reference if ctx.objective.beta > 0 else None  # beta 0: no reference forward
        lp, old_lp, mean, ref_mean, kl_std = grpo_inputs(
            ctx.family,
            ctx.denoise,
            ctx.sampler,
            rnd.traj,
            rnd.text.guided(idx, rnd.traj.guidance),
            idx,
            batch["k"],
            reference,
        )
        return PolicySteps(lp, old_lp, advantages, mean, ref_mean, kl_std)
