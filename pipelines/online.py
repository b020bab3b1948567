"""`diffalign online [CONFIG.yaml] [a.b=value ...] [--resume latest|PATH]`: on-policy alignment in rounds.

Read top to bottom: resolve the config -> load the model family -> add LoRA (and a "ref" adapter if the reference
is refreshed) -> build the reward (instance, distribution-level or exemplar-set) -> rounds of
    sample P prompt groups x G images (DDIM-eta, trajectories kept) -> score -> pairs / sets -> K optimizer steps
with a JSONL + tensorboard log, a grid PNG and a resumable checkpoint per round -> save the LoRA -> base vs aligned
on held-out prompts (pipelines.evaluate), plus the Fréchet distance to the exemplar set when the reward has one.

One engine: a round is a small dataset (`pipelines.sources.Round`: rows of indices into the round's chains), and
its optimizer steps are the same `micro_step` / `finish_step` as `diffalign train` (accelerate prepare, accumulate,
backward, clipping, mixed precision, the non-finite skip-and-count policy). The objective's `sources` metadata picks
the on-line source once: trajectory (D3PO: stored steps, per-step log-probs), round_pairs / round_sets (DRAGON:
Diffusion-DPO / Diffusion-KTO on the generated x0), experts (Diffusion-DRO: expert images vs policy samples drawn
from the experts' own captions, at stored steps; the snapshot = the policy that sampled the round), nft
(DiffusionNFT: forward-process training on the clean samples of an "old" adapter, an EMA of the policy updated after
every round, which samples the rounds). The sampler comes from diffalign.samplers by the family's prediction type.

Several processes (`accelerate launch`): each samples its share of the round (pipelines.rounds), the round is
gathered, the main process scores it and broadcasts the rewards, so pairing and splitting see whole groups; each
optimizer step draws one global set of rows (keyed on seed, round, step) and process r trains on its r-th share,
DDP averages the gradients, so the LoRA is the same on every process and equals a one-process run with the whole
batch. Exact resume: a round's draws are all keyed on (seed, round, step, row); the checkpoint after each round holds
the LoRA (and the "ref" adapter), AdamW and the counters, and `--resume latest` drops round-log rows after it.

KL regularisation: `online.kl_weight` > 0 adds a KL to the reference for the objectives without one of their own
(D3PO: the closed-form KL of the sampled step's Gaussians; DRAGON and DRO: the squared prediction difference at the
objective's x_t), logged as train/kl (pipelines/step.py step_loss).

Reference model: `online.ref_refresh: 0` = the frozen base (LoRA adapters off, as diffusers' LoRA DPO and the
official D3PO code, which never updates it: d3po#23); N > 0 = a second LoRA adapter "ref", a copy of the policy
taken every N rounds (flow_grpo's `ref_update_step`; the N-round iterative scheme the D3PO author describes in #11).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers.optimization import get_scheduler

from diffalign.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from diffalign.config import OnlineConfig, load_config, save_config, to_dict
from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule
from diffalign.lora import add_lora, lora_targets, reference_mode, save_lora
from diffalign.models import default_guidance
from diffalign.models.toy import to_pil
from diffalign.objectives import OBJECTIVES
from diffalign.online.experts import preference_winners
from diffalign.online.old_policy import OLD_ADAPTER, OLD_DECAY, update_old
from diffalign.online.pairs import read_labels
from diffalign.rewards import load_scorer
from diffalign.runinfo import write_run_record
from diffalign.samplers import build_sampler, random_window, window_range
from pipelines.common import build_objective, data_source, load_model, save_grid
from pipelines.curves import ROUND_KEYS, Curves, plot_curves
from pipelines.evaluate import evaluate_base_vs_lora
from pipelines.guarding import GuardRun
from pipelines.rounds import (
    ROUND_SOURCES,
    adapter_mode,
    build_reward,
    copy_policy_to_ref,
    eval_fd,
    plan_round,
    read_train_prompts,
    sample_share,
    score_round,
    set_fd,
)
from pipelines.sources import SOURCES, Round, objectives_for, source_for
from pipelines.step import (
    ROWS_STREAM,
    WINDOW_STREAM,
    count_bad,
    finish_step,
    keyed_generator,
    micro_step,
    read_sums,
    step_context,
    sum_over_processes,
)
from pipelines.train import scaler_state, shared_output_dir, truncate_metrics


def run(config: str | None = None, overrides: list[str] | tuple = (), resume: str = "") -> Path:
    cfg: OnlineConfig = load_config(OnlineConfig, config, list(overrides))
    rc, name = cfg.online, cfg.objective.name
    objective = build_objective(cfg.objective)
    source = source_for(OBJECTIVES[name], "online")
    if source is None:
        options = ", ".join(objectives_for("online", OBJECTIVES))
        raise DiffalignError(f"online: objective '{name}' cannot train on-line (options: {options})")
    rs = ROUND_SOURCES[source]
    if rs.rules is not None and rc.split not in rs.rules:
        raise DiffalignError(
            f"online.split '{rc.split}' does not fit objective '{name}' (options: {', '.join(rs.rules)})"
        )
    own_kl = getattr(OBJECTIVES[name], "own_kl", "")
    if rc.kl_weight > 0 and own_kl:
        raise DiffalignError(f"online.kl_weight: objective '{name}' has a KL term of its own (objective.{own_kl})")
    if rc.mixed_precision not in ("no", "bf16", "fp16"):
        raise DiffalignError(f"online.mixed_precision must be no, bf16 or fp16, not '{rc.mixed_precision}'")
    traj_steps = min(rc.trajectory_steps or rc.steps, rc.steps) if SOURCES[source].stepwise else 1
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = shared_output_dir(rc.output_dir, bool(resume), state, default_name=f"online-{name}")
    accelerator = Accelerator(
        mixed_precision=rc.mixed_precision,
        gradient_accumulation_steps=rc.grad_accum * traj_steps,
        log_with=["tensorboard"] if rc.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(rc.seed)
    device, main = accelerator.device, accelerator.is_main_process

    # ---- model, LoRA, reference, objective --------------------------------------------------------------------
    family = load_model(cfg.model, lora=cfg.lora).to(device)
    if rc.guidance <= 0:
        rc.guidance = default_guidance(family)  # the resolved value is what config.yaml records
    rs.check(rc)
    cfg_scale = family.sampling_cfg(rc.guidance)  # FLUX.1-dev: guidance is an input of the transformer, CFG 1
    if rc.gradient_checkpointing:
        family.enable_gradient_checkpointing()
    if rc.xformers:  # SDPA is every family's default
        family.use_attention("xformers")
    denoiser = family.denoiser
    targets = lora_targets(family, cfg.lora.preset, cfg.lora.target_modules)
    params = add_lora(denoiser, cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.init)
    named_params = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    ckpt_params = dict(named_params)
    if rc.ref_refresh:
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.simplefilter("ignore", UserWarning)
            denoiser.add_adapter(copy.deepcopy(denoiser.peft_config["default"]), adapter_name="ref")
        denoiser.set_adapter("default")
        ref_params = {n: p for n, p in denoiser.named_parameters() if ".ref." in n}
        copy_policy_to_ref(named_params, ref_params)
        ckpt_params.update(ref_params)  # the reference is part of the resumable state
        reference = lambda: adapter_mode(denoiser, "ref")  # noqa: E731
    else:
        reference = lambda: reference_mode(denoiser)  # noqa: E731
    if rs.old_policy:  # DiffusionNFT: an "old" adapter, an EMA of the policy, samples the rounds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            denoiser.add_adapter(copy.deepcopy(denoiser.peft_config["default"]), adapter_name=OLD_ADAPTER)
        denoiser.set_adapter("default")
        old_params = {n: p for n, p in denoiser.named_parameters() if f".{OLD_ADAPTER}." in n}
        update_old(named_params, old_params, 0.0)
        ckpt_params.update(old_params)
    schedule = Schedule(family.scheduler, family.prediction_type)
    window_span = None  # Flow-GRPO-Fast: a window of sde_window_size steps at a keyed random start each round
    if rc.sde_window_size:
        if rc.sde_window:
            raise DiffalignError("online: set sde_window (fixed) or sde_window_size (random start), not both")
        window_span = window_range(rc.sde_window_size, rc.sde_window_range, rc.steps)
    first_window = [window_span[0], window_span[0] + rc.sde_window_size] if window_span else rc.sde_window
    sampler = build_sampler(family, rc.sampler, rc.steps, rc.eta, first_window)  # ddim or flow_sde, by family
    if SOURCES[source].stepwise:  # samplers record their noise window only: fewer steps to accumulate over
        traj_steps = min(rc.trajectory_steps or sampler.recorded_steps, sampler.recorded_steps)
        accelerator.gradient_accumulation_steps = rc.grad_accum * traj_steps

    # ---- reward, prompts, labels, experts ---------------------------------------------------------------------
    scorer = build_reward(rc) if main else None  # the main process scores every round
    monitors = {m: load_scorer(m) for m in rc.monitor} if main else {}
    labels = read_labels(rc.labels_file) if rc.labels_file else None
    experts = None
    if rs.experts:
        expert_scorer = load_scorer(rc.expert_scorer) if rc.expert_scorer else None
        pixels, captions = preference_winners(
            data_source(rc.experts), family.resolution, rc.max_experts, expert_scorer
        )
        if main:
            by = f" (top by {rc.expert_scorer})" if expert_scorer else ""
            print(f"{name}: {len(captions)} experts from {rc.experts}{by}; negatives sampled from their captions")
        experts = (family.encode_images(pixels.to(device)).cpu(), captions)  # (M, C, h, w), (M,)
    pool = experts[1] if rs.experts else read_train_prompts(rc.prompts)

    optimizer = torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay)
    lr_scheduler = get_scheduler("constant", optimizer)
    ckpt_dir, start_round, path, saved = out / "checkpoints", 0, None, None
    counts = {"skipped_steps": 0, "bad_in_a_row": 0}
    if resume == "latest" and not list_checkpoints(ckpt_dir):
        if main:
            print(f"--resume latest: no checkpoint under {ckpt_dir} yet; starting at round 0")
    elif resume:
        path = resolve_resume(resume, ckpt_dir)
        saved = load_checkpoint(path, ckpt_params, optimizer, lr_scheduler, {})
        start_round, counts = saved["round"], {k: saved[k] for k in counts}
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["grad_scaler"])
        if main:
            print(f"resumed from {path} at round {start_round}")
    if resume and main:
        truncate_metrics(out / "rounds.jsonl", start_round, key="round")
        truncate_metrics(out / "curves.jsonl", start_round)
    prepared, optimizer = accelerator.prepare(denoiser, optimizer)  # DDP wrapper when multi-process
    ctx = step_context(
        accelerator,
        family,
        prepared,
        source,
        rc,
        objective=objective,
        schedule=schedule,
        reference=reference,
        estimator=cfg.estimator,
        params=params,
        optimizer=optimizer,
        sampler=sampler,
        kl_weight=rc.kl_weight,
    )
    if main:
        save_config(cfg, out / "config.yaml")
        write_run_record(out, resolved_config=to_dict(cfg), resumed_from=str(resume) or None)
    accelerator.init_trackers("diffalign-online")
    want_curves = main and 0 < rc.validate_every <= rc.rounds and cfg.eval.prompts  # round 0 and at least one more
    curves = Curves(family, cfg.eval, out / "curves.jsonl") if want_curves else None
    if curves and start_round == 0:
        curves.point(0, accelerator)  # the LoRA is zero: the base model
    guard = GuardRun.build(cfg.guards, family, scorer, named_params, out, accelerator, unit="round")
    if guard:
        if main:
            truncate_metrics(out / "guards.jsonl", start_round, key="round")
        guard.start(path, saved)

    # ---- rounds -----------------------------------------------------------------------------------------------
    t_start, g = time.time(), rc.images_per_prompt
    world, rank = accelerator.num_processes, accelerator.process_index
    for r in range(start_round, rc.rounds):
        t0 = time.time()
        prompts, seeds, pool_index = plan_round(rc, r, pool)
        window = None
        if window_span:
            window = random_window(rc.sde_window_size, window_span, keyed_generator(rc.seed, r, WINDOW_STREAM))
        with adapter_mode(denoiser, OLD_ADAPTER if rs.old_policy else "default"):
            traj, images = sample_share(
                accelerator, family, sampler, prompts, seeds, rc, r, rs.keep_predictions, cfg_scale, window
            )
        rewards, monitored = score_round(accelerator, scorer, monitors, images, prompts)
        first, second = rs.rows(rewards.view(rc.prompts_per_round, g), rc, labels, r, pool_index)  # (N,) -> (P, G)
        rnd = Round(r, traj, prompts, first, second, experts)
        sums, n_rows = {}, len(first)
        for s in range(rc.train_steps if n_rows >= rc.grad_accum * world else 0):
            gen = keyed_generator(rc.seed, r, s, ROWS_STREAM)
            pick = torch.randperm(n_rows, generator=gen)[: rc.batch_size * rc.grad_accum * world]  # global rows
            stepwise = SOURCES[source].stepwise  # trajectory steps to train on, drawn like the rows
            ks = torch.randperm(traj.num_steps, generator=gen)[:traj_steps].tolist() if stepwise else [None]
            tensor_sums = {}
            for part in torch.tensor_split(pick, rc.grad_accum):  # micro-batches; process r takes rows r, r+W, ...
                for k in ks:  # one backward per trajectory step, gradients accumulated (official D3PO)
                    batch = {"round": rnd, "step": s, "rows": part[rank::world], "k": k}
                    tensor_sums = micro_step(accelerator, prepared, ctx, batch, tensor_sums)
            losses_finite, grads_finite = finish_step(accelerator, ctx, tensor_sums)
            lr_scheduler.step()
            hint = "lower online.lr or objective.beta"
            count_bad(counts, losses_finite, grads_finite, accelerator.scaler, f"round {r + 1} step {s + 1}", hint)
            step_sums = {**read_sums(tensor_sums), "n": float(rc.grad_accum * len(ks))}
            for key, v in sum_over_processes(accelerator, step_sums).items():
                sums[key] = sums.get(key, 0.0) + v
        n = sums.pop("n", 1.0)
        if rc.ref_refresh and (r + 1) % rc.ref_refresh == 0:
            copy_policy_to_ref(named_params, ref_params)
        if rs.old_policy:  # after the round's optimizer steps, as the official code after each epoch
            update_old(named_params, old_params, OLD_DECAY[objective.old_decay]((r + 1) * rc.train_steps))
        logs = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "pairs_or_samples": n_rows,
            **{f"monitor/{m}": float(v.mean()) for m, v in monitored.items()},
            **{f"train/{k}": v / n for k, v in sums.items()},  # objective metrics ("reward" = KTO's implicit one)
            "skipped_steps": counts["skipped_steps"],
            "round_seconds": time.time() - t0,
            **({"sde_window_start": window[0]} if window else {}),
        }
        if main and rc.exemplars:
            logs["set_fd"] = set_fd(scorer, images)
        accelerator.log(logs, step=r + 1)
        if main:
            with open(out / "rounds.jsonl", "a") as f:
                f.write(json.dumps({"round": r + 1, **logs}) + "\n")
            # row p = prompt group p, column = image index in the group: what a human labels from (labels_file)
            save_grid(to_pil(images * 2 - 1), out / "rounds" / f"round-{r + 1:04d}.png", cols=g)
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("round", images[: 8 * g], r + 1)
            print(
                f"round {r + 1}/{rc.rounds}: reward {logs['reward']:.3f} "
                + " ".join(f"{m} {logs[f'monitor/{m}']:.3f}" for m in monitored)
                + f" items {n_rows} loss {logs.get('train/loss', float('nan')):.4f} ({logs['round_seconds']:.1f}s)",
                flush=True,
            )
        if curves and (r + 1) % rc.validate_every == 0:
            curves.point(r + 1, accelerator)
        accelerator.wait_for_everyone()
        tripped = bool(guard and guard.due(r + 1, rc.rounds) and guard.check(r + 1))  # before the save
        if main:
            guard_state, guard_tensors = guard.checkpoint_parts() if guard else ({}, {})
            extra = {"round": r + 1, "grad_scaler": scaler_state(accelerator), **counts, **guard_state}
            save_checkpoint(
                ckpt_dir, r + 1, ckpt_params, optimizer, lr_scheduler, {}, extra, rc.keep_checkpoints, guard_tensors
            )
        if tripped:
            break  # a reward-hacking guard tripped: keep the best passing weights (pipelines/guarding.py)

    # ---- outputs ----------------------------------------------------------------------------------------------
    accelerator.end_training()
    if not main:
        return out
    guard_info = {"guards": guard.finish()} if guard else {}
    save_lora(family, out / "lora", metadata={"base_model": cfg.model.path, "objective": name, "online": True})
    summary = {"rounds": rc.rounds, "resumed_at": start_round, "train_seconds": time.time() - t_start, **counts}
    if curves:
        plot_curves(curves.path, out / "rounds.jsonl", out / "eval" / "curves.png", curves.label, ROUND_KEYS, "round")
    summary.update(guard_info)
    if cfg.eval.prompts:
        summary["eval"] = evaluate_base_vs_lora(family, cfg.eval, out / "eval")
        if rc.exemplars:
            summary["eval_fd"] = eval_fd(family, cfg.eval, scorer)
            print(
                f"FD to the exemplar set on held-out prompts: base {summary['eval_fd']['base']:.3f} -> "
                f"aligned {summary['eval_fd']['aligned']:.3f}"
            )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out
