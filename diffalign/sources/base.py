"""What an objective learns from: the `Source` base, the `Round` an on-line source reads, and the typed inputs a
source hands its objective.

A source is one class in one file (diffalign/sources/<name>.py, registered in SOURCES). It declares what it needs
from the program (a reference, an "old" policy adapter, expert images, the sampler's stored predictions, stochastic
steps), checks the config it runs under (`check`, called right after the config loads, before any model), turns a
scored round into rows (`rows`: on-line only) and turns a batch of rows into the objective's inputs (`inputs`).

Inputs are dataclasses whose field names are the objective's `__call__` argument names: the step passes each field
the objective asks for by name (`Inputs.for_objective`), and `fits` checks, when the config loads, that the source
gives every argument the objective requires. `kl` is not an objective argument: it is the engine's KL to the
reference (online.kl_weight) that the step adds to the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from diffalign.engine.step import StepContext, draw_t_and_eps, pair_generator
from diffalign.errors import DiffalignError
from diffalign.sampling import EncodedPrompts, Trajectory

Reference = Callable[[], AbstractContextManager]  # () -> a context in which the denoiser is the reference
Denoise = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]  # (xt, t, cond) -> prediction


class Through:
    """`family` whose `denoise` is another function (the DDP-wrapped policy); every other attribute is the family's."""

    def __init__(self, family, denoise: Denoise):
        self._family, self.denoise = family, denoise

    def __getattr__(self, name):
        return getattr(self._family, name)


@dataclass
class Inputs:
    """The engine's part of every source's inputs: (N,) KL to the reference at the source's x_t, or None."""

    kl: torch.Tensor | None = field(default=None, kw_only=True)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"kl"}

    def for_objective(self, objective) -> dict:
        """The fields the objective's `__call__` takes, by name."""
        required, optional = objective.arguments()
        return {n: getattr(self, n) for n in (*required, *optional) if n in self.names()}


@dataclass
class ErrorInputs(Inputs):
    """Per-sample denoising errors (the shared estimator): pairs stacked [w; l] with a label, or single samples."""

    err: torch.Tensor  # (N,) policy, with grad
    ref_err: torch.Tensor | None  # (N,) reference, no grad; None for reference-free objectives
    label: torch.Tensor | None = None  # (B,) P(w preferred) for pairs; None for single samples
    desirable: torch.Tensor | None = None  # (N,) bool, single samples (DRAGON-KTO sets)
    z: torch.Tensor | None = None  # Diffusion-KTO's baseline over every process's batch


@dataclass
class GroupErrors(Inputs):
    """Denoising errors of whole groups of a round's samples, group by group, with their advantages (DGPO)."""

    err: torch.Tensor  # (B·G,) policy, with grad
    ref_err: torch.Tensor  # (B·G,) reference, no grad
    advantages: torch.Tensor  # (B, G) group-relative


@dataclass
class StepLogProbs(Inputs):
    """Per-step log-probs of both chains of each pair at a stored trajectory step (D3PO)."""

    log_prob: torch.Tensor  # (2B,) policy, with grad, stacked [w; l]
    ref_log_prob: torch.Tensor  # (2B,) reference
    label: torch.Tensor  # (B,)


@dataclass
class PolicySteps(Inputs):
    """GRPO at a stored step of single chains: the ratio's log-probs, advantages, and the KL's step means."""

    log_prob: torch.Tensor  # (B,) with grad
    old_log_prob: torch.Tensor  # (B,) stored by the sampler
    advantages: torch.Tensor  # (B,)
    mean: torch.Tensor  # (B, C, h, w) policy step mean, with grad
    ref_mean: torch.Tensor | None  # (B, C, h, w) reference's, None without a KL
    kl_std: torch.Tensor  # the s the KL divides by (sampler.kl_std)


@dataclass
class OldPolicySteps(PolicySteps):
    """PolicySteps plus the sampling (old) policy's step: GRPO-Guard's ratio normalisation, Flow-DPPO's exact KL."""

    old_mean: torch.Tensor  # (B, C, h, w) the sampler's step mean, from its stored prediction
    std: torch.Tensor  # the step's std (flow: s_sigma sqrt(-dt); DDIM-eta: its own std)


@dataclass
class Predictions(Inputs):
    """DiffusionNFT: predictions of the trained, old and reference policies at forward-noised clean samples."""

    pred: torch.Tensor  # (N, C, h, w) with grad
    old_pred: torch.Tensor  # (N, C, h, w)
    ref_pred: torch.Tensor | None  # (N, C, h, w), None when objective.kl_weight is 0
    target: torch.Tensor  # (N, C, h, w)
    scale: torch.Tensor  # (N,) x0 slope of the family's parametrisation
    advantages: torch.Tensor  # (N,)


@dataclass
class Round:
    """One on-line round as a small dataset: the chains, their prompts, and rows of indices into them."""

    index: int  # 0-based round number: the "epoch" of the keyed noise
    traj: Trajectory  # every chain of the round (all processes' shares, gathered), on CPU
    prompts: list[str]  # (N,) prompt of each chain
    first: torch.Tensor  # (R,) winners, set members or policy chains (DRO)
    second: torch.Tensor | None  # (R,) losers, desirable flags, expert indices (DRO), advantages; GRPO: rewards (P, G)
    experts: tuple[torch.Tensor, list[str]] | None = None  # DRO: expert x0 (M, C, h, w) and captions
    text: EncodedPrompts | None = None  # the prompts' conditioning, encoded once when the round was sampled
    grid: torch.Tensor | None = None  # (S,) the sampler's t of every step (NFT's objective.timesteps: sampler)


class Source:
    """One way of turning data into an objective's inputs; subclasses set the class attributes they change."""

    name: ClassVar[str]
    program: ClassVar[str] = "online"  # "train" (a data loader) or "online" (rounds)
    inputs_type: ClassVar[type[Inputs]] = ErrorInputs
    stepwise: ClassVar[bool] = False  # one micro-step per stored trajectory step (train.trajectory_steps of them)
    rules: ClassVar[dict | None] = None  # pairing.split's options; None: the source has no split
    experts: ClassVar[bool] = False  # prompts are the captions of expert images (Diffusion-DRO), not sampling.prompts
    keep_predictions: ClassVar[bool] = False  # the sampler keeps its predictions (DRO's snapshot targets)
    old_policy: ClassVar[bool] = False  # an EMA "old" adapter, updated after each round (DiffusionNFT, AWM)
    old_samples: ClassVar[bool] = True  # with old_policy: it samples the rounds (NFT); False: the trained one (AWM)

    def check(self, cfg) -> None:
        """Config checks (cfg: the whole OnlineConfig), once at load and again once guidance is resolved."""
        split = cfg.pairing.split
        if self.rules is not None and split not in self.rules:
            raise DiffalignError(
                f"pairing.split '{split}' does not fit objective '{cfg.objective.name}' "
                f"(options: {', '.join(self.rules)})"
            )

    def rows(self, by_group: torch.Tensor, cfg, labels, r: int, pool_index: torch.Tensor):
        """(P, G) rewards of round r -> (first (R,), second (R,) or other): the round's rows."""
        raise NotImplementedError(f"source '{self.name}' does not build rounds")

    def inputs(self, ctx: StepContext, batch: dict, device) -> Inputs:
        raise NotImplementedError


def fits(objective_name: str, objective_cls, source: Source) -> None:
    """The source gives every argument the objective's `__call__` requires (checked when the config loads)."""
    required, _ = objective_cls.arguments()
    missing = [n for n in required if n not in source.inputs_type.names()]
    if missing:
        raise DiffalignError(
            f"objective '{objective_name}' takes {', '.join(missing)}, which source '{source.name}' does not give "
            f"({', '.join(sorted(source.inputs_type.names()))})"
        )


def check_groups(cfg, who: str, why: str) -> None:
    """Group-relative sources (nft, awm, round_groups): G >= 2, and distinct x_T within a group when the sampler is
    deterministic (eta 0), else every image of a group would be the same image."""
    if cfg.sampling.images_per_prompt < 2:
        raise DiffalignError(f"sampling.images_per_prompt must be >= 2 for {who} ({why})")
    if cfg.sampling.shared_noise and cfg.sampling.eta == 0:
        raise DiffalignError(
            f"sampling.shared_noise must be false for {who} with eta 0: a deterministic sampler would give every "
            "image of a group the same x_T and so the same image"
        )


def keyed_draws(ctx: StepContext, x0: torch.Tensor, rnd: Round, step: int, rows: torch.Tensor):
    """Each row's own t and eps, from the generator keyed on (seed, round, optimizer step, row): (N,), (N, C, h, w)."""
    draws = [
        draw_t_and_eps(False, x0[i : i + 1], ctx.schedule, pair_generator(ctx.seed, rnd.index, step, r), ctx.estimator)
        for i, r in enumerate(rows.tolist())
    ]  # N x ((1,), (1, C, h, w))
    return torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])


def keyed_grid_draws(
    ctx: StepContext, x0: torch.Tensor, rnd: Round, step: int, rows: torch.Tensor, grid: torch.Tensor
):
    """Each row's t drawn uniformly from `grid` (S,) and its eps, from the generator keyed on (seed, round, optimizer
    step, row): (N,), (N, C, h, w)."""
    gens = [pair_generator(ctx.seed, rnd.index, step, r) for r in rows.tolist()]
    at = torch.cat([torch.randint(len(grid), (1,), generator=g) for g in gens])  # (N,)
    eps = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens])  # (N, C, h, w)
    return grid[at].to(x0.device), eps.to(x0.device)


def batch_baseline(ctx: StepContext, err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor | None:
    """Diffusion-KTO's z = max(0, mean implicit reward) over the whole batch, i.e. over every process."""
    if not ctx.objective.batch_baseline:
        return None
    z = -(err - ref_err).detach().mean()  # (N,) -> scalar, this process's share
    return ctx.reduce_mean(z).clamp(min=0)
