"""The inputs of the on-line objectives that do not come from the shared estimator, as functions of tensors.

Each function gathers its tensors from a round (a diffalign.sampling.Trajectory on CPU plus prompts), runs the
policy through `denoise` (the caller's DDP-aware `family.denoise`) and the reference under no_grad inside
`reference()`, and returns what the objective takes in place of `(err, ref_err)`. The maths stays in
diffalign.likelihood, diffalign.sampling and the objectives; the programs' registry of sources
(diffalign/engine/sources.py) calls these:

- D3PO (`d3po_inputs`): stored step k of both chains of each pair; log-probs recomputed with CFG by the same
  step density the sampler used (`sampler.log_prob`: DDIM-eta or flow SDE).
- GRPO (`grpo_inputs`): stored step k of single chains; the policy's step mean and log-prob, the sampling-time
  log-prob, and the reference's step mean and the sampler's `kl_std` for the closed-form KL.
- Diffusion-DRO (`dro_inputs`): stacked [expert; policy]; experts forward-noised at the policy sample's t, policy
  half at a stored trajectory step with the snapshot's own prediction as target (Wu et al. 2025, Alg. 1).
DRAGON's surrogates need nothing of their own: the generated x0 go through diffalign.likelihood.denoising_errors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from diffalign.likelihood import Schedule, gaussian_log_prob, per_sample_error, prediction_kl, step_kl
from diffalign.sampling import Trajectory, encode_guided, guided_prediction

Reference = Callable[[], AbstractContextManager]
Denoise = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


class Through:
    """`family` whose `denoise` is another function (the DDP-wrapped policy); every other attribute is the family's."""

    def __init__(self, family, denoise: Denoise):
        self._family, self.denoise = family, denoise

    def __getattr__(self, name):
        return getattr(self._family, name)


def d3po_inputs(
    family,
    denoise: Denoise,
    sampler,
    traj: Trajectory,
    prompts: list[str],
    idx_w: torch.Tensor,
    idx_l: torch.Tensor,
    k: int,
    reference: Reference,
    with_kl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step log-probs (2B,) with grad and reference (2B,) without, at trajectory step k for pairs (idx_w, idx_l),
    and with `with_kl` the step KL of the policy to the reference (2B,) with grad (else None).

    `sampler` is the one the round was sampled with (diffalign.sampling: DDIM-eta or flow SDE); its `log_prob` is
    the step density the sampler drew from, its `mean_std` that density's mean and std.
    """
    device = family.denoiser.device
    idx = torch.cat([idx_w, idx_l])  # (2B,) stacked [w; l]
    xt = traj.latents[k][idx].to(device)  # (2B, C, h, w)
    x_prev = traj.latents[k + 1][idx].to(device)
    t = traj.timesteps[k]
    cond = encode_guided(family, [prompts[i] for i in idx.tolist()], traj.guidance)
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


def dro_inputs(
    family,
    denoise: Denoise,
    schedule: Schedule,
    expert_x0: torch.Tensor,
    eps: torch.Tensor,
    traj: Trajectory,
    prompts: list[str],
    idx_p: torch.Tensor,
    k: int,
    reference: Reference,
    with_kl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Errors (2B,) with grad and reference errors (2B,) of [experts expert_x0 (B, C, h, w) noised with eps (B, ...);
    policy chains idx_p (B,) at stored step k], and with `with_kl` the prediction_kl (2B,) to the reference at the
    same x_t (else None). The policy chains were prompted by their experts' captions, so `prompts[idx_p]` conditions
    both halves."""
    if traj.predictions is None:
        raise ValueError("dro_inputs: the trajectory has no stored predictions (sample with keep_predictions=True)")
    device = family.denoiser.device
    b = len(idx_p)
    t = traj.timesteps[k].expand(2 * b).to(device)  # (2B,) the expert is noised to the policy sample's t
    x0_e, eps = expert_x0.to(device), eps.to(device)  # (B, C, h, w)
    xt = torch.cat([schedule.add_noise(x0_e, eps, t[:b]), traj.latents[k][idx_p].to(device)])  # (2B, C, h, w)
    target = torch.cat([schedule.target(x0_e, eps, t[:b]), traj.predictions[k][idx_p].to(device)])
    captions = [prompts[i] for i in idx_p.tolist()]
    cond = family.encode_prompts(captions + captions)  # (2B, ...): expert i and its negative share a caption
    with torch.no_grad(), reference():
        ref_pred = denoise(xt, t, cond)
    pred = denoise(xt, t, cond)
    kl = prediction_kl(pred, ref_pred) if with_kl else None
    return per_sample_error(pred, target), per_sample_error(ref_pred, target), kl  # (2B,), (2B,), (2B,) | None


def grpo_inputs(family, denoise: Denoise, sampler, traj: Trajectory, prompts: list[str], idx: torch.Tensor, k: int,
                reference: Reference | None):  # fmt: skip
    """GRPO at stored step k of chains idx (B,): log_prob (B,) with grad, old_log_prob (B,) stored by the sampler,
    the policy's step mean (B, C, h, w) with grad, the reference's (None without `reference`) and the s the KL
    divides by, `sampler.kl_std(t)`: on the flow sampler the noise scale s_sigma without the step's sqrt(-dt), as
    Flow-GRPO's train_sd3.py (so objective.beta means theirs); on DDIM-eta the step std (the exact KL).

    `sampler` is the one the round was sampled with (diffalign.sampling); its `mean_std` is the step it drew from.
    """
    if traj.log_probs is None:
        raise ValueError("grpo_inputs: the trajectory has no log-probs (sample with eta / noise level > 0)")
    device = family.denoiser.device
    xt, x_next = traj.latents[k][idx].to(device), traj.latents[k + 1][idx].to(device)  # (B, C, h, w)
    t = traj.timesteps[k]
    cond = encode_guided(family, [prompts[i] for i in idx.tolist()], traj.guidance)
    policy = Through(family, denoise)
    ref_mean = None
    if reference is not None:
        with torch.no_grad(), reference():
            ref_mean, _ = sampler.mean_std(guided_prediction(policy, xt, t, cond, traj.guidance), t, xt)
    mean, std = sampler.mean_std(guided_prediction(policy, xt, t, cond, traj.guidance), t, xt)
    kl_std = sampler.kl_std(t).to(device)  # not `std`: flow's step std has a sqrt(-dt) the official KL drops
    return gaussian_log_prob(x_next, mean, std), traj.log_probs[k][idx].to(device), mean, ref_mean, kl_std
