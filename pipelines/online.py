"""`diffalign online [CONFIG.yaml] [a.b=value ...] [--resume latest|PATH]`: on-policy alignment in rounds.

Read top to bottom: resolve the config -> load the model family -> add LoRA (and a "ref" adapter if the reference
is refreshed) -> build the reward (instance, distribution-level or exemplar-set) -> rounds of
    sample P prompt groups x G images (DDIM-eta, trajectories kept) -> score -> pairs / sets -> K optimizer steps
with a JSONL + tensorboard log, a grid PNG and a resumable checkpoint per round -> save the LoRA -> base vs aligned
on held-out prompts (pipelines.evaluate), plus the Fréchet distance to the exemplar set when the reward has one.

The objective picks the kind of batch, once, from BATCHES: d3po (stored trajectory steps, per-step log-probs),
dpo / kto (DRAGON: Diffusion-DPO / Diffusion-KTO surrogate on the generated x0), dro (Diffusion-DRO: experts from a
preference set vs the round's policy samples at stored steps, the snapshot = the policy that sampled the round).

Reference model: `online.ref_refresh: 0` = the frozen base (LoRA adapters off, as diffusers' LoRA DPO and the
official D3PO code, which never updates it: d3po#23); N > 0 = a second LoRA adapter "ref", a copy of the policy
taken every N rounds (flow_grpo's `ref_update_step`; the N-round iterative scheme the D3PO author describes in #11).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from diffalign.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from diffalign.config import OnlineConfig, load_config, save_config, to_dict
from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule
from diffalign.lora import add_lora, lora_targets, reference_mode, save_lora
from diffalign.models import default_guidance
from diffalign.models.toy import to_pil
from diffalign.online.experts import ToyStatsEncoder, preference_winners, toy_vivid_exemplars
from diffalign.online.pairs import PAIR_RULES, SPLIT_RULES, pairs_from_labels, read_labels
from diffalign.online.steps import d3po_loss, dro_loss, surrogate_loss
from diffalign.paths import TOY_HELDOUT
from diffalign.rewards import load_scorer
from diffalign.rewards.distributional import frechet_distance, gaussian_stats
from diffalign.runinfo import write_run_record
from diffalign.sampling import Trajectory, inference_scheduler, sample_trajectories
from diffalign.toy import shapes
from pipelines.common import build_objective, data_source, load_model, prepare_output_dir, save_grid
from pipelines.evaluate import evaluate_base_vs_lora, generate_pair_sets, read_eval_prompts

# objective -> (kind of round data it trains on, which split rules it accepts)
BATCHES = {
    "d3po": ("trajectory", PAIR_RULES),
    "dpo": ("paired", PAIR_RULES),
    "kto": ("unpaired", SPLIT_RULES),
    "dro": ("dro", {}),
}


def run(config: str | None = None, overrides: list[str] | tuple = (), resume: str = "") -> Path:
    cfg: OnlineConfig = load_config(OnlineConfig, config, list(overrides))
    rc, name = cfg.online, cfg.objective.name
    if name not in BATCHES:
        raise DiffalignError(f"online: objective '{name}' cannot train on-line (options: {', '.join(BATCHES)})")
    kind, rules = BATCHES[name]
    if kind != "dro" and rc.split not in rules:
        raise DiffalignError(
            f"online.split '{rc.split}' does not fit objective '{name}' (options: {', '.join(rules)})"
        )
    if kind == "trajectory" and rc.eta <= 0:
        raise DiffalignError("online.eta must be > 0 for d3po (per-step log-probs need a stochastic step)")
    out = prepare_output_dir(rc.output_dir, resume=bool(resume), default_name=f"online-{name}")
    accelerator = Accelerator(
        log_with=["tensorboard"] if rc.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(rc.seed)
    device = accelerator.device

    # ---- model, LoRA, reference, objective --------------------------------------------------------------------
    family = load_model(cfg.model, lora=cfg.lora).to(device)
    if rc.guidance <= 0:
        rc.guidance = default_guidance(family)  # the resolved value is what config.yaml records
    if kind == "dro" and rc.guidance > 1:
        raise DiffalignError(
            f"online.guidance must be <= 1 for dro (the snapshot's conditional prediction is the target), "
            f"not {rc.guidance:g}"
        )
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
    objective = build_objective(cfg.objective)
    schedule = Schedule(family.scheduler, family.prediction_type)
    scheduler = inference_scheduler(family, rc.eta)
    scheduler.set_timesteps(rc.steps, device=device)
    timestep_kwargs = {
        "distribution": cfg.estimator.timesteps,
        "t_min": cfg.estimator.t_min,
        "t_max": cfg.estimator.t_max,
    }

    # ---- reward, prompts, labels, experts ---------------------------------------------------------------------
    scorer = build_reward(rc)
    monitors = {m: load_scorer(m) for m in rc.monitor}
    prompts = read_train_prompts(rc.prompts)
    labels = read_labels(rc.labels_file) if rc.labels_file else None
    if kind == "dro":
        expert_scorer = load_scorer(rc.expert_scorer) if rc.expert_scorer else None
        pixels, expert_prompts = preference_winners(
            data_source(rc.experts), family.resolution, rc.max_experts, expert_scorer
        )
        print(
            f"dro: {len(expert_prompts)} experts from {rc.experts}"
            + (f" (top by {rc.expert_scorer})" if expert_scorer else "")
        )
        expert_x0 = family.encode_images(pixels.to(device)).cpu()  # (M, C, h, w)

    optimizer = torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay)
    lr_scheduler = get_scheduler("constant", optimizer)
    gen = torch.Generator().manual_seed(rc.seed)  # training noise, t, batch choice
    generators = {"train": gen}
    ckpt_dir, start_round = out / "checkpoints", 0
    if resume:
        path = resolve_resume(resume, ckpt_dir)
        start_round = load_checkpoint(path, ckpt_params, optimizer, lr_scheduler, generators)["round"]
        print(f"resumed from {path} at round {start_round}")
    ctx = Trainer(
        kind,
        family,
        objective,
        schedule,
        scheduler,
        reference,
        timestep_kwargs,
        params,
        optimizer,
        gen,
        rc,
        (expert_x0, expert_prompts) if kind == "dro" else None,
    )
    save_config(cfg, out / "config.yaml")
    write_run_record(out, resolved_config=to_dict(cfg), resumed_from=str(resume) or None)
    accelerator.init_trackers("diffalign-online")

    # ---- rounds -----------------------------------------------------------------------------------------------
    t_start = time.time()
    for r in range(start_round, rc.rounds):
        t0 = time.time()
        rng = np.random.default_rng([rc.seed, r])
        chosen = rng.choice(len(prompts), rc.prompts_per_round, replace=rc.prompts_per_round > len(prompts))
        g = rc.images_per_prompt
        flat_prompts = [prompts[i] for i in chosen for _ in range(g)]  # (N = P*G,) group p = rows p*G .. p*G+G-1
        base = (rc.seed * 1000 + r) * 100_000
        seeds = [base + (i // g if rc.shared_noise else i) for i in range(len(flat_prompts))]
        traj = sample_round(
            family, scheduler, flat_prompts, seeds, rc, noise_seed=base, keep_predictions=kind == "dro"
        )
        images = (family.decode(traj.x0.to(device)).cpu() + 1) / 2  # (N, 3, H, W) in [0, 1]
        with torch.no_grad():
            rewards = scorer(images, flat_prompts).float().cpu()  # (N,)
            monitored = {m: s(images, flat_prompts).float().cpu() for m, s in monitors.items()}
        by_group = rewards.view(rc.prompts_per_round, g)  # (N,) -> (P, G)
        if labels is not None:
            batch = pairs_from_labels(labels, r + 1, g)  # round numbers as in rounds/round-XXXX.png
        elif kind in ("trajectory", "paired"):
            batch = PAIR_RULES[rc.split](by_group, rc.min_gap)
        elif kind == "unpaired":
            batch = SPLIT_RULES[rc.split](by_group, rc.fraction)
        else:
            batch = (torch.arange(len(flat_prompts)), None)  # DRO: every policy sample is a negative
        sums, n_items = {}, len(batch[0])
        for _ in range(rc.train_steps if n_items else 0):
            metrics = train_step(ctx, traj, flat_prompts, batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / rc.train_steps
        if rc.ref_refresh and (r + 1) % rc.ref_refresh == 0:
            copy_policy_to_ref(named_params, ref_params)
        logs = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "pairs_or_samples": n_items,
            **{f"monitor/{m}": float(v.mean()) for m, v in monitored.items()},
            **{f"train/{k}": v for k, v in sums.items()},  # objective metrics ("reward" = KTO's implicit one)
            "round_seconds": time.time() - t0,
        }
        if rc.exemplars:
            logs["set_fd"] = set_fd(scorer, images)
        accelerator.log(logs, step=r + 1)
        with open(out / "rounds.jsonl", "a") as f:
            f.write(json.dumps({"round": r + 1, **logs}) + "\n")
        # row p = prompt group p, column = image index in the group: what a human labels from (labels_file)
        save_grid(to_pil(images * 2 - 1), out / "rounds" / f"round-{r + 1:04d}.png", cols=g)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("round", images[: 8 * g], r + 1)
        save_checkpoint(
            ckpt_dir,
            r + 1,
            ckpt_params,
            optimizer,
            lr_scheduler,
            generators,
            {"round": r + 1},
            keep=rc.keep_checkpoints,
        )
        print(
            f"round {r + 1}/{rc.rounds}: reward {logs['reward']:.3f} "
            + " ".join(f"{m} {logs[f'monitor/{m}']:.3f}" for m in monitored)
            + f" items {n_items} loss {sums.get('loss', float('nan')):.4f} ({logs['round_seconds']:.1f}s)"
        )

    # ---- outputs ----------------------------------------------------------------------------------------------
    accelerator.end_training()
    save_lora(family, out / "lora", metadata={"base_model": cfg.model.path, "objective": name, "online": True})
    summary = {"rounds": rc.rounds, "resumed_at": start_round, "train_seconds": time.time() - t_start}
    if cfg.eval.prompts:
        report = evaluate_base_vs_lora(family, cfg.eval, out / "eval")
        summary["eval"] = report
        if rc.exemplars:
            summary["eval_fd"] = eval_fd(family, cfg.eval, scorer)
            print(
                f"FD to the exemplar set on held-out prompts: base {summary['eval_fd']['base']:.3f} -> "
                f"aligned {summary['eval_fd']['aligned']:.3f}"
            )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out


@dataclass
class Trainer:
    """What one optimizer step needs besides the round's data."""

    kind: str
    family: object
    objective: object
    schedule: Schedule
    scheduler: object
    reference: object
    timestep_kwargs: dict
    params: list
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    rc: object
    experts: tuple | None


def train_step(ctx: Trainer, traj: Trajectory, prompts: list[str], batch: tuple) -> dict[str, float]:
    """One optimizer step on a random draw from the round's pairs / sets; returns mean metrics."""
    first, second = batch
    gen, rc, kind, family, obj = ctx.gen, ctx.rc, ctx.kind, ctx.family, ctx.objective
    pick = torch.randperm(len(first), generator=gen)[: rc.batch_size]  # (B,)
    steps = torch.randperm(traj.num_steps, generator=gen)[: rc.trajectory_steps or traj.num_steps].tolist()
    parts = steps if kind in ("trajectory", "dro") else [None]
    sums: dict[str, float] = {}
    for k in parts:  # one backward per trajectory step, gradients accumulated (official D3PO)
        if kind == "trajectory":
            loss, metrics = d3po_loss(
                family, obj, ctx.scheduler, traj, prompts, first[pick], second[pick], k, ctx.reference
            )
        elif kind == "paired":
            idx = torch.cat([first[pick], second[pick]])  # (2B,) stacked [w; l]
            loss, metrics = surrogate_loss(
                family, obj, ctx.schedule, traj.x0, prompts, idx, None, gen, ctx.reference, ctx.timestep_kwargs
            )
        elif kind == "unpaired":
            idx, desirable = first[pick], second[pick]
            loss, metrics = surrogate_loss(
                family, obj, ctx.schedule, traj.x0, prompts, idx, desirable, gen, ctx.reference, ctx.timestep_kwargs
            )
        else:
            expert_x0, expert_prompts = ctx.experts
            idx_e = torch.randint(len(expert_x0), (len(pick),), generator=gen)
            loss, metrics = dro_loss(
                family,
                obj,
                ctx.schedule,
                expert_x0,
                expert_prompts,
                idx_e,
                traj,
                prompts,
                first[pick],
                k,
                gen,
                ctx.reference,
            )
        if not torch.isfinite(loss).all():
            raise DiffalignError(f"online: non-finite {kind} loss at trajectory step {k}; lower online.lr")
        (loss.mean() / len(parts)).backward()
        for key, v in {"loss": loss.detach(), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(v.float().mean()) / len(parts)
    if rc.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(ctx.params, rc.max_grad_norm)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return sums


def sample_round(family, scheduler, prompts, seeds, rc, noise_seed: int, keep_predictions: bool) -> Trajectory:
    """The round's chains in batches of rc.sample_batch (the scheduler's timesteps are reset to rc.steps)."""
    parts = []
    for i in range(0, len(prompts), rc.sample_batch):
        parts.append(
            sample_trajectories(
                family,
                prompts[i : i + rc.sample_batch],
                seeds[i : i + rc.sample_batch],
                rc.steps,
                rc.guidance,
                rc.eta,
                noise_seed=noise_seed + i,
                scheduler=scheduler,
                keep_predictions=keep_predictions,
            )
        )
    return Trajectory.cat(parts)


def build_reward(rc):
    """The round's scorer; exemplars "toy_vivid" = high-saturation toy renders under the toy colour encoder."""
    if rc.exemplars == "toy_vivid":
        exemplars = toy_vivid_exemplars(rc.exemplar_count, seed=rc.seed + 1)
        return load_scorer(rc.reward, exemplars=exemplars, encoder=ToyStatsEncoder(), **rc.reward_args)
    if rc.exemplars:
        raise DiffalignError(f"online.exemplars: '{rc.exemplars}' unknown (toy_vivid, or reward_args.exemplars)")
    return load_scorer(rc.reward, **rc.reward_args)


def read_train_prompts(source: str) -> list[str]:
    """The toy world's 80 captions minus the held-out ones; else a .txt file, one prompt per line."""
    if source == "toy":
        if not TOY_HELDOUT.is_file():
            raise DiffalignError(f"online.prompts=toy needs the held-out list {TOY_HELDOUT} (pipelines.toy_data)")
        held = {line.strip() for line in TOY_HELDOUT.read_text().splitlines() if line.strip()}
        return [p for p in (shapes.caption(**c) for c in shapes.all_combinations()) if p not in held]
    path = Path(source)
    if not path.is_file():
        raise DiffalignError(f"online.prompts: {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def copy_policy_to_ref(policy: dict, ref: dict) -> None:
    """ref adapter <- current policy adapter ("...lora_A.default.weight" -> "...lora_A.ref.weight")."""
    with torch.no_grad():
        for n, p in policy.items():
            ref[n.replace(".default.", ".ref.")].copy_(p)


@contextmanager
def adapter_mode(denoiser, adapter: str):
    """Inside the block only `adapter` is active; "default" (the trained policy) is active again on exit."""
    denoiser.set_adapter(adapter)
    try:
        yield denoiser
    finally:
        denoiser.set_adapter("default")


def set_fd(scorer, images) -> float:
    """Fréchet distance of a whole image set to the scorer's exemplar Gaussian (encoder units)."""
    mu, cov = gaussian_stats(scorer.encoder.embed_images(images))
    return float(frechet_distance(mu, cov, scorer.exemplars.mu, scorer.exemplars.cov))


def eval_fd(family, ecfg, scorer) -> dict[str, float]:
    """FD to the exemplars of base and aligned images on the held-out prompts (same seeds)."""
    _, base, aligned = generate_pair_sets(family, read_eval_prompts(ecfg), ecfg)
    return {"base": set_fd(scorer, base), "aligned": set_fd(scorer, aligned), "images": len(base)}
