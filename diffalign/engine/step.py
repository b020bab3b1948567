"""The one optimizer step of `diffalign train` and `diffalign online`, as functions (benchmarks/train_step.py times it).

    ctx = StepContext(...)                      # model, estimator, objective, source, optimizer: fixed for the run
    for batch in micro_batches:                 # offline pairs, or rows of an on-line round (x trajectory steps)
        sums = micro_step(accelerator, prepared, ctx, batch, sums)   # forward, backward (no host sync)
    ok = finish_step(accelerator, ctx, sums)    # clip, ONE host sync, optimizer step or skip

`ctx.source` (diffalign/sources/) turns a batch into the objective's inputs; everything else is shared: accelerate's
accumulation (DDP no_sync on all but the last micro-step), mixed-precision autocast of the prepared model,
`accelerator.backward`, clipping, the non-finite policy and the optimizer step.

No host syncs inside a micro-step: the loss always goes backward, and finiteness is decided once per optimizer step
from the summed losses and the gradient norm (one `.item()`-like read). A non-finite loss makes the gradients
non-finite too (on every process: DDP all-reduces them), so every process skips the same steps; the loop's
counters see the same flags because the sums are all-reduced with the step's metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule, pair_noise, pair_timesteps, sample_timesteps

MAX_BAD_STEPS = 5  # non-finite steps in a row before a run stops (one is noise, five is a diverged run)
NOISE_STREAM = 0x6E6F69  # separates the noise keys from the augmentation keys (same seed, epoch, index)
ROWS_STREAM = 0x726F77  # on-line: which rows and trajectory steps an optimizer step trains on (seed, round, step)
WINDOW_STREAM = 0x77696E  # on-line: where a round's random SDE window starts (seed, round)


@dataclass
class StepContext:
    """What every step of a run shares."""

    family: object
    denoise: Callable  # policy_through(family, prepared): DDP-aware family.denoise
    objective: object
    schedule: Schedule
    reference: Callable | None  # () -> context manager with adapters off; None for reference-free objectives
    estimator: object  # EstimatorConfig: timestep distribution
    seed: int  # keys each pair's t and eps with (seed, epoch, index)
    params: list
    optimizer: torch.optim.Optimizer
    max_grad_norm: float
    source: object  # the run's diffalign.sources.Source: .inputs(ctx, batch, device) -> its typed Inputs
    sampler: object = None  # on-line: the DDIM-eta scheduler the round was sampled with (D3PO's step log-probs)
    reduce_mean: Callable = lambda x: x  # mean of a tensor over processes (accelerator.reduce(x, "mean"))
    kl_weight: float = 0.0  # on-line: weight of the KL to the reference the sources add (online.kl_weight)


def step_context(accelerator, family, prepared, source, run, **fields) -> StepContext:
    """The StepContext both programs build after `accelerator.prepare`: DDP-aware denoise, the source's inputs
    (`source`: a diffalign.sources.Source), the
    run section's seed and clipping (`run`: TrainRunConfig or OnlineRunConfig), the cross-process mean; `fields` are
    the rest (objective, schedule, reference, estimator, params, optimizer, and on-line the sampler)."""
    return StepContext(
        family=family,
        denoise=policy_through(family, prepared),
        seed=run.seed,
        max_grad_norm=run.max_grad_norm,
        source=source,
        reduce_mean=lambda x: accelerator.reduce(x, reduction="mean"),
        **fields,
    )


def step_loss(ctx: StepContext, batch: dict, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean objective loss (scalar) and its metrics for one batch of the run's source; with `ctx.kl_weight` > 0 plus
    kl_weight x the mean KL to the reference the source measured (metric "kl")."""
    inputs = ctx.source.inputs(ctx, batch, device)  # typed per source; the objective takes its fields by name
    kl = inputs.kl
    loss, metrics = ctx.objective(**inputs.for_objective(ctx.objective))
    loss = loss.mean()
    if kl is not None:
        loss = loss + ctx.kl_weight * kl.mean()
        metrics = {**metrics, "kl": kl.detach()}
    return loss, metrics


def micro_step(accelerator, prepared, ctx: StepContext, batch: dict, sums: dict) -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch inside accelerate's accumulation; adds the detached loss and metric
    means to `sums` (tensors on the device: read once per step, in finish_step's sync)."""
    with accelerator.accumulate(prepared):
        loss, metrics = step_loss(ctx, batch, accelerator.device)
        accelerator.backward(loss)
    for k, v in {"loss": loss.detach(), **metrics}.items():
        v = v.detach().float().mean()
        sums[k] = sums[k] + v if k in sums else v
    return sums


def finish_step(accelerator, ctx: StepContext, sums: dict[str, torch.Tensor]) -> tuple[bool, bool]:
    """After the last micro-step: clip, decide finiteness with one host read, step or skip, zero the gradients.

    Returns (losses_finite, grads_finite). With fp16's GradScaler the optimizer step is taken whenever the losses
    are finite: the scaler itself skips an overflowing step and lowers its scale.
    """
    if not accelerator.sync_gradients:
        raise RuntimeError("internal: an optimizer step ended inside gradient accumulation")
    if ctx.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(ctx.params, ctx.max_grad_norm)  # unscales fp16 gradients first
    else:
        grads = [p.grad for p in ctx.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)
        if isinstance(norm, DTensor):  # FSDP2: each process's partial norm -> the whole one (an all-reduce)
            norm = norm.full_tensor()
    bad = torch.stack([~torch.isfinite(sums["loss"]), ~torch.isfinite(norm.float()).to(sums["loss"].device)])
    if accelerator.num_processes > 1:  # every process takes the same branch (and fp16 scalers stay identical)
        bad = accelerator.reduce(bad.float(), reduction="sum")
    losses_finite, grads_finite = (not f for f in bad.tolist())  # the step's one host sync
    if losses_finite and (grads_finite or accelerator.scaler is not None):
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return losses_finite, grads_finite


def count_bad(counts: dict, losses_finite: bool, grads_finite: bool, scaler, where: str, hint: str) -> None:
    """The non-finite policy of both programs: skip and count; stop after MAX_BAD_STEPS in a row, naming `where`.

    With fp16's GradScaler, non-finite gradients alone are the scaler's business (it lowers its scale), not bad.
    """
    counts["skipped_steps"] += not (losses_finite and grads_finite)
    bad = not losses_finite or (not grads_finite and scaler is None)
    counts["bad_in_a_row"] = counts["bad_in_a_row"] + 1 if bad else 0
    if counts["bad_in_a_row"] >= MAX_BAD_STEPS:
        raise DiffalignError(
            f"non-finite loss or gradients for {counts['bad_in_a_row']} steps in a row, the last at {where}; {hint}"
        )


def sum_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """{name: float} summed over processes (names in the same order everywhere); float64 keeps sums exact."""
    if accelerator.num_processes == 1:
        return values
    names = list(values)  # built by the same code on every process: the same order
    vec = torch.tensor([values[k] for k in names], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(vec, reduction="sum")  # (K,) -> (K,)
    return dict(zip(names, total.tolist()))


def read_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: device scalar} -> {name: float} with one device-to-host copy."""
    if not sums:
        return {}
    return dict(zip(sums, torch.stack([v.float() for v in sums.values()]).tolist()))


# ---- pieces ---------------------------------------------------------------------------------------------------


def family_inputs(family, batch, device):
    """(x0 stacked [w; l], conditioning dict, label) on `device` from a collated batch."""
    from diffalign.data.batches import model_inputs

    x0, cond, label = model_inputs(family, batch)
    return x0.to(device), {k: v.to(device) for k, v in cond.items()}, label.to(device)


def keyed_generator(*words: int) -> torch.Generator:
    """A CPU generator seeded from the integer key `words` (numpy's SeedSequence mixes them)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def pair_generator(seed: int, *key: int) -> torch.Generator:
    """The generator of one pair's t and eps, keyed like its augmentation (`item_draws`): offline (epoch, index), so
    the same pair in the same epoch gets the same noise whichever process, batch slot or resumed run draws it;
    on-line (round, step, row), so a row drawn again by a later step of its round gets fresh noise."""
    return keyed_generator(seed, *key, NOISE_STREAM)


def keyed_t_and_eps(paired: bool, x0, schedule: Schedule, seed: int, keys: list[tuple[int, ...]], ecfg):
    """t (2B,) and eps (2B, C, h, w) for x0 stacked [w; l]; pair i draws only from pair_generator(seed, *keys[i]).

    Also returns the 2B generators of the rows ([w; l]: row i and row B + i share pair i's), past these draws, for
    x_t sources that draw noise of their own (InPO's eta noise).
    """
    b = x0.shape[0] // 2
    gens = [pair_generator(seed, *key) for key in keys]
    draws = [
        draw_t_and_eps(paired, x0[[i, b + i]], schedule, gen, ecfg) for i, gen in enumerate(gens)
    ]  # B x ((2,), (2, C, h, w)) as [w_i; l_i]
    t = torch.stack([d[0] for d in draws], 1).flatten()  # B x (2,) -> (2, B) -> (2B,) = [t_w; t_l]
    eps = torch.stack([d[1] for d in draws], 1).flatten(0, 1)  # B x (2, C, h, w) -> (2, B, ...) -> (2B, C, h, w)
    return t, eps, gens + gens


def draw_t_and_eps(paired: bool, x0, schedule: Schedule, gen: torch.Generator, ecfg):
    """Pairs share t and eps (DPO family); unpaired objectives (KTO, DRO) draw them per sample."""
    kw = {"distribution": ecfg.timesteps, "t_min": ecfg.t_min, "t_max": ecfg.t_max}
    n = x0.shape[0]
    if paired:
        t, eps = pair_timesteps(n // 2, schedule.num_train_timesteps, gen, **kw), pair_noise(x0, gen)
    else:
        t = sample_timesteps(n, schedule.num_train_timesteps, gen, **kw)
        eps = torch.randn(x0.shape, generator=gen).to(x0)
    return t.to(x0.device), eps


def policy_through(family, wrapped):
    """`family.denoise`, running `wrapped` (the DDP module: gradients all-reduce) when gradients are on.

    No-grad forwards (the reference with adapters off on the bare module, inversion) skip the wrapper: nothing to
    synchronise, and DDP would otherwise prepare a reduction that never comes. With one process `wrapped` is the
    bare module itself. Every family's `denoise` takes the module to run (`module=`), so nothing is swapped.
    """

    def denoise(xt, t, cond):
        if wrapped is family.denoiser or not torch.is_grad_enabled():
            return family.denoise(xt, t, cond)
        return family.denoise(xt, t, cond, module=wrapped)

    return denoise
