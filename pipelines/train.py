"""`diffalign train [CONFIG.yaml] [a.b=value ...] [--resume latest|PATH]`: LoRA preference alignment.

Read top to bottom: resolve the config -> load the model family -> add LoRA -> open the pairs (raw or cached) ->
loop (shared estimator -> objective -> accelerate backward/step) with checkpoints, tensorboard scalars and
validation images -> save the LoRA (diffusers format), the resolved config and the run record -> compare base vs
aligned on held-out prompts. With no config it aligns the shipped toy model on the toy preference pairs.

Exact resume: a checkpoint is taken only at an optimizer-step boundary and holds the LoRA, AdamW, LR scheduler,
global RNGs, the data position and the loop's counters; each pair's t and eps are drawn from a generator keyed on
(seed, epoch, pair index), like its augmentation, so a resumed run, a run with more processes or with a different
batch x accumulation split sees the same noise for the same pair. `--resume latest` starts from step 0 when there
is no checkpoint yet (so a pre-emptible job can always pass it), and drops metrics rows newer than the checkpoint.

Multi-process (accelerate launch / torchrun): the policy forward runs through the DDP wrapper so gradients
all-reduce; no-grad forwards (reference with adapters off, inversion) use the bare module. Every process reads
its own share of the global data stream; only the main process writes files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from diffalign.config import RunConfig, load_config
from diffalign.data import collate
from diffalign.data.sampler import EpochView, ResumableSampler
from diffalign.engine.common import build_objective, cache_ready, open_pairs, save_grid
from diffalign.engine.outputs import ignore_stop_signals
from diffalign.engine.run import Run
from diffalign.engine.step import count_bad, finish_step, micro_step, read_sums, sum_over_processes
from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule
from diffalign.sources import source_of


def run(config: str | None = None, overrides: list[str] | tuple = (), resume: str = "") -> Path:
    cfg: RunConfig = load_config(RunConfig, config, list(overrides))
    tc = cfg.train
    source = source_of(cfg, "train")  # the objective's source, config and contract checked
    objective = build_objective(cfg.objective)
    check_soft_labels(objective, cfg.objective.name, cfg.data)  # before anything is written
    run = Run(cfg, tc, resume, unit="step", log_file="metrics.jsonl", default_name="run", grad_accum=tc.grad_accum)
    out, main, accelerator = run.out, run.main, run.accelerator

    # ---- model, LoRA, data, optimizer, resume -------------------------------------------------------------------
    generates = bool(cfg.eval.prompts) or bool(tc.validate_every and tc.validation_prompts)
    family = run.load_model(  # a finished cache trains without the encoders
        load_encoders=generates or not cache_ready(cfg.data), reference="base" if objective.needs_reference else "none"
    )
    if main and cache_ready(cfg.data) and not generates:
        print(f"training from the cache {cfg.data.cache_dir}: VAE and text encoders not loaded")
    pairs = open_pairs(  # every process encodes its share of a missing cache, then all read it
        cfg.data,
        family,
        cfg.model.resolution or family.resolution,
        seed=tc.seed,
        cfg_model=cfg.model,
        progress=main,
        work_dir=out,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
    )
    if main:  # what the source dropped or flagged: ties, bad rows (skip_bad_rows), duplicate ids
        dropped = ", ".join(f"{k} {v}" for k, v in pairs.counts.items() if k != "kept" and v)
        print(f"data: {len(pairs)} pairs" + (f" ({dropped})" if dropped else ""))
    run.build_optimizer(tc.max_steps)
    saved = run.resume({"skipped_rows": 0})
    position, sums = saved.get("data_position", 0), saved.get("log_sums", {})  # sums: metrics since the last log
    batch = tc.batch_size
    sampler = ResumableSampler(
        len(pairs),
        seed=tc.seed,
        start=position,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        with_epoch=True,
    )
    loader = DataLoader(
        EpochView(pairs),
        batch_size=batch,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(tc.seed),  # iter() draws its base seed here, not from the global RNG
    )
    schedule = Schedule(family.scheduler, family.prediction_type)
    ctx = run.prepare(source, objective=objective, schedule=schedule, estimator=cfg.estimator)
    run.begin(cfg.eval.scorers[0], tc.max_steps, "diffalign")

    # ---- loop ---------------------------------------------------------------------------------------------------
    data_iter = iter(loader)
    step, counts, start = run.start, run.counts, run.start
    try:
        while step < tc.max_steps:
            tensor_sums: dict[str, torch.Tensor] = {}
            skipped_rows, ids = 0, []
            for _ in range(tc.grad_accum):
                batch_data = next(data_iter)
                position += batch * accelerator.num_processes
                skipped_rows += batch_data["skipped"]
                while "label" not in batch_data:  # every pair of the batch was an opted-in skip
                    batch_data = next(data_iter)
                    position += batch * accelerator.num_processes
                    skipped_rows += batch_data["skipped"]
                ids += batch_data["index"].tolist()
                tensor_sums = micro_step(accelerator, run.prepared, ctx, batch_data, tensor_sums)
            losses_finite, grads_finite = finish_step(accelerator, ctx, tensor_sums)
            step_sums = {**read_sums(tensor_sums), "n": float(tc.grad_accum), "skipped_rows": float(skipped_rows)}
            step_sums["stop"] = float(run.stop.signal is not None)
            step_sums = sum_over_processes(accelerator, step_sums)  # one small all-reduce per step
            stopping = step_sums.pop("stop") > 0  # a signal that reached any process stops them all
            counts["skipped_rows"] += int(step_sums.pop("skipped_rows"))
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v

            step += 1
            run.lr_scheduler.step()
            run.bar.update(1)
            where, hint = f"step {step} (pair indices {ids})", "lower train.lr or objective.beta, or check the data"
            count_bad(counts, losses_finite, grads_finite, accelerator.scaler, where, hint)
            if step % tc.log_every == 0 or step == tc.max_steps:
                n = sums.pop("n")
                logs = {k: v / n for k, v in sums.items()}
                logs.update(
                    lr=run.lr_scheduler.get_last_lr()[0],
                    skipped_steps=counts["skipped_steps"],
                    skipped_rows=counts["skipped_rows"],
                    steps_per_s=(step - start) / run.seconds,
                )
                run.log(step, logs)
                run.bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('implicit_acc', 0):.2f}")
                sums = {}
            if tc.validate_every and step % tc.validate_every == 0 and (main or run.sharded) and tc.validation_prompts:
                validate(run, tc.validation_prompts, out / "validation" / f"step-{step:06d}.png", step)
            tripped = run.after(step)  # before the save
            if ((tc.checkpoint_every and step % tc.checkpoint_every == 0) or stopping) and step < tc.max_steps:
                run.save(step, {"data_position": position, "log_sums": sums})
            if tripped:
                break  # a reward-hacking guard tripped: keep the best passing weights (diffalign/engine/guarding.py)
            if stopping and step < tc.max_steps:  # a signal during the last step: just finish
                run.exit_stopped(step)
    finally:
        run.close_loop()

    # ---- outputs ------------------------------------------------------------------------------------------------
    summary = run.finish({"objective": cfg.objective.name}, {"steps": step})
    if main:
        print(
            f"saved LoRA to {out / 'lora'} ({step} steps in {summary['train_seconds']:.0f}s; "
            f"{counts['skipped_steps']} non-finite steps skipped, {counts['skipped_rows']} bad rows skipped)"
        )
    return out


def check_soft_labels(objective, name: str, dcfg) -> None:
    """An objective that weighs pairs by a smoothed preference (SmPO) needs a scorer's p, not 0/1 labels."""
    if objective.soft_labels and not objective.hard_labels:
        if not (dcfg.label_scorer and dcfg.label_mode == "smpo"):
            raise DiffalignError(
                f"objective '{name}' needs smoothed labels: set data.label_scorer=<scorer> data.label_mode=smpo "
                "(e.g. configs/sdxl_smpo.yaml), or objective.hard_labels=true to train on 0/1 labels"
            )


def validate(run, prompts, path: Path, step: int) -> None:
    """The validation prompts' grid at this step (seeds 0..N-1) and its tensorboard images; a sharded run draws them
    on every process (`Run.generate`), the main process writes."""
    images = run.generate(list(prompts), list(range(len(prompts))), {})
    if images is None:
        return
    save_grid(images, path)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
