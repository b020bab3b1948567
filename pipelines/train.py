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

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedType,
    ProjectConfiguration,
    broadcast_object_list,
    parse_flag_from_env,
    set_seed,
)
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffalign.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from diffalign.config import RunConfig, load_config, save_config, to_dict
from diffalign.data import collate
from diffalign.data.sampler import EpochView, ResumableSampler
from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule
from diffalign.lora import add_lora, lora_targets, reference_mode, save_lora
from diffalign.objectives import OBJECTIVES
from diffalign.runinfo import write_run_record
from pipelines.common import build_objective, cache_ready, load_model, open_pairs, prepare_output_dir, save_grid
from pipelines.curves import Curves, plot_curves
from pipelines.evaluate import evaluate_base_vs_lora
from pipelines.guarding import GuardRun
from pipelines.sources import source_for
from pipelines.step import (
    count_bad,
    finish_step,
    micro_step,
    read_sums,
    step_context,
    sum_over_processes,
)


class StopFlag:
    """SIGTERM/SIGINT ask the loop to save and stop after the current step (pre-emptible machines)."""

    def __init__(self):
        self.signal = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def run(config: str | None = None, overrides: list[str] | tuple = (), resume: str = "") -> Path:
    cfg: RunConfig = load_config(RunConfig, config, list(overrides))
    tc = cfg.train
    if cfg.objective.name not in OBJECTIVES:
        raise DiffalignError(f"unknown objective '{cfg.objective.name}' (known: {', '.join(OBJECTIVES)})")
    source = source_for(OBJECTIVES[cfg.objective.name], "train")
    if source is None:
        raise DiffalignError(
            f"objective '{cfg.objective.name}' trains on the model's own samples: run `diffalign online` "
            f"(e.g. configs/toy_{cfg.objective.name}.yaml)"
        )
    check_soft_labels(build_objective(cfg.objective), cfg.objective.name, cfg.data)  # before anything is written
    if tc.mixed_precision not in ("no", "bf16", "fp16"):
        raise DiffalignError(f"train.mixed_precision must be no, bf16 or fp16, not '{tc.mixed_precision}'")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it: CPU + gloo
    out = shared_output_dir(tc.output_dir, bool(resume), state)

    trackers = ["tensorboard"] if tc.tensorboard else []
    if tc.wandb:
        trackers.append("wandb")
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise DiffalignError(
            f"train: {accelerator.distributed_type.value} is not supported yet (checkpoints, the LoRA file and the "
            "adapters-off reference assume replicated parameters and a torch optimizer); launch with DDP, e.g. "
            "--config_file configs/accelerate/ddp_multi_gpu.yaml"
        )
    set_seed(tc.seed)
    main = accelerator.is_main_process

    # ---- model, LoRA, objective -------------------------------------------------------------------------------
    generates = bool(cfg.eval.prompts) or bool(tc.validate_every and tc.validation_prompts)
    family = load_model(  # a finished cache trains without the encoders
        cfg.model, load_encoders=generates or not cache_ready(cfg.data), lora=cfg.lora, device=accelerator.device
    )
    resolution = cfg.model.resolution or family.resolution
    family.set_resolution(resolution)  # FLUX: the schedule's shift depends on the image size
    family.denoiser.to(accelerator.device)
    if tc.gradient_checkpointing:
        family.enable_gradient_checkpointing()
    if tc.xformers:  # SDPA is every family's default
        family.use_attention("xformers")
    targets = lora_targets(family, cfg.lora.preset, cfg.lora.target_modules)
    params = add_lora(family.denoiser, cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.init)
    named_params = {n: p for n, p in family.denoiser.named_parameters() if p.requires_grad}
    objective = build_objective(cfg.objective)
    schedule = Schedule(family.scheduler, family.prediction_type)
    denoiser = family.denoiser  # the unwrapped module: adapters are switched on it
    reference = (lambda: reference_mode(denoiser)) if objective.needs_reference else None

    # ---- data ---------------------------------------------------------------------------------------------------
    if main and cache_ready(cfg.data) and not generates:
        print(f"training from the cache {cfg.data.cache_dir}: VAE and text encoders not loaded")
    pairs = open_pairs(  # every process encodes its share of a missing cache, then all read it
        cfg.data,
        family,
        resolution,
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
    optimizer_cls = torch.optim.AdamW
    if tc.adam_8bit:
        import bitsandbytes as bnb  # optional extra `bnb` (GPU)

        optimizer_cls = bnb.optim.AdamW8bit
    optimizer = optimizer_cls(params, lr=tc.lr, weight_decay=tc.weight_decay)
    lr_scheduler = get_scheduler(
        tc.lr_schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.max_steps
    )

    # ---- resume -------------------------------------------------------------------------------------------------
    ckpt_dir = out / "checkpoints"
    start_step, position, path, saved = 0, 0, None, None
    counts = {"skipped_steps": 0, "skipped_rows": 0, "bad_in_a_row": 0}  # identical on every process
    sums: dict[str, float] = {}  # metric sums since the last log line, over every process
    if resume == "latest" and not list_checkpoints(ckpt_dir):
        if main:
            print(f"--resume latest: no checkpoint under {ckpt_dir} yet; starting at step 0")
    elif resume:
        path = resolve_resume(resume, ckpt_dir)
        saved = load_checkpoint(path, named_params, optimizer, lr_scheduler, {})
        start_step, position, sums = saved["step"], saved["data_position"], saved["log_sums"]
        counts = {k: saved[k] for k in counts}
        if accelerator.scaler is not None:  # fp16: the loss scale it had reached
            accelerator.scaler.load_state_dict(saved["grad_scaler"])
        if main:
            print(f"resumed from {path} at step {start_step}")
    if resume and main:
        truncate_metrics(out / "metrics.jsonl", start_step)
        truncate_metrics(out / "curves.jsonl", start_step)

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
        worker_init_fn=_ignore_stop_signals,
        generator=torch.Generator().manual_seed(tc.seed),  # iter() draws its base seed here, not from the global RNG
    )
    prepared, optimizer = accelerator.prepare(denoiser, optimizer)  # DDP wrapper when multi-process
    ctx = step_context(
        accelerator,
        family,
        prepared,
        source,
        tc,
        objective=objective,
        schedule=schedule,
        reference=reference,
        estimator=cfg.estimator,
        params=params,
        optimizer=optimizer,
    )

    if main:
        save_config(cfg, out / "config.yaml")
        write_run_record(out, resolved_config=to_dict(cfg), resumed_from=str(resume) or None)
    tb = {"tensorboard": {"purge_step": start_step + 1}} if start_step else {}  # hide events a killed run logged
    accelerator.init_trackers("diffalign", config=_flat_hparams(cfg), init_kwargs=tb)
    want_curves = main and 0 < tc.validate_every <= tc.max_steps and cfg.eval.prompts  # 2+ points: step 0 and one
    curves = Curves(family, cfg.eval, out / "curves.jsonl") if want_curves else None
    if curves and start_step == 0:
        curves.point(0, accelerator)  # the LoRA is zero: the base model
    guard = GuardRun.build(cfg.guards, family, cfg.eval.scorers[0], named_params, out, accelerator, unit="step")
    if guard:
        if main:
            truncate_metrics(out / "guards.jsonl", start_step)
        guard.start(path, saved)

    # ---- loop ---------------------------------------------------------------------------------------------------
    stop = StopFlag()
    data_iter = iter(loader)
    bar = tqdm(total=tc.max_steps, initial=start_step, desc="train", disable=not main, dynamic_ncols=True)
    step = start_step
    t0 = time.time()
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
                tensor_sums = micro_step(accelerator, prepared, ctx, batch_data, tensor_sums)
            losses_finite, grads_finite = finish_step(accelerator, ctx, tensor_sums)
            step_sums = {**read_sums(tensor_sums), "n": float(tc.grad_accum), "skipped_rows": float(skipped_rows)}
            step_sums["stop"] = float(stop.signal is not None)
            step_sums = sum_over_processes(accelerator, step_sums)  # one small all-reduce per step
            stopping = step_sums.pop("stop") > 0  # a signal that reached any process stops them all
            counts["skipped_rows"] += int(step_sums.pop("skipped_rows"))
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v

            step += 1
            lr_scheduler.step()
            bar.update(1)
            where, hint = f"step {step} (pair indices {ids})", "lower train.lr or objective.beta, or check the data"
            count_bad(counts, losses_finite, grads_finite, accelerator.scaler, where, hint)
            if step % tc.log_every == 0 or step == tc.max_steps:
                n = sums.pop("n")
                logs = {k: v / n for k, v in sums.items()}
                logs.update(
                    lr=lr_scheduler.get_last_lr()[0],
                    skipped_steps=counts["skipped_steps"],
                    skipped_rows=counts["skipped_rows"],
                    steps_per_s=(step - start_step) / (time.time() - t0),
                )
                accelerator.log(logs, step=step)
                if main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **logs}) + "\n")
                bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('implicit_acc', 0):.2f}")
                sums = {}
            if tc.validate_every and step % tc.validate_every == 0 and main and tc.validation_prompts:
                validate(family, tc.validation_prompts, out / "validation" / f"step-{step:06d}.png", accelerator, step)
            if curves and step % tc.validate_every == 0:
                curves.point(step, accelerator)
            tripped = bool(guard and guard.due(step, tc.max_steps) and guard.check(step))  # before the save
            want_ckpt = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or stopping
            if want_ckpt and main and step < tc.max_steps:
                guard_state, guard_tensors = guard.checkpoint_parts() if guard else ({}, {})
                save_checkpoint(
                    ckpt_dir,
                    step,
                    named_params,
                    optimizer,
                    lr_scheduler,
                    {},
                    {"data_position": position, "log_sums": sums, "grad_scaler": scaler_state(accelerator), **counts,
                     **guard_state},
                    keep=tc.keep_checkpoints,
                    tensors=guard_tensors,
                )  # fmt: skip
            if tripped:
                break  # a reward-hacking guard tripped: keep the best passing weights (pipelines/guarding.py)
            if stopping and step < tc.max_steps:  # a signal during the last step: just finish
                accelerator.wait_for_everyone()  # a launcher kills the others when one process exits
                bar.close()
                name = stop.signal or "stop signal on another process"
                if main:
                    print(f"{name}: saved checkpoint at step {step}; resume with --resume latest", flush=True)
                raise SystemExit(143 if stop.signal != "SIGINT" else 130)
    finally:
        stop.restore()
        bar.close()

    # ---- outputs ------------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    lora_dir = out / "lora"
    guard_info = {"guards": guard.finish()} if guard else {}
    if main:
        save_lora(family, lora_dir, metadata={"base_model": cfg.model.path, "objective": cfg.objective.name})
        summary = {"steps": step, "resumed_at": start_step, "train_seconds": time.time() - t0, **counts, **guard_info}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"saved LoRA to {lora_dir} ({step} steps in {time.time() - t0:.0f}s; {counts['skipped_steps']} "
            f"non-finite steps skipped, {counts['skipped_rows']} bad rows skipped)"
        )
    accelerator.end_training()
    if curves:
        plot_curves(curves.path, out / "metrics.jsonl", out / "eval" / "curves.png", curves.label)
    if main and cfg.eval.prompts:
        evaluate_base_vs_lora(family, cfg.eval, out / "eval")
    return out


def check_soft_labels(objective, name: str, dcfg) -> None:
    """An objective that weighs pairs by a smoothed preference (SmPO) needs a scorer's p, not 0/1 labels."""
    if getattr(objective, "soft_labels", False) and not objective.hard_labels:
        if not (dcfg.label_scorer and dcfg.label_mode == "smpo"):
            raise DiffalignError(
                f"objective '{name}' needs smoothed labels: set data.label_scorer=<scorer> data.label_mode=smpo "
                "(e.g. configs/sdxl_smpo.yaml), or objective.hard_labels=true to train on 0/1 labels"
            )


def scaler_state(accelerator) -> dict | None:
    """fp16's GradScaler state (scale, growth tracker: JSON numbers), None without one."""
    return accelerator.scaler.state_dict() if accelerator.scaler is not None else None


def shared_output_dir(path: str, resume: bool, state: PartialState, default_name: str = "run") -> Path:
    """The main process checks and creates the output folder; the others get its name (a default one is timed)."""
    reply = [None]
    if state.is_main_process:
        try:
            reply = [("ok", str(prepare_output_dir(path, resume=resume, default_name=default_name)))]
        except DiffalignError as err:
            reply = [("error", str(err))]
    if state.num_processes > 1:
        broadcast_object_list(reply)
    kind, text = reply[0]
    if kind == "error":
        raise DiffalignError(text)
    return Path(text)


def truncate_metrics(path: Path, step: int, key: str = "step") -> None:
    """Keep the log rows whose `key` (step, or round for `diffalign online`) is <= `step`, what the checkpoint saw: a
    killed run may have logged later steps, or half a line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get(key), int) and row[key] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which finishes the step and saves."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def validate(family, prompts, path: Path, accelerator, step: int) -> None:
    images = family.generate(prompts, seeds=list(range(len(prompts))))
    save_grid(images, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )


def _flat_hparams(cfg: RunConfig) -> dict:
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat
