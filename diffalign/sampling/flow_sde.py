"""Flow-matching sampling with per-step log-probs: Flow-GRPO's ODE -> SDE conversion (Liu et al. 2025, arXiv 2505.05470).

A flow model (SD3, FLUX, a rectified-flow toy) predicts the velocity v = eps - x0 at x_sigma = (1 - sigma) x0 +
sigma eps; diffusers' FlowMatchEulerDiscreteScheduler integrates the ODE dx = v dsigma over sigma_0 = 1 > ... >
sigma_S = 0. The reverse SDE with the same marginals, noise scale s_sigma = a sqrt(sigma / (1 - sigma)), is

    dx = [v + s²/(2 sigma) (x + (1 - sigma) v)] dsigma + s dw,

and one Euler-Maruyama step from sigma to sigma' (dt = sigma' - sigma < 0) is a Gaussian (yifan123/flow_grpo,
`sd3_sde_with_logprob.py::sde_step_with_logprob`):

    mean = x + v dt + s²/(2 sigma) (x + (1 - sigma) v) dt,    std = s sqrt(-dt),    x' = mean + std eps
    log p(x' | x) = gaussian_log_prob(x', mean, std)          (diffalign.likelihood: mean over latent dims)

At sigma = 1 the official code uses sigma_1 in 1 - sigma (1/(1 - 1) would be infinite). With noise level a = 0 the
step is diffusers' Euler step x + v dt exactly, so a = 0 reproduces the pipeline's sampling (tests/test_flow_sampling.py).

The noise level `a` (Flow-GRPO: 0.7 for SD3.5, 0.9 for FLUX) is the only new hyper-parameter. An SDE window
(Flow-GRPO-Fast, MixGRPO) puts the noise on steps [start, end) only and integrates the ODE elsewhere; only the window
steps are recorded, so training sees just them. The default window is every step but the last: the last step's
Gaussian is so sharp that its log-prob overflows (the official refactored pipeline makes it deterministic too).

CPS, coefficients-preserving sampling (Wang & Yu 2025, arXiv 2509.05952; IamCreateAI/FlowCPS, and flow_grpo's
`sde_step_with_logprob(sde_type="cps")`), `FlowCPSSampler`: the SDE step above adds more noise than the next
sigma's marginal has room for at few steps (noisy images). CPS keeps x' = (1 - sigma') x0 + sigma' eps exactly in
its coefficients: with x0^ = x - sigma v and eps^ = x + (1 - sigma) v, and s = sigma' sin(a pi / 2),

    mean = (1 - sigma') x0^ + sqrt(sigma'² - s²) eps^,    std = s,    x' = mean + s eps
    log p(x' | x) = -mean_dims (x' - mean)²                       (the official code drops every constant and 1/2s²)

At a = 0 it is the Euler step again; at the last step (sigma' = 0) it is x0^ with std 0. Flow-GRPO's CPS configs
use a = 0.8 (`pickscore_sd3_fast_nocfg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffalign.likelihood import gaussian_log_prob
from diffalign.sampling.common import Trajectory, encode_guided, guided_prediction, initial_noise, resolve_window


def noise_scale(sigma, sigma_max, noise_level: float) -> torch.Tensor:
    """The SDE's noise scale s_sigma = a sqrt(sigma / (1 - sigma)) (fp32 scalar tensor): the official `std_dev_t`.

    sigma_max: the value used in 1 - sigma when sigma == 1 (the schedule's second sigma, as the official code)."""
    sigma = torch.as_tensor(sigma).float()
    safe = torch.where(sigma == 1, torch.as_tensor(sigma_max).float(), sigma)
    return noise_level * torch.sqrt(sigma / (1 - safe))


def sde_step(x, v, sigma, sigma_next, sigma_max, noise_level: float):
    """Mean (N, ...) and std s sqrt(-dt) (scalar tensor) of Flow-GRPO's SDE step sigma -> sigma_next; all in fp32."""
    x, v = x.float(), v.float()
    sigma, sigma_next = torch.as_tensor(sigma).float(), torch.as_tensor(sigma_next).float()
    dt = sigma_next - sigma  # < 0
    s = noise_scale(sigma, sigma_max, noise_level)
    mean = x + dt * v + (s**2 / (2 * sigma)) * (x + (1 - sigma) * v) * dt  # a = 0: the Euler step x + dt v exactly
    return mean, (s * torch.sqrt(-dt)).to(x.device)


def cps_step(x, v, sigma, sigma_next, noise_level: float):
    """Mean (N, ...) and std s = sigma' sin(a pi / 2) (scalar tensor) of the CPS step sigma -> sigma_next; fp32."""
    x, v = x.float(), v.float()
    sigma, sigma_next = torch.as_tensor(sigma).float(), torch.as_tensor(sigma_next).float()
    s = sigma_next * math.sin(noise_level * math.pi / 2)
    x0, eps = x - sigma * v, x + (1 - sigma) * v  # the step's predicted x0 and noise
    mean = (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - s**2) * eps  # a = 0: x + (sigma' - sigma) v
    return mean, s.to(x.device)


@dataclass
class FlowSDESampler:
    """Flow-GRPO's SDE sampler for one number of steps: `sample` runs the loop, `mean_std` / `log_prob` are its step
    kernel for training (stored x_t, x_t' and t; the same maths the loop used)."""

    sigmas: torch.Tensor  # (S+1,) fp32 from 1 down to 0: the scheduler's `sigmas`
    timesteps: torch.Tensor  # (S,) fp32 sigma * T: the values the transformer is called with (scheduler.timesteps)
    noise_level: float  # a: 0 = the ODE (deterministic Euler)
    window: tuple[int, int] = field(default=(0, -1))  # default SDE steps [start, end); end <= 0 counts from S

    @classmethod
    def for_family(cls, family, steps: int, noise_level: float, window=(0, -1)) -> FlowSDESampler:
        """The schedule the family's own diffusers pipeline samples `steps` steps with (`family.flow_scheduler`)."""
        scheduler = family.flow_scheduler(steps)  # the family's pipeline schedule (FLUX: its own sigma grid)
        return cls(scheduler.sigmas.float(), scheduler.timesteps.float(), float(noise_level), tuple(window))

    @property
    def eta(self) -> float:
        return self.noise_level

    @property
    def grid(self) -> torch.Tensor:
        """(S,) t of every step, in the training schedule's units (sigma * T), on the CPU."""
        return self.timesteps.cpu()

    def resolve(self, window) -> tuple[int, int]:
        return resolve_window(window, len(self.timesteps))

    @property
    def recorded_steps(self) -> int:
        """Steps a trajectory records with the default window."""
        start, end = self.resolve(self.window)
        return end - start

    def mean_std_at(self, i: int, pred, xt, sde: bool = True):
        """Step i of the schedule: the SDE step, or (sde=False, outside the window) the ODE's Euler step."""
        level = self.noise_level if sde else 0.0
        return sde_step(xt, pred, self.sigmas[i], self.sigmas[i + 1], self.sigmas[1], level)

    def index(self, t) -> int:
        """Step index of a stored timestep (exact match: both come from `self.timesteps`)."""
        hits = (self.timesteps == torch.as_tensor(t).float().cpu()).nonzero()
        if len(hits) != 1:
            raise ValueError(f"flow sampler: timestep {float(t)} is not one of this schedule's")
        return int(hits[0])

    def mean_std(self, pred, t, xt):
        return self.mean_std_at(self.index(t), pred, xt)

    def kl_std(self, t) -> torch.Tensor:
        """The s of GRPO's KL mean_dims (mu - mu_ref)² / (2 s²) at step t: the noise scale s_sigma, Flow-GRPO's
        `std_dev_t` (train_sd3.py drops the sqrt(-dt) of the step std, flow_grpo#22), so objective.beta is theirs."""
        return noise_scale(self.sigmas[self.index(t)], self.sigmas[1], self.noise_level)

    def log_prob(self, pred, t, xt, x_prev):
        """log p(x_prev | xt) (N,) under the step at t with velocity pred; needs noise_level > 0."""
        if self.noise_level <= 0:
            raise ValueError("flow sampler: noise level 0 is the ODE, which has no step density")
        mean, std = self.mean_std(pred, t, xt)
        return self.density(x_prev, mean, std)

    def density(self, x_next, mean, std) -> torch.Tensor:
        """log p(x_next | step) (N,) of the step's Gaussian: mean over latent dims (diffalign.likelihood)."""
        return gaussian_log_prob(x_next, mean, std)

    @torch.no_grad()
    def sample(self, family, prompts, seeds, guidance, noise_seed=0, keep_predictions=False, window=None,
               keep_trajectory=True, height=None, width=None, cond=None) -> Trajectory:  # fmt: skip
        """N chains from x_1 = initial_noise(seeds); noise from one CPU generator seeded by `noise_seed`.

        Records the window's steps only (latents[0] = x at the window's start, final = x0); everything stays on the
        device until one copy to the CPU at the end. keep_trajectory=False keeps only x0 (plain sampling). `cond`:
        the prompts' guided conditioning, already encoded (an on-line round's `EncodedPrompts.guided`); None
        encodes them here (`encode_guided`)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds")
        start, end = self.resolve(window or self.window)
        device = family.device
        cond = encode_guided(family, prompts, guidance) if cond is None else cond
        x = initial_noise(seeds, family.latent_shape(height, width)).to(device)  # (N, C, [f,] h, w), sigma_0 = 1
        gen = torch.Generator().manual_seed(int(noise_seed))
        latents, log_probs, preds, steps = [], [], [], []
        timesteps = self.timesteps.to(device)
        for i, t in enumerate(timesteps):
            pred = guided_prediction(family, x, t, cond, guidance)  # (N, C, h, w) velocity
            inside = start <= i < end
            mean, std = self.mean_std_at(i, pred, x, sde=inside)
            if inside and self.noise_level > 0:
                x_next = mean + std * torch.randn(x.shape, generator=gen).to(mean)
                log_probs.append(self.density(x_next, mean, std))  # (N,)
            else:
                x_next = mean
            if inside and keep_trajectory:
                latents += [x] if not latents else []
                latents.append(x_next)
                steps.append(i)
                if keep_predictions:
                    preds.append(pred)
            x = x_next
        recorded = keep_trajectory and bool(steps)
        return Trajectory(
            latents=torch.stack(latents).float().cpu() if recorded else x[None].float().cpu(),  # (W+1, N, C, h, w)
            timesteps=self.timesteps[steps] if recorded else self.timesteps[:0],  # (W,) fp32 sigma * T
            log_probs=torch.stack(log_probs).cpu() if recorded and log_probs else None,  # (W, N)
            eta=self.noise_level,
            guidance=guidance,
            predictions=torch.stack(preds).float().cpu() if recorded and preds else None,  # (W, N, C, h, w)
            final=x.float().cpu() if recorded else None,
        )


@dataclass
class FlowCPSSampler(FlowSDESampler):
    """CPS (module docstring): the same loop and window, the CPS step and its constant-free log-density."""

    def mean_std_at(self, i: int, pred, xt, sde: bool = True):
        return cps_step(xt, pred, self.sigmas[i], self.sigmas[i + 1], self.noise_level if sde else 0.0)

    def density(self, x_next, mean, std) -> torch.Tensor:
        """-mean_dims (x_next - mean)² (N,): flow_grpo's CPS log_prob, constants and 1/(2 s²) dropped."""
        return -((x_next.float() - mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))

    def kl_std(self, t) -> torch.Tensor:
        """The CPS step's std s = sigma' sin(a pi / 2): the `std_dev_t` flow_grpo's KL divides by with CPS."""
        i = self.index(t)
        return self.sigmas[i + 1] * math.sin(self.noise_level * math.pi / 2)


def sample_flow(family, prompts, seeds, steps: int = 20, guidance: float = 1.0, height=None, width=None):
    """x0 (N, C, h, w) fp32 on the model's device by the Euler ODE: `FlowSDESampler` at noise level 0 on the grid
    the family's own pipeline samples `steps` steps with (one grid for generation, evaluation and on-line rounds)."""
    sampler = FlowSDESampler.for_family(family, steps, 0.0)
    traj = sampler.sample(family, prompts, seeds, guidance, keep_trajectory=False, height=height, width=width)
    return traj.x0.to(family.device)
