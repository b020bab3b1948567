"""What `diffalign online` does to make a round into a small dataset, by source (diffalign/engine/sources.py):
which prompts are sampled, how the samples are shared among processes and gathered, and which rows the round gives.

A round samples P prompt groups x G images (flat index i = p * G + g). Every process samples the chunks of
`online.sample_batch` images whose chunk number is its rank modulo the process count; chunk i's noise is keyed on its
first index, so the images do not depend on how many processes sample them. The main process scores the gathered
round (set-level rewards need the whole round) and broadcasts the rewards; every process then builds the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from diffalign.engine.evaluate import generate_pair_sets, read_eval_prompts
from diffalign.errors import DiffalignError
from diffalign.online.advantages import group_advantages
from diffalign.online.experts import ToyStatsEncoder, toy_vivid_exemplars
from diffalign.online.pairs import PAIR_RULES, SPLIT_RULES, pairs_from_labels
from diffalign.paths import TOY_HELDOUT
from diffalign.rewards import load_scorer
from diffalign.rewards.distributional import frechet_distance, gaussian_stats
from diffalign.sampling import Trajectory
from diffalign.toy import shapes


def pair_rows(by_group, rc, labels, r, pool_index):
    """Pairs (idx_w, idx_l) by the split rule, or from the human label file (round numbers as in the grids)."""
    if labels is not None:
        return pairs_from_labels(labels, r + 1, rc.images_per_prompt)
    return PAIR_RULES[rc.split](by_group, rc.min_gap)


def set_rows(by_group, rc, labels, r, pool_index):
    """Desirable / undesirable samples (idx, desirable) by the split rule."""
    return SPLIT_RULES[rc.split](by_group, rc.fraction)


def expert_rows(by_group, rc, labels, r, pool_index):
    """Every policy chain is a negative of the expert whose caption prompted it: (chain idx, expert idx)."""
    return torch.arange(len(pool_index)), pool_index


def advantage_rows(by_group, rc, labels, r, pool_index):
    """Every sample, with its group-relative advantage (per-prompt mean, global std; the objective clips it)."""
    advantages = group_advantages(by_group, global_std=True, clip=math.inf).flatten()  # (P, G) -> (N,)
    return torch.arange(advantages.numel()), advantages


def need_groups(rc) -> None:
    if rc.images_per_prompt < 2:
        raise DiffalignError("online.images_per_prompt must be >= 2 for nft (advantages are relative to the group)")
    if rc.shared_noise and rc.eta == 0:
        raise DiffalignError(
            "online.shared_noise must be false for nft with eta 0: a deterministic sampler would give every image "
            "of a group the same x_T and so the same image"
        )


def need_eta(rc) -> None:
    if rc.eta <= 0:
        raise DiffalignError("online.eta must be > 0 for d3po (per-step log-probs need a stochastic step)")


def reward_rows(by_group, rc, labels, r, pool_index):
    """GRPO: every chain is a row, or with online.drop_zero_advantages (Flow-GRPO's mask) every chain whose group
    advantage is not 0 (that needs no std or clip: A = 0 exactly where r = its group's mean); the round's rewards
    (P, G) go along for the objective's group advantages."""
    rows = torch.arange(by_group.numel())
    if rc.drop_zero_advantages:
        rows = rows[group_advantages(by_group, clip=math.inf).flatten() != 0]  # (P, G) -> (N,) -> (R,)
    return rows, by_group


def need_noise(rc) -> None:
    if rc.eta <= 0:
        raise DiffalignError(
            "online.eta must be > 0 for grpo (its ratio needs step log-probs: DDIM eta or the flow noise level)"
        )


def need_conditional(rc) -> None:
    if rc.guidance > 1:
        raise DiffalignError(
            f"online.guidance must be <= 1 for dro (the snapshot's conditional prediction is the target), "
            f"not {rc.guidance:g}"
        )


@dataclass(frozen=True)
class RoundSource:
    rows: Callable  # (rewards (P, G), rc, labels, round, pool index (N,)) -> (first (R,), second (R,))
    rules: dict | None  # online.split options; None: the source has no split
    check: Callable = lambda rc: None  # config checks once guidance is resolved
    experts: bool = False  # prompts are the captions of expert images (Diffusion-DRO), not online.prompts
    keep_predictions: bool = False  # keep the sampler's predictions (DRO's snapshot targets)
    old_policy: bool = False  # an EMA "old" adapter samples the rounds (DiffusionNFT, diffalign.online.old_policy)


ROUND_SOURCES = {
    "round_pairs": RoundSource(pair_rows, PAIR_RULES),
    "round_sets": RoundSource(set_rows, SPLIT_RULES),
    "trajectory": RoundSource(pair_rows, PAIR_RULES, check=need_eta),
    "experts": RoundSource(expert_rows, None, check=need_conditional, experts=True, keep_predictions=True),
    "policy_steps": RoundSource(reward_rows, None, check=need_noise),
    "nft": RoundSource(advantage_rows, None, check=need_groups, old_policy=True),
}


def plan_round(rc, r: int, pool: list[str]) -> tuple[list[str], list[int], torch.Tensor]:
    """Round r's flat prompts (N = P*G; group p = rows p*G .. p*G+G-1), x_T seeds, and pool index of each row."""
    rng = np.random.default_rng([rc.seed, r])
    chosen = rng.choice(len(pool), rc.prompts_per_round, replace=rc.prompts_per_round > len(pool))
    g = rc.images_per_prompt
    index = torch.as_tensor(chosen).repeat_interleave(g)  # (P,) -> (N,)
    base = (rc.seed * 1000 + r) * 100_000
    seeds = [base + (i // g if rc.shared_noise else i) for i in range(len(index))]
    return [pool[i] for i in index.tolist()], seeds, index


def sample_share(accelerator, family, sampler, prompts, seeds, rc, r: int, keep_predictions: bool, cfg: float,
                 window: tuple[int, int] | None = None):  # fmt: skip
    """This process's chunks of the round, sampled and decoded, then every process's gathered in order; `cfg` is the
    CFG scale (`family.sampling_cfg(online.guidance)`), `window` the round's SDE window (None: the sampler's own).

    Returns the round's Trajectory (N chains, CPU) and images (N, 3, H, W) in [0, 1].
    """
    noise_seed = (rc.seed * 1000 + r) * 100_000
    starts = list(range(0, len(prompts), rc.sample_batch))
    parts = []
    for i in starts[accelerator.process_index :: accelerator.num_processes]:
        j = i + rc.sample_batch
        traj = sampler.sample(  # diffalign.sampling: DDIM-eta or flow SDE, same Trajectory
            family, prompts[i:j], seeds[i:j], cfg, noise_seed=noise_seed + i, keep_predictions=keep_predictions,
            window=window,
        )  # fmt: skip
        images = (family.decode(traj.x0.to(accelerator.device)).cpu() + 1) / 2  # (n, 3, H, W) in [0, 1]
        parts.append((i, traj, images))
    if accelerator.num_processes > 1:
        parts = gather_object(parts)  # every process's list, concatenated
    parts.sort(key=lambda part: part[0])
    return Trajectory.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def score_round(accelerator, scorer, monitors, images, prompts):
    """Rewards (N,) and monitored scores by the main process, broadcast so every process holds the same values."""
    reply = [None]
    if accelerator.is_main_process:
        with torch.no_grad():
            rewards = scorer(images, prompts).float().cpu()  # (N,)
            monitored = {m: s(images, prompts).float().cpu() for m, s in monitors.items()}
        reply = [(rewards, monitored)]
    if accelerator.num_processes > 1:
        broadcast_object_list(reply)
    return reply[0]


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
            raise DiffalignError(f"online.prompts=toy needs the held-out list {TOY_HELDOUT} (assets/make_toy_data.py)")
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
