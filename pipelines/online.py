"""`diffalign online [CONFIG.yaml] [a.b=value ...] [--resume latest|PATH]`: on-policy alignment in rounds.

Read top to bottom: resolve the config -> load the model family -> add LoRA (and a "ref" adapter if the reference
is refreshed) -> build the reward (instance, distribution-level or exemplar-set) -> rounds of
    sample P prompt groups x G images (DDIM-eta, trajectories kept) -> score -> pairs / sets -> K optimizer steps
with a JSONL + tensorboard log, a grid PNG and a resumable checkpoint per round (train.checkpoint_every) -> save
the LoRA -> base vs aligned on held-out prompts (diffalign.engine.evaluate), plus the Fréchet distance to the exemplar
set when the reward has one.

One engine: a round is a small dataset (`diffalign.sources.Round`: rows of indices into the round's chains), and
its optimizer steps are the same `micro_step` / `finish_step` as `diffalign train` (accelerate prepare, accumulate,
backward, clipping, mixed precision, the non-finite skip-and-count policy). The objective's `sources` metadata picks
the on-line source once: trajectory (D3PO: stored steps, per-step log-probs), round_pairs / round_sets (DRAGON:
Diffusion-DPO / Diffusion-KTO on the generated x0), experts (Diffusion-DRO: expert images vs policy samples drawn
from the experts' own captions, at stored steps; the snapshot = the policy that sampled the round), nft
(DiffusionNFT: forward-process training on the clean samples of an "old" adapter, an EMA of the policy updated after
every round, which samples the rounds). The sampler comes from diffalign.sampling by the family's prediction type.

Several processes (`accelerate launch`): each samples its share of the round (diffalign.online.rounds), the round is
gathered chunk by chunk, the main process scores it (each chunk while the next is sampled, `reward.overlap`) and
broadcasts the rewards, so pairing and splitting see whole groups; each
optimizer step draws one global set of rows (keyed on seed, round, step) and process r trains on its r-th share,
DDP averages the gradients, so the LoRA is the same on every process and equals a one-process run with the whole
batch. Exact resume: a round's draws are all keyed on (seed, round, step, row); the checkpoint after each round holds
the LoRA (and the "ref" adapter), AdamW and the counters, and `--resume latest` drops round-log rows after it.

KL regularisation: `online.kl_weight` > 0 adds a KL to the reference for the objectives without one of their own
(D3PO: the closed-form KL of the sampled step's Gaussians; DRAGON and DRO: the squared prediction difference at the
objective's x_t), logged as train/kl (diffalign/engine/step.py step_loss).

Reference model: `online.ref_refresh: 0` = the frozen base (LoRA adapters off, as diffusers' LoRA DPO and the
official D3PO code, which never updates it: d3po#23); N > 0 = a second LoRA adapter "ref", a copy of the policy
taken every N rounds (flow_grpo's `ref_update_step`; the N-round iterative scheme the D3PO author describes in #11).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffalign.config import OnlineConfig, load_config
from diffalign.engine.common import build_objective, data_source, save_grid
from diffalign.engine.curves import ROUND_KEYS
from diffalign.engine.run import Run
from diffalign.engine.step import (
    ROWS_STREAM,
    WINDOW_STREAM,
    count_bad,
    finish_step,
    keyed_generator,
    micro_step,
    read_sums,
    sum_over_processes,
)
from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule
from diffalign.lora import adapter_mode, copy_policy_to_ref
from diffalign.models import default_guidance
from diffalign.models.toy import to_pil
from diffalign.online.exemplars import preference_winners
from diffalign.online.old_policy import OLD_ADAPTER, OLD_DECAY, update_old
from diffalign.online.pairing import read_labels
from diffalign.online.rounds import (
    build_reward,
    chunk_scorer,
    eval_fd,
    plan_round,
    read_train_prompts,
    sample_share,
    score_round,
    set_fd,
)
from diffalign.rewards import load_scorer
from diffalign.rewards.frames import FrameReduced, frame_strip
from diffalign.sampling import EncodedPrompts, build_sampler, random_window, sliding_window, window_range
from diffalign.sources import Round, source_of


def run(config: str | None = None, overrides: list[str] | tuple = (), resume: str = "") -> Path:
    cfg: OnlineConfig = load_config(OnlineConfig, config, list(overrides))
    name = cfg.objective.name
    tc, sc, oc = cfg.train, cfg.sampling, cfg.online  # optimisation, sampling, the rounds
    objective = build_objective(cfg.objective)
    source = source_of(cfg, "online")  # the objective's source, config and contract checked, before any model
    stepwise = source.stepwise
    traj_steps = min(tc.trajectory_steps or sc.steps, sc.steps) if stepwise else 1
    run = Run(cfg, tc, resume, unit="round", log_file="rounds.jsonl", default_name=f"online-{name}",
              grad_accum=tc.grad_accum * traj_steps)  # fmt: skip
    accelerator, out, main = run.accelerator, run.out, run.main

    # ---- model, LoRA, reference, sampler ----------------------------------------------------------------------
    family = run.load_model(
        whole_family=True, reference="adapter" if oc.ref_refresh else "base", old_adapter=source.old_policy
    )
    if sc.guidance <= 0:
        sc.guidance = default_guidance(family)  # the resolved value is what config.yaml records
    source.check(cfg)  # again, with the resolved guidance
    cfg_scale = family.sampling_cfg(sc.guidance)  # FLUX.1-dev: guidance is an input of the transformer, CFG 1
    window_span = None  # Flow-GRPO-Fast: a window of sde_window_size steps at a keyed random start each round
    if sc.sde_window_size:
        window_span = window_range(sc.sde_window_size, sc.sde_window_range, sc.steps)
    elif sc.sde_window_shift_every:
        raise DiffalignError("sampling.sde_window_shift_every needs sampling.sde_window_size (the window to slide)")
    first_window = [window_span[0], window_span[0] + sc.sde_window_size] if window_span else sc.sde_window
    sampler = build_sampler(family, sc.sampler, sc.steps, sc.eta, first_window)  # ddim or flow_sde, by family
    if stepwise:  # samplers record their noise window only: fewer steps to accumulate over
        traj_steps = min(tc.trajectory_steps or sampler.recorded_steps, sampler.recorded_steps)
        accelerator.gradient_accumulation_steps = tc.grad_accum * traj_steps

    # ---- reward, prompts, labels, experts ---------------------------------------------------------------------
    scorer = build_reward(cfg) if main else None  # the main process scores every round
    monitors = {m: FrameReduced(load_scorer(m), cfg.reward.frame_reduce) for m in cfg.reward.monitor} if main else {}
    chunks = chunk_scorer(cfg, scorer)  # reward.overlap: chunks scored in threads while the next are sampled
    labels = read_labels(cfg.pairing.labels_file) if cfg.pairing.labels_file else None
    experts = None
    if source.experts:
        if family.num_frames not in (None, 1):  # a one-frame video is an image (how Wan trains on images)
            raise DiffalignError(
                f"objective {name}: its experts are images, and {family.name} samples {family.num_frames}-frame "
                "videos; set model.num_frames=1 (one-frame videos, the experts' shape)"
            )
        expert_scorer = load_scorer(oc.expert_scorer) if oc.expert_scorer else None
        pixels, captions = preference_winners(
            data_source(oc.experts), family.resolution, oc.max_experts, expert_scorer
        )
        if main:
            by = f" (top by {oc.expert_scorer})" if expert_scorer else ""
            print(f"{name}: {len(captions)} experts from {oc.experts}{by}; negatives sampled from their captions")
        experts = (family.encode_images(pixels.to(run.device)).cpu(), captions)  # (M, C, h, w), (M,)
    pool = experts[1] if source.experts else read_train_prompts(sc.prompts)

    run.build_optimizer(oc.rounds * tc.steps_per_round)
    run.resume()
    schedule = Schedule(family.scheduler, family.prediction_type)
    ctx = run.prepare(
        source, objective=objective, schedule=schedule, estimator=cfg.estimator, sampler=sampler,
        kl_weight=oc.kl_weight,
    )  # fmt: skip
    run.begin(scorer, oc.rounds, "diffalign-online")

    # ---- rounds -----------------------------------------------------------------------------------------------
    g, counts = sc.images_per_prompt, run.counts
    world, rank = accelerator.num_processes, accelerator.process_index
    try:
        last_saved = run.start  # the round the last checkpoint holds (a resume's, or 0)
        for r in range(run.start, oc.rounds):
            t0 = time.time()
            prompts, seeds, pool_index = plan_round(cfg, r, pool)
            window = None
            if window_span and sc.sde_window_shift_every:  # MixGRPO: a function of the round alone
                window = sliding_window(r, sc.sde_window_size, sc.sde_window_shift_every, sc.sde_window_stride,
                                        window_span)  # fmt: skip
            elif window_span:
                window = random_window(sc.sde_window_size, window_span, keyed_generator(tc.seed, r, WINDOW_STREAM))
            text = EncodedPrompts.encode(family, prompts, with_uncond=cfg_scale > 1)  # once: sampling and every step
            with adapter_mode(run.denoiser, OLD_ADAPTER if source.old_policy and source.old_samples else "default"):
                traj, images = sample_share(
                    accelerator, family, sampler, prompts, seeds, cfg, r, source.keep_predictions, cfg_scale, window,
                    on_chunk=chunks.submit if chunks else None, lockstep=run.sharded, text=text,
                )  # fmt: skip
            t_score = time.time()  # what scoring adds to the round after sampling (reward.overlap hides the rest)
            rewards, monitored = score_round(accelerator, scorer, monitors, images, prompts, chunks)
            reward_wait = time.time() - t_score
            by_group = rewards.view(sc.prompts_per_round, g)  # (N,) -> (P, G)
            first, second = source.rows(by_group, cfg, labels, r, pool_index)
            rnd = Round(r, traj, prompts, first, second, experts, text, sampler.grid)
            sums, n_rows = {}, len(first)
            trains = n_rows >= tc.grad_accum * world and not (stepwise and traj.num_steps == 0)  # MixGRPO's last
            for s in range(tc.steps_per_round if trains else 0):  # window is empty: that round trains nothing
                gen = keyed_generator(tc.seed, r, s, ROWS_STREAM)
                pick = torch.randperm(n_rows, generator=gen)[: tc.batch_size * tc.grad_accum * world]  # global rows
                ks = torch.randperm(traj.num_steps, generator=gen)[:traj_steps].tolist() if stepwise else [None]
                tensor_sums = {}
                for part in torch.tensor_split(pick, tc.grad_accum):  # micro-batches; process r takes r, r+W, ...
                    for k in ks:  # one backward per trajectory step, gradients accumulated (official D3PO)
                        batch = {"round": rnd, "step": s, "rows": part[rank::world], "k": k}
                        tensor_sums = micro_step(accelerator, run.prepared, ctx, batch, tensor_sums)
                losses_finite, grads_finite = finish_step(accelerator, ctx, tensor_sums)
                run.lr_scheduler.step()
                hint = "lower train.lr or objective.beta"
                count_bad(counts, losses_finite, grads_finite, accelerator.scaler, f"round {r + 1} step {s + 1}", hint)
                step_sums = {**read_sums(tensor_sums), "n": float(tc.grad_accum * len(ks))}
                for key, v in sum_over_processes(accelerator, step_sums).items():
                    sums[key] = sums.get(key, 0.0) + v
                if run.stopping():  # mid-round: drop the round; its draws are keyed, so a resume redoes it exactly
                    run.exit_stopped(last_saved, saved=False)
            n = sums.pop("n", 1.0)
            if oc.ref_refresh and (r + 1) % oc.ref_refresh == 0:
                copy_policy_to_ref(run.named_params, run.ref_params)
            if source.old_policy:  # after the round's optimizer steps, as the official code after each epoch
                decay = OLD_DECAY[objective.old_decay]((r + 1) * tc.steps_per_round)
                update_old(run.named_params, run.old_params, decay)
            logs = {
                "reward": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "pairs_or_samples": n_rows,
                **{f"monitor/{m}": float(v.mean()) for m, v in monitored.items()},
                **{f"train/{k}": v / n for k, v in sums.items()},  # objective metrics ("reward" = KTO's implicit one)
                "lr": run.lr_scheduler.get_last_lr()[0],
                "skipped_steps": counts["skipped_steps"],
                "round_seconds": time.time() - t0,
                "reward_wait_seconds": reward_wait,
                **({"sde_window_start": window[0]} if window else {}),
            }
            if main and cfg.reward.exemplars:
                logs["set_fd"] = set_fd(scorer, images)
            run.log(r + 1, logs)
            run.bar.update(1)
            if main and tc.grid_every and (r + 1) % tc.grid_every == 0:
                # row p = prompt group p, column = image index in the group: what a human labels from (labels_file)
                save_grid(to_pil(frame_strip(images) * 2 - 1), out / "rounds" / f"round-{r + 1:04d}.png", cols=g)
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        tracker.writer.add_images("round", images[: 8 * g], r + 1)
            if main:
                run.bar.write(
                    f"round {r + 1}/{oc.rounds}: reward {logs['reward']:.3f} "
                    + " ".join(f"{m} {logs[f'monitor/{m}']:.3f}" for m in monitored)
                    + f" items {n_rows} loss {logs.get('train/loss', float('nan')):.4f} ({logs['round_seconds']:.1f}s)"
                )
            accelerator.wait_for_everyone()
            tripped = run.after(r + 1)  # before the save
            stopping = run.stopping() and r + 1 < oc.rounds
            if (tc.checkpoint_every and (r + 1) % tc.checkpoint_every == 0) or stopping:
                run.save(r + 1, {"round": r + 1})
                last_saved = r + 1
            if tripped:
                break  # a reward-hacking guard tripped: keep the best passing weights (diffalign/engine/guarding.py)
            if stopping:
                run.exit_stopped(r + 1)
    finally:
        if chunks:
            chunks.close()
        run.close_loop()

    # ---- outputs ----------------------------------------------------------------------------------------------
    extra_eval = (lambda fam, pairs: {"eval_fd": eval_fd(scorer, pairs)}) if cfg.reward.exemplars else None
    summary = run.finish({"objective": name, "online": True}, {"rounds": oc.rounds}, (ROUND_KEYS, "round"), extra_eval)
    if main and "eval_fd" in summary:
        fd = summary["eval_fd"]
        print(f"FD to the exemplar set on held-out prompts: base {fd['base']:.3f} -> aligned {fd['aligned']:.3f}")
    return out
