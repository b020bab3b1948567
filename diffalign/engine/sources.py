"""Sources of estimate: one registry from an objective's declared source to the function that turns a batch into
the objective's inputs. `train` and `online` both call `SOURCES[name].inputs(ctx, batch, device)` inside the same
micro-step (diffalign/engine/step.py); what differs is only the batch a program makes.

    source       program  batch                                         objective inputs
    pairs        train    collated preference pairs (diffalign.data)     err, ref_err at x_t of objective.xt_source
    round_pairs  online   {"round", "step", "rows": (B,)} pair rows      err, ref_err at forward-noised generated x0
    round_sets   online   {"round", "step", "rows": (M,)} set rows       err, ref_err (+ desirable) per sample
    trajectory   online   {"round", "step", "rows": (B,), "k"}          step log-probs of both chains (D3PO)
    experts      online   {"round", "step", "rows": (B,), "k"}          err, ref_err of [expert; policy] (DRO)
    policy_steps online   {"round", "step", "rows": (B,), "k"}          step log-probs, stored ones, advantages (GRPO)
    nft          online   {"round", "step", "rows": (N,)} sample rows   v_θ, v_old, v_ref, target at forward-noised x0

("step" is the optimizer step within the round, "k" a stored trajectory step.) With `online.kl_weight` > 0 the
round_pairs, round_sets, trajectory and experts sources also measure the KL to the reference at their x_t (the
KL_KEY entry of their kwargs), which step_loss adds to the loss.

An objective lists the sources it can learn from (`sources` class attribute); a program accepts it when one of
them belongs to the program. Every random draw of a row (t, eps, inversion noise) comes from a generator keyed on
(seed, epoch, pair index) offline and (seed, round, optimizer step, row) on-line, so the same draw gets the same noise in
any process, batch slot or resumed run, and a row drawn again by a later step of its round gets fresh noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffalign.engine.step import KL_KEY, StepContext, draw_t_and_eps, family_inputs, keyed_t_and_eps, pair_generator
from diffalign.inversion import XT_SOURCES
from diffalign.likelihood import denoising_errors
from diffalign.objectives.nft import x0_scale
from diffalign.online.old_policy import OLD_ADAPTER
from diffalign.online.rounds import adapter_mode
from diffalign.online.steps import d3po_inputs, dro_inputs, grpo_inputs
from diffalign.sampling import Trajectory


@dataclass
class Round:
    """One on-line round as a small dataset: the chains, their prompts, and rows of indices into them."""

    index: int  # 0-based round number: the "epoch" of the keyed noise
    traj: Trajectory  # every chain of the round (all processes' shares, gathered), on CPU
    prompts: list[str]  # (N,) prompt of each chain
    first: torch.Tensor  # (R,) winners, set members or policy chains (DRO)
    second: (
        torch.Tensor | None
    )  # (R,) losers (pairs), desirable flags (sets), expert indices (DRO); GRPO: rewards (P, G)
    experts: tuple[torch.Tensor, list[str]] | None = None  # DRO: expert x0 (M, C, h, w) and captions


def batch_baseline(ctx: StepContext, err, ref_err) -> dict:
    """Diffusion-KTO's z = max(0, mean implicit reward) over the whole batch, i.e. over every process."""
    if not getattr(ctx.objective, "batch_baseline", False):
        return {}
    z = -(err - ref_err).detach().mean()  # (N,) -> scalar, this process's share
    return {"z": ctx.reduce_mean(z).clamp(min=0)}


def with_kl(kl: torch.Tensor | None) -> dict:
    """The engine's KL to the reference (online.kl_weight; step_loss adds it), as a kwargs entry when measured."""
    return {} if kl is None else {KL_KEY: kl}


def pair_inputs(ctx: StepContext, batch: dict, device):
    """Offline pairs: x0 stacked [w; l], keyed t and eps, x_t by the objective's xt_source (noise or inversion)."""
    x0, cond, label = family_inputs(ctx.family, batch, device)
    keys = list(zip(batch["epoch"], batch["index"].tolist()))
    t, eps, gens = keyed_t_and_eps(ctx.objective.paired, x0, ctx.schedule, ctx.seed, keys, ctx.estimator)
    xt_kwargs = XT_KWARGS.get(ctx.objective.xt_source, lambda g: {})(gens)
    errors = denoising_errors(
        ctx.denoise, ctx.schedule, x0, cond, t, eps, ctx.reference, XT_SOURCES[ctx.objective.xt_source], xt_kwargs
    )
    return (errors.err, errors.ref_err, label), batch_baseline(ctx, errors.err, errors.ref_err)


def round_pair_inputs(ctx: StepContext, batch: dict, device):
    """DRAGON with Diffusion-DPO: the round's pairs (generated x0 as if offline data), forward noise shared in a pair."""
    rnd, rows = batch["round"], batch["rows"]
    idx = torch.cat([rnd.first[rows], rnd.second[rows]])  # (2B,) stacked [w; l]
    x0 = rnd.traj.x0[idx].to(device)  # (2B, C, h, w)
    cond = ctx.family.encode_prompts([rnd.prompts[i] for i in idx.tolist()])
    keys = [(rnd.index, batch["step"], r) for r in rows.tolist()]
    t, eps, _ = keyed_t_and_eps(True, x0, ctx.schedule, ctx.seed, keys, ctx.estimator)
    errors = denoising_errors(ctx.denoise, ctx.schedule, x0, cond, t, eps, ctx.reference, with_kl=ctx.kl_weight > 0)
    return (errors.err, errors.ref_err, torch.ones(len(rows), device=device)), with_kl(errors.kl)


def round_set_inputs(ctx: StepContext, batch: dict, device):
    """DRAGON with Diffusion-KTO: desirable / undesirable samples, each with its own keyed t and eps."""
    rnd, rows = batch["round"], batch["rows"]
    idx = rnd.first[rows]  # (M,)
    x0 = rnd.traj.x0[idx].to(device)  # (M, C, h, w)
    cond = ctx.family.encode_prompts([rnd.prompts[i] for i in idx.tolist()])
    draws = [
        draw_t_and_eps(
            False, x0[i : i + 1], ctx.schedule, pair_generator(ctx.seed, rnd.index, batch["step"], r), ctx.estimator
        )
        for i, r in enumerate(rows.tolist())
    ]  # M x ((1,), (1, C, h, w))
    t, eps = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])  # (M,), (M, C, h, w)
    errors = denoising_errors(ctx.denoise, ctx.schedule, x0, cond, t, eps, ctx.reference, with_kl=ctx.kl_weight > 0)
    kwargs = {"desirable": rnd.second[rows].to(device), **batch_baseline(ctx, errors.err, errors.ref_err)}
    kwargs.update(with_kl(errors.kl))
    return (errors.err, errors.ref_err, None), kwargs


def trajectory_inputs(ctx: StepContext, batch: dict, device):
    """D3PO: per-step log-probs of both chains of each pair at stored step k (policy with grad, reference without)."""
    rnd, rows = batch["round"], batch["rows"]
    lp, ref_lp, kl = d3po_inputs(
        ctx.family,
        ctx.denoise,
        ctx.sampler,
        rnd.traj,
        rnd.prompts,
        rnd.first[rows],
        rnd.second[rows],
        batch["k"],
        ctx.reference,
        with_kl=ctx.kl_weight > 0,
    )
    return (lp, ref_lp, torch.ones(len(rows), device=device)), with_kl(kl)


def expert_inputs(ctx: StepContext, batch: dict, device):
    """Diffusion-DRO: [expert; policy] errors; each policy chain was sampled from its expert's caption."""
    rnd, rows = batch["round"], batch["rows"]
    expert_x0, _ = rnd.experts
    idx_p, idx_e = rnd.first[rows], rnd.second[rows]  # (B,) policy chains and the experts they were prompted by
    gens = [pair_generator(ctx.seed, rnd.index, batch["step"], r) for r in rows.tolist()]
    eps = torch.cat([torch.randn((1, *expert_x0.shape[1:]), generator=g) for g in gens])  # (B, C, h, w) keyed
    err, ref_err, kl = dro_inputs(
        ctx.family,
        ctx.denoise,
        ctx.schedule,
        expert_x0[idx_e],
        eps,
        rnd.traj,
        rnd.prompts,
        idx_p,
        batch["k"],
        ctx.reference,
        with_kl=ctx.kl_weight > 0,
    )
    return (err, ref_err, None), with_kl(kl)


def policy_step_inputs(ctx: StepContext, batch: dict, device):
    """GRPO: chains `rows` at stored step k; advantages from the round's (P, G) rewards by the objective's rule."""
    rnd, rows = batch["round"], batch["rows"]
    idx = rnd.first[rows]  # (B,) chain indices
    advantages = ctx.objective.advantages(rnd.second).flatten()[idx].to(device)  # (P, G) -> (N,) -> (B,)
    reference = ctx.reference if ctx.objective.beta > 0 else None  # beta 0: no reference forward
    lp, old_lp, mean, ref_mean, std = grpo_inputs(
        ctx.family, ctx.denoise, ctx.sampler, rnd.traj, rnd.prompts, idx, batch["k"], reference
    )
    return (lp, old_lp, advantages), {"mean": mean, "ref_mean": ref_mean, "std": std}


def nft_inputs(ctx: StepContext, batch: dict, device):
    """DiffusionNFT: the old policy's clean samples, each forward-noised with its own keyed t and eps; the trained
    (with grad), old-adapter and reference (if kl_weight > 0) predictions at that x_t, the family's target and x0
    slope, and the sample's group-relative advantage (Round.second)."""
    rnd, rows = batch["round"], batch["rows"]
    idx = rnd.first[rows]  # (N,)
    x0 = rnd.traj.x0[idx].to(device)  # (N, C, h, w)
    cond = ctx.family.encode_prompts([rnd.prompts[i] for i in idx.tolist()])
    draws = [
        draw_t_and_eps(
            False, x0[i : i + 1], ctx.schedule, pair_generator(ctx.seed, rnd.index, batch["step"], r), ctx.estimator
        )
        for i, r in enumerate(rows.tolist())
    ]  # N x ((1,), (1, C, h, w))
    t, eps = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])  # (N,), (N, C, h, w)
    xt, target = ctx.schedule.add_noise(x0, eps, t), ctx.schedule.target(x0, eps, t)
    with torch.no_grad(), adapter_mode(ctx.family.denoiser, OLD_ADAPTER):
        old_pred = ctx.denoise(xt, t, cond)
    ref_pred = None
    if ctx.objective.kl_weight > 0:
        with torch.no_grad(), ctx.reference():
            ref_pred = ctx.denoise(xt, t, cond)
    pred = ctx.denoise(xt, t, cond)
    advantages = rnd.second[rows].to(device)  # (N,)
    return (pred, old_pred, ref_pred, target, x0_scale(ctx.schedule, t), advantages), {}


@dataclass(frozen=True)
class Source:
    inputs: Callable  # (ctx, batch, device) -> (objective args, objective kwargs)
    program: str  # "train" or "online"
    stepwise: bool = False  # one micro-step per stored trajectory step (online.trajectory_steps of them)


SOURCES = {
    "pairs": Source(pair_inputs, "train"),
    "round_pairs": Source(round_pair_inputs, "online"),
    "round_sets": Source(round_set_inputs, "online"),
    "trajectory": Source(trajectory_inputs, "online", stepwise=True),
    "experts": Source(expert_inputs, "online", stepwise=True),
    "policy_steps": Source(policy_step_inputs, "online", stepwise=True),
    "nft": Source(nft_inputs, "online"),
}

# x_t sources that draw noise of their own get it from the rows' keyed generators (InPO's eta noise)
XT_KWARGS: dict[str, Callable] = {"ddim_inversion": lambda gens: {"generator": gens}}


def source_for(objective_cls, program: str) -> str | None:
    """The first source of the objective that `program` runs (None: the objective does not train there)."""
    return next((s for s in objective_cls.sources if SOURCES[s].program == program), None)


def objectives_for(program: str, objectives: dict) -> list[str]:
    """Names of the objectives `program` accepts, read from their `sources` metadata."""
    return [name for name, cls in objectives.items() if source_for(cls, program)]
