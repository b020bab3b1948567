"""GRPO's policy steps plus the sampling (old) policy's step Gaussian at the same x_t: its mean and std, which
GRPO-Guard's ratio normalisation and Flow-DPPO's exact KL read. The sampler keeps its (guided) prediction of every
recorded step (`keep_predictions`), and the old mean is the sampler's own step kernel applied to it, the same maths
the sampling loop ran, so no second network pass: Flow-GRPO's GRPO-Guard script stores `prev_sample_mean` at
sampling time (train_sd3_GRPO_Guard.py), UniRL's FlowDPPO replays it at the pre-update weights (`prepare_segment`)."""

from __future__ import annotations

import torch

from diffalign.engine.step import StepContext
from diffalign.sampling import Trajectory
from diffalign.sources.base import OldPolicySteps, Round
from diffalign.sources.policy_steps import PolicyStepsSource


def old_step(sampler, traj: Trajectory, idx: torch.Tensor, k: int, device):
    """The sampling policy's step at stored step k of chains idx (B,): mean (B, C, h, w) and std (the sampler's
    `mean_std` on its stored prediction; flow: std = s_sigma sqrt(-dt), a scalar)."""
    if traj.predictions is None:
        raise ValueError("old_step: the trajectory has no stored predictions (sample with keep_predictions=True)")
    xt = traj.latents[k][idx].to(device)  # (B, C, h, w)
    return sampler.mean_std(traj.predictions[k][idx].to(device), traj.timesteps[k], xt)


class OldPolicyStepsSource(PolicyStepsSource):
    name = "old_policy_steps"
    inputs_type = OldPolicySteps
    keep_predictions = True  # the old step means come from the sampler's stored predictions

    def inputs(self, ctx: StepContext, batch: dict, device) -> OldPolicySteps:
        steps = super().inputs(ctx, batch, device)
        rnd: Round = batch["round"]
        old_mean, std = old_step(ctx.sampler, rnd.traj, rnd.first[batch["rows"]], batch["k"], device)
        return OldPolicySteps(**vars(steps), old_mean=old_mean, std=std)  # PolicySteps' fields, then the old step's
