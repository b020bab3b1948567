"""x_t by inversion: run the policy's deterministic DDIM sampler backwards from x0 instead of drawing forward noise.

InPO (Lu et al., CVPR 2025, arXiv 2503.18454) and SmPO (Lu et al., ICML 2025, arXiv 2506.02698) score an image at
the latent the *current policy* would have denoised into it, so the optimised latent is tied to x0:

    grid    = DDIMInverseScheduler.set_timesteps(num_steps).timesteps     e.g. [1, 101, ..., 901] (SD "leading")
    x       = x0;  for g in grid with g < t:  x = DDIM-inverse step at g  (policy, CFG 1, no grad)
    target  = tau = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)              noise back-solved with the *sampled* t

`ddim_inversion` (InPO) optionally adds eta * sigma_DDIM * N(0, I) after each step (official inversion_eta = 0.1).
`renoise_inversion` (SmPO, one ReNoise iteration) predicts eps at the current latent, takes a tentative step,
predicts again at the tentative latent (same g) and redoes the step with the average of the two predictions.

Quirk kept on purpose (docs/objectives.md §3.2): the latent ends at the largest grid value below t, yet the target
and the training forward use t itself, exactly as the official InPO/SmPO code. We reproduce it so results can be
compared with the papers; t <= first grid value means no step at all (x_t = x0). Other choices, all documented:
the step is diffusers' `DDIMInverseScheduler.step` (eps model at g on the latent at g - Δ, diffusers' convention);
v predictions are converted to eps with abar_g before stepping (so ReNoise averages noises, not velocities);
`set_alpha_to_one=False` and `clip_sample=False` as in the SD/SDXL scheduler folders the official code loads;
the eta noise uses sigma of the DDIM step just inverted (g - Δ <-> g; the official code takes the next one, g <->
g + Δ) and is drawn independently per sample like the official `randn_like`, from `generator` (or the global RNG).
Per-sample t: the grid is shared, so each step runs on the whole batch and samples whose t <= g keep their latent.
The `eps` argument of the source signature is unused: inversion is deterministic up to the eta noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from diffalign.likelihood import Denoise, Schedule, forward_noise

if TYPE_CHECKING:  # imported in inverse_scheduler: diffalign.config reads XT_SOURCES and must not load diffusers
    from diffusers import DDIMInverseScheduler


def inverse_scheduler(schedule: Schedule, num_steps: int) -> DDIMInverseScheduler:
    """diffusers' DDIM inverse scheduler on the schedule's own abar table, with `num_steps` grid steps."""
    if schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"inversion needs a DDPM-type schedule (epsilon or v_prediction), got '{schedule.prediction_type}'"
        )
    from diffusers import DDIMInverseScheduler

    inv = DDIMInverseScheduler.from_config(
        schedule.scheduler.config, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False
    )
    inv.alphas_cumprod = schedule.scheduler.alphas_cumprod  # one abar table (schedule.alpha_bar)
    inv.initial_alpha_cumprod = inv.alphas_cumprod[0]
    inv.set_timesteps(num_steps)
    return inv


def _eps(denoise: Denoise, schedule: Schedule, x: torch.Tensor, g: torch.Tensor, cond, dtype) -> torch.Tensor:
    """The network's prediction at (x, g) as noise, fp32: v -> eps = sqrt(abar_g) v + sqrt(1 - abar_g) x."""
    pred = denoise(x.to(dtype), g, cond).float()  # (N, C, h, w)
    if schedule.prediction_type == "epsilon":
        return pred
    ab = schedule.alpha_bar(g).float().view(-1, *[1] * (x.ndim - 1))  # (N,) -> (N, 1, 1, 1)
    return ab.sqrt() * pred + (1 - ab).sqrt() * x


@torch.no_grad()
def invert(
    denoise: Denoise,
    schedule: Schedule,
    x0: torch.Tensor,
    cond: dict,
    t: torch.Tensor,
    num_steps: int = 10,
    renoise: bool = False,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM-invert x0 (N, C, h, w) with `denoise` up to the grid steps below each t (N,) -> (x_t, target).

    x_t is returned in x0's dtype, the target (tau, or v for v-prediction models) in fp32.
    """
    inv = inverse_scheduler(schedule, num_steps)
    alphas = inv.alphas_cumprod
    step = schedule.num_train_timesteps // num_steps  # Δ, as DDIMInverseScheduler.step uses it
    x = x0.float()
    t_cpu = t.cpu()
    for g in inv.timesteps[inv.timesteps < t_cpu.max()].tolist():
        active = (t > g).view(-1, *[1] * (x.ndim - 1))  # (N,) -> (N, 1, 1, 1): samples whose t is above g
        g_n = torch.full_like(t, g)  # (N,)
        eps = _eps(denoise, schedule, x, g_n, cond, x0.dtype)
        nxt = inv.step(eps, g, x).prev_sample  # latent at level g - Δ -> level g
        if renoise:
            eps = 0.5 * (eps + _eps(denoise, schedule, nxt, g_n, cond, x0.dtype))
            nxt = inv.step(eps, g, x).prev_sample
        if eta:
            ab_g = alphas[g]
            ab_prev = alphas[g - step] if g - step >= 0 else inv.initial_alpha_cumprod
            sigma = ((1 - ab_prev) / (1 - ab_g) * (1 - ab_g / ab_prev)).sqrt()  # DDIM sigma of the step g -> g - Δ
            noise = eta_noise(x, generator)
            nxt = nxt + eta * float(sigma) * noise
        x = torch.where(active, nxt, x)
    ab_t = schedule.alpha_bar(t).float().view(-1, *[1] * (x.ndim - 1))  # (N,) -> (N, 1, 1, 1)
    tau = (x - ab_t.sqrt() * x0.float()) / (1 - ab_t).sqrt()
    return x.to(x0.dtype), schedule.target(x0.float(), tau, t)


def eta_noise(x: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) like x (N, C, h, w): from one generator, from a list of N (row i draws from generator[i], so a row's
    noise is keyed on the row, as the trainers' per-pair generators), or from the global RNG (None)."""
    if isinstance(generator, list):
        rows = [torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator]  # N x (C, h, w)
        return torch.stack(rows).to(x.device)
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device).to(x.device)


def ddim_inversion(denoise, schedule, x0, cond, t, eps, num_steps: int = 10, eta: float = 0.1, generator=None):
    """InPO's x_t source: DDIM inversion on a `num_steps` grid with eta * sigma extra noise per step (eps unused)."""
    return invert(denoise, schedule, x0, cond, t, num_steps, renoise=False, eta=eta, generator=generator)


def renoise_inversion(denoise, schedule, x0, cond, t, eps, num_steps: int = 10):
    """SmPO's x_t source: DDIM inversion with one ReNoise iteration per step (2 forwards per step; eps unused).

    SmPO uses num_steps 10 for SDXL and 5 for SD1.5 (`renoise_inversion_5` below).
    """
    return invert(denoise, schedule, x0, cond, t, num_steps, renoise=True)


def renoise_inversion_5(denoise, schedule, x0, cond, t, eps):
    """SmPO's SD1.5 setting: ReNoise inversion over 5 grid steps (half the forwards of the SDXL default's 10)."""
    return renoise_inversion(denoise, schedule, x0, cond, t, eps, num_steps=5)


# Every x_t source by name: `objective.xt_source` is a key (checked when the config loads).
XT_SOURCES: dict[str, Callable] = {
    "noise": forward_noise,
    "ddim_inversion": ddim_inversion,
    "renoise_inversion": renoise_inversion,
    "renoise_inversion_5": renoise_inversion_5,
}
