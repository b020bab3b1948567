"""The one `Run` both training programs (`diffalign train`, `diffalign online`) and benchmarks/train_step.py build on.

A program reads its config, then calls, in order:

    run = Run(cfg, cfg.train, resume, unit="step"|"round", ...)                accelerator, output folder, seed
    family = run.load_model(...)                                                family, LoRA, named adapters
    run.build_optimizer(total_steps)                                            AdamW (or 8-bit), LR schedule
    saved = run.resume(counts)                                                  checkpoint -> params, optimizer
    ctx = run.prepare(source, objective=..., ...)                               accelerate prepare + StepContext
    run.begin(scorer)                                                           config, record, trackers, curves,
                                                                                guards, SIGTERM/SIGINT flag
    loop:  micro_step / finish_step (engine.step) ... run.after(n) ... run.save(n, extra) ... run.stop_if_asked(n)
    run.finish(metadata, summary)                                               LoRA, summary, curves, evaluation

so setup, resume, signals, schedules, trackers, guards, curves, checkpoints and the final outputs exist once, and a
program's loop differs from the other's only in where its micro-batches come from (a data loader or a round).
`opt` is the `train` section, whose shared keys (diffalign.config.OptimConfig) both programs have: output_dir, seed,
lr, lr_schedule, warmup_steps, weight_decay, adam_8bit, grad_accum, max_grad_norm, mixed_precision,
gradient_checkpointing, xformers, keep_checkpoints, validate_every, tensorboard, wandb.

Sharding: an accelerate config with FSDP2 (configs/accelerate/fsdp.yaml) shards the denoiser per block right after its
adapters are added (diffalign.engine.sharding); the parameters, the optimizer state, the forwards (reference and
named adapters included) and the step are then the same code on DTensors, and checkpoints and the LoRA file are
gathered once and written by rank 0 in the usual formats. Every image drawn outside the rounds (the held-out
evaluation and DRAGON's FD on it, the curve points, the guards' checks, validation images) is drawn by every process,
a share each, and scored by the main process (`Run.generate`): generation on the main process alone would stall the
other processes' all-gathers. 8-bit AdamW and a quantized base are refused (their tensors are not DTensors).
DeepSpeed is refused with one line: for LoRA on a frozen base ZeRO-2 shards only the gradients and the optimizer
state, a few MB, and ZeRO-3 would need its own checkpoint and reference paths; FSDP2 shards the frozen base, which is
what does not fit. `train.compile` is refused too, until compiled sharded blocks are tested.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from diffalign.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from diffalign.config import save_config, to_dict
from diffalign.engine.common import load_model
from diffalign.engine.compiling import COMPILE
from diffalign.engine.curves import Curves, plot_curves
from diffalign.engine.evaluate import evaluate_base_vs_lora, generate_pair_sets, read_eval_prompts
from diffalign.engine.guarding import GuardRun
from diffalign.engine.outputs import StopFlag, flat_hparams, scaler_state, shared_output_dir, truncate_metrics
from diffalign.engine.sharding import (
    fsdp_requested,
    full_optimizer_state,
    full_tensors,
    generate_shared,
    param_bytes,
    peak_memory,
    place_like,
    shard_denoiser,
)
from diffalign.engine.step import step_context, sum_over_processes
from diffalign.errors import DiffalignError
from diffalign.lora import (
    adapter_mode,
    add_adapter_copy,
    add_lora,
    copy_policy_to_ref,
    lora_targets,
    lora_weights,
    reference_mode,
    save_lora,
)
from diffalign.runinfo import write_run_record


class Run:
    def __init__(self, cfg, opt, resume: str, *, unit: str, log_file: str, default_name: str, grad_accum: int):
        """Accelerator (mixed precision, accumulation, trackers), the shared output folder and the global seed.

        unit: "step" or "round", what the log rows, curves, guards and checkpoints count; log_file: their JSONL.
        """
        self.cfg, self.opt, self.resume_from, self.unit = cfg, opt, resume, unit
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it: CPU + gloo
        self.out = shared_output_dir(opt.output_dir, bool(resume), state, default_name=default_name)
        self.log_path = self.out / log_file
        trackers = (["tensorboard"] if opt.tensorboard else []) + (["wandb"] if opt.wandb else [])
        self.accelerator = Accelerator(
            mixed_precision=opt.mixed_precision,
            gradient_accumulation_steps=grad_accum,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise DiffalignError(
                "DeepSpeed is not used by diffalign (ZeRO shards the LoRA's few MB of optimizer state, not the frozen "
                "base): shard with FSDP2, --config_file configs/accelerate/fsdp.yaml"
            )
        self.sharded = fsdp_requested()  # the denoiser is sharded in load_model, before the optimizer exists
        if self.sharded:
            check_shardable(cfg, opt)
        set_seed(opt.seed)
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.start, self.saved, self.path = 0, None, None
        self.counts = {"skipped_steps": 0, "bad_in_a_row": 0}
        self.curves = self.guard = self.stop = self.bar = None
        self.t0 = time.time()

    # ---- model --------------------------------------------------------------------------------------------------
    def load_model(self, load_encoders: bool = True, whole_family: bool = False, reference: str = "base",
                   old_adapter: bool = False, family=None):  # fmt: skip
        """The family with LoRA on its denoiser, on the device (`whole_family`: the encoders and VAE too); `family`:
        one built elsewhere and already on the device (benchmarks/train_step.py's random-weight sizes).

        reference: "none", "base" (the same network with its adapters off) or "adapter" (a second LoRA adapter
        "ref", a copy of the policy that the program refreshes); old_adapter: an "old" adapter, an EMA of the
        policy (DiffusionNFT). Every named adapter is part of the checkpoint and kept in fp32.
        """
        cfg, opt = self.cfg, self.opt
        if family is None:
            family = load_model(cfg.model, load_encoders=load_encoders, lora=cfg.lora, device=self.device)
            family.set_resolution(cfg.model.resolution or family.resolution)  # FLUX: the shift depends on the size
            for module in (family,) if whole_family else family.denoising_modules():
                module.to(self.device)
            self.restrict_timesteps(family)
        if family.num_frames is not None and cfg.eval.prompts:
            raise DiffalignError(f"eval.prompts: the {family.name} videos are not evaluated yet; set eval.prompts=")
        if opt.gradient_checkpointing:
            family.enable_gradient_checkpointing()
        if opt.xformers:  # SDPA is every family's default
            family.use_attention("xformers")
        denoiser = self.denoiser = family.denoiser  # the unwrapped module: adapters are switched on it
        targets = lora_targets(family, cfg.lora.preset, cfg.lora.target_modules)
        self.params = add_lora(denoiser, cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.init)
        self.named_params = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
        self.ckpt_params = dict(self.named_params)  # what a checkpoint holds: the policy and the named adapters
        self.ref_params = self.old_params = None
        if reference == "adapter":
            self.ref_params = add_adapter_copy(denoiser, "ref")
            copy_policy_to_ref(self.named_params, self.ref_params)
            self.ckpt_params.update(self.ref_params)
            self.reference = lambda: adapter_mode(denoiser, "ref")
        elif reference == "base":
            self.reference = lambda: reference_mode(denoiser)
        else:
            self.reference = None
        if old_adapter:
            from diffalign.online.old_policy import OLD_ADAPTER, update_old

            self.old_params = add_adapter_copy(denoiser, OLD_ADAPTER)
            update_old(self.named_params, self.old_params, 0.0)
            self.ckpt_params.update(self.old_params)
        if self.sharded:
            self.shard(family.shard_blocks)
        if opt.compile != "none":  # after sharding: the compiled code then includes FSDP2's gathers
            count = COMPILE[opt.compile](denoiser, family.shard_blocks)
            self.accelerator.print(
                f"train.compile={opt.compile}: {count} module(s) of the denoiser compile at first use"
            )
        self.family = family
        return family

    def restrict_timesteps(self, family) -> None:
        """A two-expert family's trained expert denoises part of the schedule only: the estimator's t range
        (`estimator.t_min` / `t_max`) is narrowed to it, so every training draw reaches the LoRA."""
        span = family.expert_timesteps()
        if span is None:
            return
        est = self.cfg.estimator
        lo, hi = max(est.t_min, span[0]), min(est.t_max or span[1], span[1])
        if lo >= hi:
            raise DiffalignError(
                f"estimator.t_min/t_max [{est.t_min}, {est.t_max}) miss the {family.expert} expert's timesteps "
                f"[{span[0]}, {span[1]})"
            )
        est.t_min, est.t_max = lo, hi
        if self.main:
            print(f"{family.name}: training the {family.expert}-noise expert at t in [{lo}, {hi})")

    def shard(self, blocks: tuple[str, ...]) -> None:
        """FSDP2: shard the denoiser per block, then re-read the parameters (now DTensors) the optimizer, the
        checkpoints and the adapter copies use; log this process's share of the frozen base."""
        denoiser = self.denoiser
        count = shard_denoiser(denoiser, blocks, self.opt.mixed_precision)
        named = dict(denoiser.named_parameters())

        def sharded(params: dict | None) -> dict | None:
            return None if params is None else {n: named[n] for n in params}

        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.named_params, self.ckpt_params = sharded(self.named_params), sharded(self.ckpt_params)
        self.ref_params, self.old_params = sharded(self.ref_params), sharded(self.old_params)
        local, total = param_bytes(denoiser)
        print(
            f"[rank {self.accelerator.process_index}] FSDP2: {count} blocks + root sharded over "
            f"{self.accelerator.num_processes} processes; frozen base {local / 2**20:.2f} of {total / 2**20:.2f} MiB",
            flush=True,
        )

    def build_optimizer(self, total_steps: int) -> None:
        """AdamW (bitsandbytes' 8-bit AdamW with `adam_8bit`) and the LR schedule over `total_steps` steps."""
        from diffusers.optimization import get_scheduler

        opt = self.opt
        optimizer_cls = torch.optim.AdamW
        if opt.adam_8bit:
            import bitsandbytes as bnb  # optional extra `bnb` (GPU)

            optimizer_cls = bnb.optim.AdamW8bit
        self.optimizer = optimizer_cls(self.params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.lr_scheduler = get_scheduler(
            opt.lr_schedule, self.optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=total_steps
        )

    # ---- resume -------------------------------------------------------------------------------------------------
    def resume(self, counts: dict | None = None) -> dict:
        """Load `--resume` (latest | PATH) into the parameters, optimizer, schedule and counters; cut the log rows
        newer than the checkpoint. `counts`: the program's own counters besides skipped_steps / bad_in_a_row.
        Returns the checkpoint's state ({} when starting fresh); `self.start` is its step or round."""
        self.counts.update(counts or {})
        ckpt_dir, main = self.out / "checkpoints", self.main
        if self.resume_from == "latest" and not list_checkpoints(ckpt_dir):
            if main:
                print(f"--resume latest: no checkpoint under {ckpt_dir} yet; starting at {self.unit} 0")
        elif self.resume_from:
            self.path = resolve_resume(self.resume_from, ckpt_dir)
            self.saved = load_checkpoint(
                self.path, self.ckpt_params, self.optimizer, self.lr_scheduler, {},
                place=place_like if self.sharded else None,
            )  # fmt: skip
            self.start = self.saved["step"]
            self.counts = {k: self.saved[k] for k in self.counts}
            if self.accelerator.scaler is not None:  # fp16: the loss scale it had reached
                self.accelerator.scaler.load_state_dict(self.saved["grad_scaler"])
            if main:
                print(f"resumed from {self.path} at {self.unit} {self.start}")
        if self.resume_from and main:
            truncate_metrics(self.log_path, self.start, key=self.unit)
            truncate_metrics(self.out / "curves.jsonl", self.start)
            truncate_metrics(self.out / "guards.jsonl", self.start, key=self.unit)
        return self.saved or {}

    def prepare(self, source, **fields):
        """accelerate's prepare (the DDP wrapper when multi-process; FSDP2: the sharded module itself and the torch
        optimizer, untouched) and the StepContext of the shared step."""
        if self.sharded:
            self.prepared = self.denoiser
        else:
            self.prepared, self.optimizer = self.accelerator.prepare(self.denoiser, self.optimizer)
        self.ctx = step_context(
            self.accelerator, self.family, self.prepared, source, self.opt, reference=self.reference,
            params=self.params, optimizer=self.optimizer, **fields,
        )  # fmt: skip
        return self.ctx

    # ---- the loop's services ------------------------------------------------------------------------------------
    def begin(self, scorer, total: int, project: str) -> None:
        """Write the resolved config and run record, start the trackers, the held-out curves (point 0 = the base),
        the reward-hacking guards and the SIGTERM/SIGINT flag; `total` steps or rounds; `scorer` ranks the guards'
        passing checks (a scorer or a scorer name)."""
        cfg, main = self.cfg, self.main
        if main:
            save_config(cfg, self.out / "config.yaml")
            write_run_record(self.out, resolved_config=to_dict(cfg), resumed_from=str(self.resume_from) or None)
        tb = {"tensorboard": {"purge_step": self.start + 1}} if self.start else {}  # hide events a killed run logged
        self.accelerator.init_trackers(project, config=flat_hparams(to_dict(cfg)), init_kwargs=tb)
        every = self.opt.validate_every
        if (main or self.sharded) and 0 < every <= total and cfg.eval.prompts:  # 2+ points: 0 and at least one more
            self.curves = Curves(self.family, cfg.eval, self.out / "curves.jsonl", self.generate, main)
            if self.start == 0:
                self.curves.point(0, self.accelerator)  # the LoRA is zero: the base model
        self.guard = GuardRun.build(
            cfg.guards,
            self.family,
            scorer,
            self.named_params,
            self.out,
            self.accelerator,
            unit=self.unit,
            generate=self.generate if self.sharded else None,
        )
        if self.guard:
            self.guard.start(self.path, self.saved)
        self.total = total
        self.stop = StopFlag()
        self.bar = tqdm(total=total, initial=self.start, desc=self.unit + "s", disable=not main, dynamic_ncols=True)
        self.t0 = time.time()  # train_seconds and steps_per_s count the loop, not the set-up

    def log(self, n: int, logs: dict) -> None:
        """One row at step / round n: the trackers and the JSONL log (main process)."""
        self.accelerator.log(logs, step=n)
        if self.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({self.unit: n, **logs}) + "\n")

    def stopping(self) -> bool:
        """Whether a stop signal reached any process (one small all-reduce)."""
        return sum_over_processes(self.accelerator, {"stop": float(self.stop.signal is not None)})["stop"] > 0

    def after(self, n: int) -> bool:
        """After step / round n: a held-out curve point when due, then the guards' check (before the save).
        True when a guard tripped: the program saves and stops (the kept weights go into the LoRA)."""
        every = self.opt.validate_every
        if self.curves and every and n % every == 0:
            self.curves.point(n, self.accelerator)
        return bool(self.guard and self.guard.due(n, self.total) and self.guard.check(n))

    def save(self, n: int, extra: dict) -> None:
        """Checkpoint n (main process): parameters and named adapters, optimizer, schedule, counters, fp16's scaler,
        the guards' kept copy, and the program's `extra` state. Every process calls it: FSDP2 gathers the sharded
        tensors first (collectives), so the files are those of an unsharded run."""
        params, optimizer = self.ckpt_params, self.optimizer
        if self.sharded:
            params, optimizer = full_tensors(params), full_optimizer_state(optimizer)
        guard_state, guard_tensors = self.guard.checkpoint_parts() if self.guard else ({}, {})
        if not self.main:
            return
        save_checkpoint(
            self.out / "checkpoints", n, params, optimizer, self.lr_scheduler, {},
            {**extra, "grad_scaler": scaler_state(self.accelerator), **self.counts, **guard_state},
            keep=self.opt.keep_checkpoints, tensors=guard_tensors,
        )  # fmt: skip

    def exit_stopped(self, n: int, saved: bool = True) -> None:
        """Leave after a stop signal with 143 (SIGTERM) or 130 (SIGINT); every process reaches this together."""
        self.accelerator.wait_for_everyone()  # a launcher kills the others when one process exits
        self.bar.close()
        name = self.stop.signal or "stop signal on another process"
        if self.main:
            what = f"saved checkpoint at {self.unit} {n}" if saved else f"the last checkpoint is {self.unit} {n}"
            print(f"{name}: {what}; resume with --resume latest", flush=True)
        raise SystemExit(self.stop.exit_code)

    def close_loop(self) -> None:
        if self.stop:
            self.stop.restore()
        if self.bar:
            self.bar.close()

    # ---- outputs ------------------------------------------------------------------------------------------------
    def finish(self, metadata: dict, summary: dict, plot: tuple = (), extra_eval: Callable | None = None) -> dict:
        """The LoRA (the guards' kept weights when one tripped), summary.json, the curves and the held-out base vs
        aligned evaluation. `plot`: plot_curves' (keys, unit) for the log; `extra_eval(family, pairs)` -> more results
        (`pairs`: the evaluation's images, drawn once for both)."""
        self.close_loop()
        accelerator, cfg = self.accelerator, self.cfg
        accelerator.wait_for_everyone()
        guard_info = {"guards": self.guard.finish()} if self.guard else {}
        summary = {**summary, "resumed_at": self.start, "train_seconds": time.time() - self.t0, **self.counts}
        summary.update(guard_info)
        weights = full_tensors(lora_weights(self.family)) if self.sharded else None  # gathered once, every process
        if self.main:
            save_lora(self.family, self.out / "lora", {"base_model": cfg.model.path, **metadata}, weights=weights)
        summary["memory"] = self.memory()
        pairs = None  # sharded: every process draws its share of the evaluation's images, while the group exists
        if self.sharded and cfg.eval.prompts:
            pairs = generate_pair_sets(self.family, read_eval_prompts(cfg.eval), cfg.eval, generate=self.generate)
        accelerator.end_training()
        if not self.main:
            return summary
        if self.curves:
            plot_curves(self.curves.path, self.log_path, self.out / "eval" / "curves.png", self.curves.label, *plot)
        if cfg.eval.prompts:
            if pairs is None:  # drawn once: the report and an extra evaluation (DRAGON's FD) score the same images
                pairs = generate_pair_sets(self.family, read_eval_prompts(cfg.eval), cfg.eval)
            summary["eval"] = evaluate_base_vs_lora(self.family, cfg.eval, self.out / "eval", pairs=pairs)
            if extra_eval:
                summary.update(extra_eval(self.family, pairs))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def memory(self) -> list[dict]:
        """Each process's bytes of the frozen base's parameters (its shard under FSDP2) and its peak memory, printed
        by every process and returned (gathered, in rank order) for summary.json."""
        local, total = param_bytes(self.denoiser)
        peak, measure = peak_memory(self.device)
        rank = self.accelerator.process_index
        print(
            f"[rank {rank}] memory: frozen base parameters {local / 2**20:.2f} MiB (of {total / 2**20:.2f}), "
            f"peak {peak / 2**20:.0f} MiB ({measure})",
            flush=True,
        )
        row = {"rank": rank, "base_param_bytes": local, "base_param_bytes_total": total, "peak_bytes": peak,
               "peak_measure": measure}  # fmt: skip
        return gather_object([row]) if self.accelerator.num_processes > 1 else [row]

    def generate(self, prompts: list[str], seeds: list[int], kw: dict):
        """Images outside the rounds (evaluation, curves): every process draws a share under FSDP2 and the main
        process gets them all (the others None); otherwise the calling process draws them all."""
        if self.sharded:
            return generate_shared(self.family, self.accelerator, prompts, seeds, kw)
        return self.family.generate(prompts, seeds=seeds, **kw)

    @property
    def seconds(self) -> float:
        return time.time() - self.t0


def check_shardable(cfg, opt) -> None:
    """Under FSDP2 every parameter is a DTensor: refuse what cannot hold one (bitsandbytes' 8-bit AdamW state, a
    quantized base's packed weights), and what is not tested sharded yet (compiled blocks), in one line."""
    unshardable = {
        "train.adam_8bit": (opt.adam_8bit, "bitsandbytes' 8-bit state is not sharded; plain AdamW's state is"),
        "model.quantize": (cfg.model.quantize != "none", "quantized weights cannot be DTensors; shard the bf16 base"),
        "train.compile": (opt.compile != "none", "compiled blocks are not tested sharded yet; compile unsharded runs"),
    }
    for key, (on, why) in unshardable.items():
        if on:
            raise DiffalignError(f"{key}: not available with FSDP2 sharding ({why})")
