"""THE shared denoising-likelihood estimator.

Every offline preference objective scores an image x0 by how well a network denoises it: the per-sample error

    err(x0) = mean_{c,h,w} || target - pred(x_t, t, c) ||^2          (N,)

with x_t and the target from one of the x_t sources below and the target chosen by prediction type:

    epsilon:       target = eps
    v_prediction:  target = sqrt(abar_t) eps - sqrt(1 - abar_t) x0     (scheduler.get_velocity)
    flow:          target = eps - x0,  x_t = (1 - sigma_t) x0 + sigma_t eps  (rectified flow / SD3)

For flow models the integer t in [0, T) indexes the scheduler's own training sigma table (shift included, see
`Schedule.sigma`); the network must then be fed the matching scheduler timestep sigma_t * T (`Schedule.model_timestep`,
which flow families apply inside `denoise`), exactly as the diffusers pipeline feeds it at sampling time.

The error is the *mean* over latent dimensions, as in all official code; that is why β is in the thousands and
why every objective's β means the paper's β (the ½ and T of Diffusion-DPO are absorbed there, not here).

Pairs share t and eps (`pair_timesteps`, `pair_noise`); the policy and reference errors come from one stacked
forward each, the reference being the same network with its LoRA adapters disabled (`reference` context).

Seams: x_t sources are functions (forward noise here; DDIM / ReNoise inversion and the `XT_SOURCES` registry in
diffalign/inversion.py), and per-step log-probs for sampled trajectories live with the samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property

import torch

# diffusers is imported where it is used: diffalign.config imports this module (through the objectives), and a
# config error or `diffalign <command> --help` must answer without loading it.

Denoise = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class Schedule:
    """The training noise schedule of a model: a diffusers scheduler plus the prediction type."""

    scheduler: object
    prediction_type: str  # "epsilon" | "v_prediction" | "flow"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @cached_property
    def _flow_sigmas(self) -> torch.Tensor:
        """The training sigma table (T,) of a fresh copy of the flow-matching scheduler, ascending in t.

        diffusers builds it at init as sigma_i = shift s_i / (1 + (shift - 1) s_i), s_i = (T, ..., 1) / T, and samples
        and trains on those values (`scheduler.timesteps = sigmas * T`); a fresh copy ignores any `set_timesteps`.
        """
        config = self.scheduler.config
        if config.use_dynamic_shifting:  # Flux-style: sigma depends on the image size, not on t alone
            raise ValueError("flow: schedulers with use_dynamic_shifting=True are not supported")
        from diffusers import FlowMatchEulerDiscreteScheduler

        sigmas = FlowMatchEulerDiscreteScheduler.from_config(config).sigmas  # (T,) descending, sigma = 1 first
        return sigmas.flip(0)  # (T,) ascending: sigma(0) < ... < sigma(T-1) = 1

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """flow: sigma_t (N,) fp32 for integer timesteps t (N,) in [0, T).

        A FlowMatchEulerDiscreteScheduler (SD3) gives its own shifted table: sigma_t = shift u / (1 + (shift - 1) u)
        with u = (t + 1) / T (diffusers' grid runs over 1..T), e.g. shift 3, t = 499: u = 0.5, sigma = 0.75.
        Other schedulers (DDPM-type configs, as in the estimator's unit tests) give the unshifted path sigma = t / T.
        A floating-point t is a sampling timestep sigma * T (the flow sampler's grid, not on the training table):
        sigma = t / T, so `model_timestep` passes it to the network unchanged, as the diffusers pipeline does.
        """
        if self.prediction_type != "flow":
            raise ValueError(f"sigma is defined for flow schedules, not '{self.prediction_type}'")
        if t.is_floating_point():  # a sampler's timestep sigma * T (diffalign.sampling.flow_sde), off the table
            return t.float() / self.num_train_timesteps
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            return self._flow_sigmas.to(t.device)[t.long()]
        return t.float() / self.num_train_timesteps

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the network is called with for integer t (N,): sigma_t * T for flow (a value of
        `scheduler.timesteps`, as the pipeline passes it), t itself otherwise."""
        if self.prediction_type == "flow":
            return self.sigma(t) * self.num_train_timesteps
        return t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward noising q(x_t | x0) with the scheduler's own formula (flow: its `scale_noise` at sigma_t)."""
        if self.prediction_type == "flow":
            sigma = self.sigma(t).view(-1, *[1] * (x0.ndim - 1))  # (N,) -> (N, 1, 1, 1)
            return (1 - sigma) * x0 + sigma * eps
        return self.scheduler.add_noise(x0, eps, t)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, eps, t)
        if self.prediction_type == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction type '{self.prediction_type}'")

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t (N,) for DDPM-type schedules (used by inversion to back-solve the target noise)."""
        return self.scheduler.alphas_cumprod.to(t.device)[t]


def sample_timesteps(
    n: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    distribution: str = "uniform",
    t_min: int = 0,
    t_max: int = 0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Draw n integer timesteps in [t_min, t_max) (t_max 0 = num_train_timesteps).

    uniform: t ~ U{t_min..t_max-1} (Diffusion-DPO). logit_normal: t/T = sigmoid(N(mean, std)) (SD3 / flow DPO).
    """
    t_max = t_max or num_train_timesteps
    if not 0 <= t_min < t_max <= num_train_timesteps:
        raise ValueError(f"bad timestep range [{t_min}, {t_max}) for {num_train_timesteps} train timesteps")
    if distribution == "uniform":
        return torch.randint(t_min, t_max, (n,), generator=generator)
    if distribution == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
        return (t_min + u * (t_max - t_min)).long().clamp(t_min, t_max - 1)
    raise ValueError(f"unknown timestep distribution '{distribution}' (uniform, logit_normal)")


def pair_timesteps(b: int, num_train_timesteps: int, generator: torch.Generator | None = None, **kw) -> torch.Tensor:
    """One t per pair, shared by winner and loser: (B,) -> (2B,) as [t; t]."""
    return sample_timesteps(b, num_train_timesteps, generator, **kw).repeat(2)


def pair_noise(x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One eps per pair, shared by winner and loser. x0 (2B, C, h, w) stacked [w; l] -> eps (2B, C, h, w)."""
    b = x0.shape[0] // 2
    eps = torch.randn((b, *x0.shape[1:]), generator=generator, dtype=torch.float32)
    return eps.repeat(2, *[1] * (x0.ndim - 1)).to(device=x0.device, dtype=x0.dtype)  # (B, ...) -> (2B, ...)


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_{c,h,w} (target - pred)^2 in fp32: (N, C, h, w) -> (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# x_t sources: (denoise, schedule, x0, cond, t, eps) -> (x_t, target). The inversions and the registry of every
# source (XT_SOURCES) are in diffalign/inversion.py.


def forward_noise(denoise: Denoise, schedule: Schedule, x0, cond, t, eps):
    """x_t ~ q(x_t | x0) with the given eps; target by prediction type."""
    return schedule.add_noise(x0, eps, t), schedule.target(x0, eps, t)


@dataclass
class Errors:
    """Per-sample denoising errors of one stacked batch."""

    err: torch.Tensor  # (N,) policy, with grad
    ref_err: torch.Tensor | None  # (N,) reference, no grad; None when the objective has no reference
    t: torch.Tensor  # (N,)
    kl: torch.Tensor | None = None  # (N,) prediction_kl to the reference, with grad (with_kl=True)


def denoising_errors(
    denoise: Denoise,
    schedule: Schedule,
    x0: torch.Tensor,
    cond: dict,
    t: torch.Tensor,
    eps: torch.Tensor,
    reference: Callable[[], AbstractContextManager] | None = None,
    xt_source: Callable = forward_noise,
    xt_kwargs: dict | None = None,
    with_kl: bool = False,
) -> Errors:
    """Policy (and reference) errors at the same x_t: one forward each over the whole stacked batch.

    Args:
        denoise: `family.denoise(xt, t, cond)`.
        x0: (N, C, h, w) clean latents, e.g. stacked [w; l] with N = 2B.
        t, eps: (N,) timesteps and (N, C, h, w) noise, shared within a pair (see pair_timesteps / pair_noise).
        reference: factory of a context in which `denoise` is the reference model (LoRA adapters off),
            e.g. `lambda: reference_mode(family.denoiser)`; None skips the reference forward.
        xt_source: an x_t source, a value of diffalign.inversion.XT_SOURCES (default: forward noise).
        xt_kwargs: extra keyword arguments of that source (e.g. ddim_inversion's per-row `generator` list).
        with_kl: also return `prediction_kl` of the policy to the reference at the same x_t (needs `reference`).
    """
    with torch.no_grad():
        xt, target = xt_source(denoise, schedule, x0, cond, t, eps, **(xt_kwargs or {}))
    ref_err = ref_pred = None
    if reference is not None:
        with torch.no_grad(), reference():
            ref_pred = denoise(xt, t, cond)
            ref_err = per_sample_error(ref_pred, target)  # (N,)
    pred = denoise(xt, t, cond)
    kl = prediction_kl(pred, ref_pred) if with_kl else None
    return Errors(err=per_sample_error(pred, target), ref_err=ref_err, t=t, kl=kl)


def prediction_kl(pred: torch.Tensor, ref_pred: torch.Tensor) -> torch.Tensor:
    """mean_dims (pred - ref_pred)^2: (N, ...) -> (N,). The KL of the policy's reverse step to the reference's at
    the same x_t, up to the step's weight (both steps Gaussian with the same variance; the weight set to 1, as
    Diffusion-DPO's KL bound and DiffusionNFT's KL term do)."""
    return (pred.float() - ref_pred.float().detach()).pow(2).flatten(1).mean(1)


def step_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean, s^2 I) || N(ref_mean, s^2 I)) per dimension = mean_dims (mean - ref_mean)^2 / (2 s^2): (N,).
    With the step's std it is the exact KL of a sampled step (D3PO's online.kl_weight); GRPO passes the sampler's
    `kl_std` instead (flow: Flow-GRPO's s without sqrt(-dt), diffalign.objectives.grpo)."""
    return (mean - ref_mean.detach()).pow(2).flatten(1).mean(1) / (2 * torch.as_tensor(std) ** 2)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2 I), averaged (not summed) over non-batch dims: (N, ...) -> (N,).

    The per-dimension mean is the convention of D3PO/SPO code; their β (0.1 / 10) assumes it.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    var = std.float() ** 2
    lp = -((x.float() - mean.float()) ** 2) / (2 * var) - torch.log(std.float()) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)
