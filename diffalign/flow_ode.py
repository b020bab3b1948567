"""A deterministic Euler ODE sampler for flow-matching families (x_t = (1 - sigma) x0 + sigma eps, velocity eps - x0).

    x_{k+1} = x_k + (sigma_{k+1} - sigma_k) * v(x_k, t_k),    sigma_0 = 1 (pure noise) ... sigma_S = 0 (clean)

The steps run on the family's own *training* sigma table (`Schedule.sigma`, shift included): t_k are S integer
timesteps evenly spaced from T - 1 down ("trailing", so the first step starts at sigma = 1), and every network call
goes through `family.denoise(xt, t, cond)` with that integer t, exactly as training feeds it. With shift 1 this is
diffusers' FlowMatchEulerDiscreteScheduler Euler loop on a grid that differs from its linspace by at most 1/T.

It is what DiffusionNFT needs (clean samples from a black-box deterministic solver) and what the toy flow model
samples with; a stochastic flow sampler with per-step log-probs (Flow-GRPO) replaces it where one is needed.
"""

from __future__ import annotations

import torch

from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule
from diffalign.sampling import Trajectory, encode_guided, guided_prediction, initial_noise


def flow_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """S integer timesteps, T - 1 first, evenly spaced ("trailing"): e.g. T = 1000, S = 4 -> [999, 749, 499, 249]."""
    return (num_train_timesteps - torch.arange(steps) * (num_train_timesteps / steps)).round().long() - 1


@torch.no_grad()
def sample_flow_trajectories(
    family,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 1.0,
    eta: float = 0.0,
    noise_seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    scheduler=None,
    keep_trajectory: bool = True,
    keep_predictions: bool = False,
) -> Trajectory:
    """Euler ODE chains for N prompts, same signature and Trajectory as `diffalign.sampling.sample_trajectories`.

    eta must be 0 (the ODE has no per-step density); `noise_seed` and `scheduler` are accepted for that signature
    and unused. latents[k] is the input of step k; latents[-1] = x0.
    """
    if eta != 0:
        raise DiffalignError(
            f"{family.name}: the flow ODE sampler is deterministic; online.eta must be 0, not {eta:g} "
            "(a stochastic flow sampler with log-probs is needed for per-step methods)"
        )
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds")
    schedule = Schedule(family.scheduler, "flow")
    device = family.denoiser.device
    h = (height or family.resolution) // family.vae_scale_factor
    w = (width or family.resolution) // family.vae_scale_factor
    cond = encode_guided(family, prompts, guidance)
    ts = flow_timesteps(schedule.num_train_timesteps, steps).to(device)  # (S,)
    sigmas = torch.cat([schedule.sigma(ts), torch.zeros(1, device=device)])  # (S + 1,), ends at 0
    x = initial_noise(seeds, (family.latent_channels, h, w)).to(device) * sigmas[0]  # (N, C, h, w)
    latents, preds = [x.cpu()], []
    for k, t in enumerate(ts):
        v = guided_prediction(family, x, t, cond, guidance)  # (N, C, h, w) velocity
        x = x + (sigmas[k + 1] - sigmas[k]) * v
        if keep_trajectory:
            latents.append(x.cpu())
            if keep_predictions:
                preds.append(v.cpu())
    if not keep_trajectory:
        latents = [x.cpu()]
    return Trajectory(
        latents=torch.stack(latents).float(),  # (S+1, N, C, h, w)
        timesteps=ts.cpu(),
        log_probs=None,
        eta=0.0,
        guidance=guidance,
        predictions=torch.stack(preds) if preds else None,
    )


def sample_flow(family, prompts, seeds, steps: int = 20, guidance: float = 1.0, height=None, width=None):
    """x0 (N, C, h, w) fp32 on the model's device by the Euler ODE."""
    traj = sample_flow_trajectories(
        family, prompts, seeds, steps, guidance, height=height, width=width, keep_trajectory=False
    )
    return traj.x0.to(family.denoiser.device)
