"""The explicit denoising loop: x_T ~ N(0, I) per seed -> x0, with classifier-free guidance, for any family.

Written out (instead of calling a diffusers pipeline) so on-line methods can keep the trajectory and the per-step
log-probs. It only touches the family interface: `encode_prompts`, `denoise`, `scheduler`, `latent_channels`,
`vae_scale_factor`, `resolution`, `denoiser` (for device and dtype). It returns the model's x0 space (latents, or
pixels for the toy family); `family.decode` turns that into images.

The DDIM maths is diffusers' `DDIMScheduler.step(..., eta)`; this file adds only what a policy-gradient method
needs on top (D3PO, SPO; DDPO's `ddim_step_with_logprob` does the same):

    x_{t-1} ~ N(mean, std² I),   mean = step(pred, t, x_t, eta, variance_noise=0),   std = eta · sqrt(var(t, t_prev))
    log p(x_{t-1} | x_t, c) = gaussian_log_prob(x_{t-1}, mean, std)      (diffalign.likelihood: mean over dims)

`step_log_prob` is that one function; the sampler calls it on the guided prediction it just used, and training
calls it again on stored (x_t, x_{t-1}, t) with the policy's (or the reference's) guided prediction, so sampling
and training cannot disagree on the maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from diffalign.likelihood import gaussian_log_prob
from diffalign.sampling.common import (
    Trajectory,
    encode_guided,
    guided_prediction,
    initial_noise,
    resolve_window,
)

if TYPE_CHECKING:  # imported in inference_scheduler: diffalign.config reads SAMPLERS and must not load diffusers
    from diffusers import DDIMScheduler


def inference_scheduler(family, eta: float = 0.0) -> DDIMScheduler:
    """DDIM built from the family's training scheduler config (same betas and prediction type).

    With eta > 0 every step must be stochastic, or its log-prob is undefined (std 0): the last step must not land
    on its own noise level. So `set_alpha_to_one` is False (the last step goes to abar_0, not 1) and, with "leading"
    spacing, `steps_offset` is at least 1 (the last t is 1, not 0), which is SD1.5's own DDIM config.
    """
    extra = {}
    if eta > 0:
        extra["set_alpha_to_one"] = False
        if family.scheduler.config.timestep_spacing == "leading":
            extra["steps_offset"] = max(1, family.scheduler.config.steps_offset)
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(family.scheduler.config, **extra)


def step_mean_std(scheduler: DDIMScheduler, pred: torch.Tensor, t, xt: torch.Tensor, eta: float):
    """Mean (N, C, h, w) and std (scalar tensor) of the DDIM-eta transition p(x_{t-1} | x_t).

    The mean is diffusers' own step with zero variance noise; the std is the one that step adds.
    `scheduler.set_timesteps` must have been called (the step reads num_inference_steps).
    """
    mean = scheduler.step(pred, int(t), xt, eta=eta, variance_noise=torch.zeros_like(xt)).prev_sample
    return mean, step_std(scheduler, t, eta).to(xt.device)


def step_std(scheduler: DDIMScheduler, t, eta: float) -> torch.Tensor:
    """The std eta sqrt(var(t, t_prev)) (fp32 scalar tensor) that DDIMScheduler.step adds at timestep t."""
    t = int(t)  # the scheduler indexes its CPU alphas_cumprod with it
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # as DDIMScheduler.step
    return torch.as_tensor(eta * scheduler._get_variance(t, prev_t) ** 0.5, dtype=torch.float32)


def step_log_prob(scheduler: DDIMScheduler, pred, t, xt, x_prev, eta: float) -> torch.Tensor:
    """log p(x_prev | x_t) under the DDIM-eta step with model prediction `pred`: (N, C, h, w) x 3 -> (N,).

    Mean over latent dims (diffalign.likelihood.gaussian_log_prob). Needs eta > 0 (eta 0 is deterministic).
    """
    if eta <= 0:
        raise ValueError("step_log_prob: eta must be > 0 (a DDIM step with eta 0 has no density)")
    mean, std = step_mean_std(scheduler, pred, t, xt, eta)
    if std <= 0:
        raise ValueError(f"step_log_prob: the step at t={int(t)} is deterministic (std 0); see inference_scheduler")
    return gaussian_log_prob(x_prev, mean, std)


@torch.no_grad()
def sample_trajectories(
    family,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 4.0,
    eta: float = 1.0,
    noise_seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    scheduler=None,
    keep_trajectory: bool = True,
    keep_predictions: bool = False,
    window: tuple[int, int] | None = None,
    cond: dict[str, torch.Tensor] | None = None,
) -> Trajectory:
    """Sample N chains; keep every latent and the per-step log-probs (eta > 0), or only those of a window.

    Args:
        family: a model family (diffalign.models).
        prompts: N prompts.
        seeds: N seeds for x_T (repeat a seed to start several images from the same noise).
        steps: denoising steps.
        guidance: CFG scale w (w <= 1: no unconditional branch).
        eta: DDIM eta; > 0 makes every step of the window stochastic, with noise from one CPU generator seeded by
            `noise_seed` (so images sharing x_T still differ).
        height, width: output pixels (default: the family's resolution).
        scheduler: a DDIM scheduler (default `inference_scheduler(family, eta)`); its `set_timesteps` is called here.
        keep_trajectory: False keeps only x0 (latents has one entry, no log-probs): plain sampling.
        keep_predictions: also keep the model prediction of every step (Diffusion-DRO's snapshot targets).
        window: [start, end) of the steps that get eta's noise and are recorded (end <= 0 counts from the last
            step); the others are DDIM eta 0 steps, not recorded, and `final` holds x0. None: every step.
        cond: the prompts' guided conditioning, already encoded (an on-line round's `EncodedPrompts.guided`);
            None encodes them here (`encode_guided`).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds")
    scheduler = scheduler or inference_scheduler(family, eta)
    device = family.device
    cond = encode_guided(family, prompts, guidance) if cond is None else cond
    scheduler.set_timesteps(steps, device=device)
    x = initial_noise(seeds, family.latent_shape(height, width)).to(device)  # (N, C, h, w)
    x = x * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(int(noise_seed))
    start, end = (0, steps) if window is None else resolve_window(window, steps)
    latents, log_probs, preds, recorded = [], [], [], []
    for i, t in enumerate(scheduler.timesteps):
        pred = guided_prediction(family, scheduler.scale_model_input(x, t), t, cond, guidance)  # (N, C, h, w)
        level = eta if start <= i < end else 0.0  # outside the window: the deterministic DDIM step
        noise = torch.randn(x.shape, generator=gen).to(x) if level > 0 else None
        x_prev = scheduler.step(pred, int(t), x, eta=level, variance_noise=noise).prev_sample
        if keep_trajectory and start <= i < end:
            latents += [x.cpu()] if not latents else []
            latents.append(x_prev.cpu())
            recorded.append(i)
            if eta > 0:
                log_probs.append(step_log_prob(scheduler, pred, t, x, x_prev, eta).cpu())  # (N,)
            if keep_predictions:
                preds.append(pred.cpu())
        x = x_prev
    if not recorded:
        latents = [x.cpu()]
    return Trajectory(
        latents=torch.stack(latents).float(),  # (W+1, N, C, h, w): the window's steps (W = S without one)
        timesteps=scheduler.timesteps.cpu().long()[recorded],  # (W,)
        log_probs=torch.stack(log_probs) if log_probs else None,  # (W, N)
        eta=eta,
        guidance=guidance,
        predictions=torch.stack(preds) if preds else None,  # (W, N, C, h, w)
        final=x.float().cpu() if recorded and recorded[-1] < steps - 1 else None,  # x0 when the window ends early
    )


@torch.no_grad()
def sample(
    family,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 4.0,
    height: int | None = None,
    width: int | None = None,
    scheduler=None,
) -> torch.Tensor:
    """Sample x0 (N, C, h, w) fp32 on the model's device with DDIM eta 0 (default scheduler: the family's betas)."""
    traj = sample_trajectories(
        family, prompts, seeds, steps, guidance, 0.0, 0, height, width, scheduler, keep_trajectory=False
    )
    return traj.x0.to(family.device)


@dataclass
class DDIMSampler:
    """The DDIM-eta sampler of the DDPM families as an object: the loop (`sample`) and its step kernel (`mean_std`,
    `log_prob`), the interface the on-line engine uses for every sampler (diffalign.sampling; the flow families'
    is diffalign.sampling.flow_sde.FlowSDESampler)."""

    scheduler: DDIMScheduler  # `inference_scheduler(family, eta)` with its timesteps set
    eta: float
    window: tuple[int, int] = (0, -1)  # steps [start, end) with eta's noise, recorded; end <= 0 counts from S

    def sample(self, family, prompts, seeds, guidance, noise_seed=0, keep_predictions=False, window=None, cond=None):
        """-> Trajectory of N chains, the window's steps recorded (default: every step but the last, whose std is
        too small to train on: eta · 0.006 on the toy's cosine schedule against 0.2-1.0 for the others; it is
        taken with eta 0, as Flow-GRPO's SDE sampler takes its last step)."""
        steps = self.scheduler.num_inference_steps
        return sample_trajectories(
            family, prompts, seeds, steps, guidance, self.eta, noise_seed, scheduler=self.scheduler,
            keep_predictions=keep_predictions, window=tuple(window or self.window), cond=cond,
        )  # fmt: skip

    @property
    def grid(self) -> torch.Tensor:
        """(S,) t of every step (long, the training schedule's t), on the CPU."""
        return self.scheduler.timesteps.cpu().long()

    @property
    def recorded_steps(self) -> int:
        """Steps a trajectory records with the default window."""
        start, end = resolve_window(self.window, self.scheduler.num_inference_steps)
        return end - start

    def mean_std(self, pred, t, xt):
        return step_mean_std(self.scheduler, pred, t, xt, self.eta)

    def kl_std(self, t) -> torch.Tensor:
        """The s of GRPO's KL mean_dims (mu - mu_ref)² / (2 s²) at step t: the step's own std, so the KL is the exact
        per-dimension KL of the two DDIM-eta steps (DDPO has no KL; no official scale to match)."""
        return step_std(self.scheduler, t, self.eta)

    def log_prob(self, pred, t, xt, x_prev):
        return step_log_prob(self.scheduler, pred, t, xt, x_prev, self.eta)

    def density(self, x_next, mean, std) -> torch.Tensor:
        """log p(x_next | step) (N,) of the step's Gaussian: mean over latent dims (diffalign.likelihood)."""
        return gaussian_log_prob(x_next, mean, std)
