"""One training loss per on-line method, on a batch drawn from a round's samples.

Each function gathers its inputs from the round (a diffalign.sampling.Trajectory on CPU plus prompts), runs the
policy (and the reference, under no_grad inside `reference()`) and calls the objective with the usual
`(err-or-logp, ref, label)` convention. The maths stays in diffalign.likelihood, diffalign.sampling and the
objectives; these are only the wiring for the three kinds of on-line batch:

- D3PO (`d3po_loss`): stored step k of both chains of each pair; log-probs recomputed with CFG by the same
  `step_log_prob` the sampler used.
- DRAGON (`surrogate_loss`): the generated x0 treated as offline data: forward noise at t (shared t and eps within
  a pair for Diffusion-DPO, independent for Diffusion-KTO), the shared estimator, the surrogate objective.
- Diffusion-DRO (`dro_loss`): stacked [expert; policy]; experts forward-noised at the policy sample's t, policy
  half at a stored trajectory step with the snapshot's own prediction as target (docs/objectives.md §6.1–6.2).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from diffalign.likelihood import (
    Schedule,
    denoising_errors,
    pair_noise,
    pair_timesteps,
    per_sample_error,
    sample_timesteps,
)
from diffalign.sampling import Trajectory, encode_guided, guided_prediction, step_log_prob

Reference = Callable[[], AbstractContextManager]


def d3po_loss(
    family,
    objective,
    scheduler,
    traj: Trajectory,
    prompts: list[str],
    idx_w: torch.Tensor,
    idx_l: torch.Tensor,
    k: int,
    reference: Reference,
) -> tuple[torch.Tensor, dict]:
    """D3PO loss (B,) at trajectory step k for pairs (idx_w, idx_l) (B,) each; `scheduler` has its timesteps set."""
    device = family.denoiser.device
    idx = torch.cat([idx_w, idx_l])  # (2B,) stacked [w; l]
    xt = traj.latents[k][idx].to(device)  # (2B, C, h, w)
    x_prev = traj.latents[k + 1][idx].to(device)
    t = traj.timesteps[k]
    cond = encode_guided(family, [prompts[i] for i in idx.tolist()], traj.guidance)
    with torch.no_grad(), reference():
        pred = guided_prediction(family, xt, t, cond, traj.guidance)
        ref_lp = step_log_prob(scheduler, pred, t, xt, x_prev, traj.eta)  # (2B,)
    pred = guided_prediction(family, xt, t, cond, traj.guidance)
    lp = step_log_prob(scheduler, pred, t, xt, x_prev, traj.eta)  # (2B,)
    return objective(lp, ref_lp, torch.ones(len(idx_w), device=device))


def surrogate_loss(
    family,
    objective,
    schedule: Schedule,
    x0_all: torch.Tensor,
    prompts: list[str],
    idx: torch.Tensor,
    desirable: torch.Tensor | None,
    generator: torch.Generator,
    reference: Reference,
    timestep_kwargs: dict,
) -> tuple[torch.Tensor, dict]:
    """DRAGON's surrogate on generated x0: paired (idx = [w; l] (2B,), desirable None) or unpaired (idx, desirable (M,)).

    timestep_kwargs: distribution / t_min / t_max of diffalign.likelihood.sample_timesteps.
    """
    device = family.denoiser.device
    x0 = x0_all[idx].to(device)  # (2B or M, C, h, w)
    cond = family.encode_prompts([prompts[i] for i in idx.tolist()])
    n, num_t = x0.shape[0], schedule.num_train_timesteps
    if desirable is None:  # pairs share t and eps
        t, eps = pair_timesteps(n // 2, num_t, generator, **timestep_kwargs), pair_noise(x0, generator)
    else:
        t = sample_timesteps(n, num_t, generator, **timestep_kwargs)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
    errors = denoising_errors(family.denoise, schedule, x0, cond, t.to(device), eps, reference)
    if desirable is None:
        return objective(errors.err, errors.ref_err, torch.ones(n // 2, device=device))
    return objective(errors.err, errors.ref_err, None, desirable=desirable.to(device))


def dro_loss(
    family,
    objective,
    schedule: Schedule,
    expert_x0: torch.Tensor,
    expert_prompts: list[str],
    idx_e: torch.Tensor,
    traj: Trajectory,
    prompts: list[str],
    idx_p: torch.Tensor,
    k: int,
    generator: torch.Generator,
    reference: Reference,
) -> tuple[torch.Tensor, dict]:
    """Diffusion-DRO hinge (B,) on [expert idx_e (B,); policy chains idx_p (B,) at stored step k]."""
    if traj.predictions is None:
        raise ValueError("dro_loss: the trajectory has no stored predictions (sample with keep_predictions=True)")
    device = family.denoiser.device
    b = len(idx_p)
    t = traj.timesteps[k].expand(2 * b).to(device)  # (2B,) the expert is noised to the policy sample's t
    x0_e = expert_x0[idx_e].to(device)  # (B, C, h, w)
    eps = torch.randn(x0_e.shape, generator=generator).to(x0_e)
    xt = torch.cat([schedule.add_noise(x0_e, eps, t[:b]), traj.latents[k][idx_p].to(device)])  # (2B, C, h, w)
    target = torch.cat([schedule.target(x0_e, eps, t[:b]), traj.predictions[k][idx_p].to(device)])
    cond = family.encode_prompts([expert_prompts[i] for i in idx_e.tolist()] + [prompts[i] for i in idx_p.tolist()])
    with torch.no_grad(), reference():
        ref_err = per_sample_error(family.denoise(xt, t, cond), target)  # (2B,)
    err = per_sample_error(family.denoise(xt, t, cond), target)
    return objective(err, ref_err, None)
