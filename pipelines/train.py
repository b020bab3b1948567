"""`diffalign train [CONFIG.yaml] [a.b=value ...] [--resume latest|PATH]`: LoRA preference alignment.

Read top to bottom: resolve the config -> load the model family -> add LoRA -> open the pairs (raw or cached) ->
loop (shared estimator -> objective -> accelerate backward/step) with checkpoints, tensorboard scalars and
validation images -> save the LoRA (diffusers format), the resolved config and the run record -> compare base vs
aligned on held-out prompts. With no config it aligns the shipped toy model on the toy preference pairs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffalign.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from diffalign.config import RunConfig, load_config, save_config, to_dict
from diffalign.data import collate
from diffalign.data.sampler import EpochView, ResumableSampler
from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule, denoising_errors, pair_noise, pair_timesteps, sample_timesteps
from diffalign.lora import add_lora, reference_mode, save_lora
from diffalign.objectives import OBJECTIVES
from diffalign.runinfo import write_run_record
from pipelines.common import build_objective, cache_ready, load_model, open_pairs, prepare_output_dir, save_grid
from pipelines.evaluate import evaluate_base_vs_lora


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
    out = prepare_output_dir(tc.output_dir, resume=bool(resume))
    if cfg.objective.name not in OBJECTIVES:
        raise DiffalignError(f"unknown objective '{cfg.objective.name}' (known: {', '.join(OBJECTIVES)})")
    if tc.mixed_precision not in ("no", "bf16", "fp16"):
        raise DiffalignError(f"train.mixed_precision must be no, bf16 or fp16, not '{tc.mixed_precision}'")

    trackers = ["tensorboard"] if tc.tensorboard else []
    if tc.wandb:
        trackers.append("wandb")
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(tc.seed)
    main = accelerator.is_main_process

    # ---- model, LoRA, objective -------------------------------------------------------------------------------
    generates = bool(cfg.eval.prompts) or bool(tc.validate_every and tc.validation_prompts)
    family = load_model(
        cfg.model, load_encoders=generates or not cache_ready(cfg.data)
    )  # a finished cache trains without them
    resolution = cfg.model.resolution or family.resolution
    family.denoiser.to(accelerator.device)
    if tc.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
    if tc.xformers:
        family.use_attention("xformers")
    params = add_lora(family.denoiser, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.init)
    named_params = {n: p for n, p in family.denoiser.named_parameters() if p.requires_grad}
    objective = build_objective(cfg.objective)
    schedule = Schedule(family.scheduler, family.prediction_type)
    denoiser = family.denoiser  # the unwrapped module: adapters are switched on it
    reference = (lambda: reference_mode(denoiser)) if objective.needs_reference else None
    xt_source = objective.xt_source

    # ---- data ---------------------------------------------------------------------------------------------------
    if main and cache_ready(cfg.data) and not generates:
        print(f"training from the cache {cfg.data.cache_dir}: VAE and text encoders not loaded")
    with accelerator.main_process_first():  # one process builds the cache; the others then reuse it
        pairs = open_pairs(cfg.data, family, resolution, seed=tc.seed, cfg_model=cfg.model, progress=main, work_dir=out)
    start_step, start_position = 0, 0
    optimizer_cls = torch.optim.AdamW
    if tc.adam_8bit:
        import bitsandbytes as bnb  # optional extra `bnb` (GPU)

        optimizer_cls = bnb.optim.AdamW8bit
    optimizer = optimizer_cls(params, lr=tc.lr, weight_decay=tc.weight_decay)
    lr_scheduler = get_scheduler(
        tc.lr_schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.max_steps
    )
    noise_gen = torch.Generator().manual_seed(tc.seed * 1000 + accelerator.process_index)
    generators = {"noise": noise_gen}
    ckpt_dir = out / "checkpoints"
    if resume:
        path = resolve_resume(resume, ckpt_dir)
        state = load_checkpoint(path, named_params, optimizer, lr_scheduler, generators)
        start_step, start_position = state["step"], state["data_position"]
        if main:
            print(f"resumed from {path} at step {start_step}")

    batch = tc.batch_size
    sampler = ResumableSampler(
        len(pairs),
        seed=tc.seed,
        start=start_position,
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
    )
    prepared, optimizer = accelerator.prepare(denoiser, optimizer)  # DDP wrapper when multi-process

    if main:
        save_config(cfg, out / "config.yaml")
        write_run_record(out, resolved_config=to_dict(cfg), resumed_from=str(resume) or None)
    accelerator.init_trackers("diffalign", config=_flat_hparams(cfg))

    # ---- loop ---------------------------------------------------------------------------------------------------
    stop = StopFlag()
    data_iter = iter(loader)
    position = start_position
    bad_in_a_row, skipped, bad_rows = 0, 0, 0
    bar = tqdm(total=tc.max_steps, initial=start_step, desc="train", disable=not main, dynamic_ncols=True)
    sums: dict[str, float] = {}
    step = start_step
    t0 = time.time()
    try:
        while step < tc.max_steps:
            for _ in range(tc.grad_accum):
                batch_data = next(data_iter)
                position += batch * accelerator.num_processes
                bad_rows += batch_data["skipped"]
                while "label" not in batch_data:  # every pair of the batch was an opted-in skip
                    batch_data = next(data_iter)
                    position += batch * accelerator.num_processes
                    bad_rows += batch_data["skipped"]
                with accelerator.accumulate(prepared):
                    x0, cond, label = family_inputs(family, batch_data, accelerator.device)
                    t, eps = draw_t_and_eps(objective.paired, x0, schedule, noise_gen, cfg.estimator)
                    errors = denoising_errors(family.denoise, schedule, x0, cond, t, eps, reference, xt_source)
                    loss, metrics = objective(errors.err, errors.ref_err, label)
                    loss = loss.mean()
                    finite = bool(torch.isfinite(loss))
                    if finite:
                        accelerator.backward(loss)
                    if accelerator.sync_gradients and finite and tc.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    grads_ok = finite and all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
                    if grads_ok:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss.detach(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.float().mean())
                sums["n"] = sums.get("n", 0) + 1
            if not grads_ok:
                skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row >= 5:
                    ids = batch_data.get("index")
                    raise DiffalignError(
                        f"non-finite loss or gradients for {bad_in_a_row} steps in a row at step {step + 1} (batch ids {ids.tolist() if ids is not None else '?'})"
                    )
            else:
                bad_in_a_row = 0
            lr_scheduler.step()
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                n = sums.pop("n")
                logs = {k: v / n for k, v in sums.items()}
                logs.update(
                    lr=lr_scheduler.get_last_lr()[0],
                    skipped_steps=skipped,
                    skipped_rows=bad_rows,
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
            want_ckpt = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or stop.signal
            if want_ckpt and main and step < tc.max_steps:
                save_checkpoint(
                    ckpt_dir,
                    step,
                    named_params,
                    optimizer,
                    lr_scheduler,
                    generators,
                    {"data_position": position, "skipped_steps": skipped},
                    keep=tc.keep_checkpoints,
                )
            if stop.signal:
                bar.close()
                if main:
                    print(f"{stop.signal}: saved checkpoint at step {step}; resume with --resume latest")
                raise SystemExit(143 if stop.signal == "SIGTERM" else 130)
    finally:
        stop.restore()
        bar.close()

    # ---- outputs ------------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    lora_dir = out / "lora"
    if main:
        save_lora(family, lora_dir, metadata={"base_model": cfg.model.path, "objective": cfg.objective.name})
        summary = {"steps": step, "resumed_at": start_step, "train_seconds": time.time() - t0,
                   "skipped_steps": skipped, "bad_rows": bad_rows}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"saved LoRA to {lora_dir} ({step} steps in {time.time() - t0:.0f}s; {skipped} non-finite steps skipped, "
            f"{bad_rows} bad rows skipped)"
        )
    accelerator.end_training()
    if main and cfg.eval.prompts:
        evaluate_base_vs_lora(family, cfg.eval, out / "eval")
    return out


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


def family_inputs(family, batch, device):
    from diffalign.data.batches import model_inputs

    x0, cond, label = model_inputs(family, batch)
    return x0.to(device), {k: v.to(device) for k, v in cond.items()}, label.to(device)


def validate(family, prompts, path: Path, accelerator, step: int) -> None:
    images = family.generate(prompts, seeds=list(range(len(prompts))))
    save_grid(images, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

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
