"""What `diffalign online` does to make a round into a small dataset, by source (diffalign/sources/):
which prompts are sampled, how the samples are shared among processes and gathered, and which rows the round gives.

A round samples P prompt groups x G images (flat index i = p * G + g). Every process samples the chunks of
`sampling.sample_batch` images whose chunk number is its rank modulo the process count; chunk i's noise is keyed on its
first index, so the images do not depend on how many processes sample them. After each step (every process one
chunk) the chunks are gathered, and the main process hands them to its `ChunkScorer`, which scores them in a
background thread while the next chunks are sampled (`reward.overlap`; several chunks at once for a remote scorer),
so a round takes about max(sampling, scoring) instead of their sum. The chunks are the same whatever the process
count, so the rewards are too. A set-level scorer (diffalign.rewards.scores_each_image) scores the whole gathered
round after it is sampled. The main process broadcasts the rewards; every process then builds the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from diffalign.errors import DiffalignError
from diffalign.online.exemplars import ToyStatsEncoder, toy_vivid_exemplars
from diffalign.paths import TOY_HELDOUT
from diffalign.rewards import CONCURRENT, load_scorer, scores_each_image
from diffalign.rewards.distributional import frechet_distance, gaussian_stats
from diffalign.rewards.frames import FrameReduced
from diffalign.sampling import EncodedPrompts, Trajectory
from diffalign.toy import shapes


def plan_round(cfg, r: int, pool: list[str]) -> tuple[list[str], list[int], torch.Tensor]:
    """Round r's flat prompts (N = P*G; group p = rows p*G .. p*G+G-1), x_T seeds, and pool index of each row."""
    rng = np.random.default_rng([cfg.train.seed, r])
    chosen = rng.choice(len(pool), cfg.sampling.prompts_per_round, replace=cfg.sampling.prompts_per_round > len(pool))
    g = cfg.sampling.images_per_prompt
    index = torch.as_tensor(chosen).repeat_interleave(g)  # (P,) -> (N,)
    base = (cfg.train.seed * 1000 + r) * 100_000
    seeds = [base + (i // g if cfg.sampling.shared_noise else i) for i in range(len(index))]
    return [pool[i] for i in index.tolist()], seeds, index


# chunks a concurrent (remote) scorer scores at once; its client spreads their requests over its endpoints
CHUNKS_IN_FLIGHT = 4


class ChunkScorer:
    """Scores a round chunk by chunk in background threads while the next chunks are sampled (main process only):
    one thread for a scorer that holds a model, CHUNKS_IN_FLIGHT for a concurrent one (diffalign.rewards.CONCURRENT).
    Each chunk is scored as one call, so the rewards do not depend on the timing or the process count."""

    def __init__(self, scorer, workers: int):
        self.scorer = scorer
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="round-scorer")
        self.pending: list[tuple[int, Future]] = []

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():  # thread-local: set in the scoring thread
            return self.scorer(images, prompts).float().cpu()  # (n,)

    def submit(self, start: int, images: torch.Tensor, prompts: list[str]) -> None:
        """Chunk of images [start, start + n) with their prompts: scored from now on."""
        self.pending.append((start, self.pool.submit(self._score, images, prompts)))

    def rewards(self) -> torch.Tensor:
        """The round's (N,) rewards in index order, once every chunk is scored (a scorer error is raised here)."""
        done = sorted((start, future.result()) for start, future in self.pending)
        self.pending = []
        return torch.cat([scores for _, scores in done])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def chunk_scorer(cfg, scorer) -> ChunkScorer | None:
    """The main process's ChunkScorer when `reward.overlap` is on and the scorer scores each image on its own."""
    if scorer is None or not cfg.reward.overlap or not scores_each_image(cfg.reward.scorer, cfg.reward.args):
        return None
    return ChunkScorer(scorer, CHUNKS_IN_FLIGHT if cfg.reward.scorer in CONCURRENT else 1)


def sample_share(accelerator, family, sampler, prompts, seeds, cfg, r: int, keep_predictions: bool, cfg_scale: float,
                 window: tuple[int, int] | None = None,
                 on_chunk: Callable[[int, torch.Tensor, list[str]], None] | None = None,
                 lockstep: bool = False, text: EncodedPrompts | None = None):  # fmt: skip
    """This process's chunks of the round, sampled and decoded, then every process's gathered in order; `cfg_scale`
    is the CFG scale (`family.sampling_cfg(sampling.guidance)`), `window` the round's SDE window (None: the
    sampler's own). `on_chunk(start, images, prompts)` is called (on the main process) with every gathered chunk
    as soon as it is in, while the next ones are sampled. `lockstep` (an FSDP2-sharded denoiser, whose forwards are
    collectives): a process left without a chunk in the last step samples the last chunk again and drops it, so
    every process runs the same forwards. `text`: the round's prompts encoded once (chunk i:j samples with its
    rows, so the text encoders do not run per chunk, and the training steps see exactly the conditioning the
    chains were sampled with); None: each chunk encodes its own prompts.

    Returns the round's Trajectory (N chains, CPU) and images (N, 3, H, W) in [0, 1].
    """
    noise_seed = (cfg.train.seed * 1000 + r) * 100_000
    starts = list(range(0, len(prompts), cfg.sampling.sample_batch))
    world, rank = accelerator.num_processes, accelerator.process_index
    parts = []
    for k in range(0, len(starts), world):  # a step: each process samples one chunk (the last may leave some out)
        part = None
        if k + rank < len(starts) or lockstep:
            i = starts[min(k + rank, len(starts) - 1)]
            j = i + cfg.sampling.sample_batch
            cond = text.guided(torch.arange(i, min(j, len(prompts))), cfg_scale) if text is not None else None
            traj = sampler.sample(  # diffalign.sampling: DDIM-eta or flow SDE, same Trajectory
                family, prompts[i:j], seeds[i:j], cfg_scale, noise_seed=noise_seed + i,
                keep_predictions=keep_predictions, window=window, cond=cond,
            )  # fmt: skip
            images = (family.decode(traj.x0.to(accelerator.device)).cpu() + 1) / 2  # (n, 3, H, W) in [0, 1]
            part = (i, traj, images) if k + rank < len(starts) else None
        got = gather_object([part]) if world > 1 else [part]  # this step's chunks, in rank order
        for i, traj, images in (p for p in got if p is not None):
            if on_chunk is not None:
                on_chunk(i, images, prompts[i : i + len(images)])
            parts.append((i, traj, images))
    parts.sort(key=lambda part: part[0])
    return Trajectory.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def score_round(accelerator, scorer, monitors, images, prompts, chunks: ChunkScorer | None = None):
    """Rewards (N,) and monitored scores by the main process, broadcast so every process holds the same values;
    with `chunks`, the rewards are those its threads scored while the round was sampled."""
    reply = [None]
    if accelerator.is_main_process:
        with torch.no_grad():
            rewards = chunks.rewards() if chunks is not None else scorer(images, prompts).float().cpu()  # (N,)
            monitored = {m: s(images, prompts).float().cpu() for m, s in monitors.items()}
        reply = [(rewards, monitored)]
    if accelerator.num_processes > 1:
        broadcast_object_list(reply)
    return reply[0]


def build_reward(cfg):
    """The round's scorer; exemplars "toy_vivid" = high-saturation toy renders under the toy colour encoder. Videos
    are scored frame by frame and reduced by `reward.frame_reduce` (diffalign.rewards.frames)."""
    if cfg.reward.exemplars == "toy_vivid":
        exemplars = toy_vivid_exemplars(cfg.reward.exemplar_count, seed=cfg.train.seed + 1)
        return load_scorer(cfg.reward.scorer, exemplars=exemplars, encoder=ToyStatsEncoder(), **cfg.reward.args)
    if cfg.reward.exemplars:
        raise DiffalignError(
            f"reward.exemplars: '{cfg.reward.exemplars}' unknown (toy_vivid, or reward.args.exemplars)"
        )
    return FrameReduced(load_scorer(cfg.reward.scorer, **cfg.reward.args), cfg.reward.frame_reduce)


def read_train_prompts(source: str) -> list[str]:
    """The toy world's 80 captions minus the held-out ones; else a .txt file, one prompt per line."""
    if source == "toy":
        if not TOY_HELDOUT.is_file():
            raise DiffalignError(
                f"sampling.prompts=toy needs the held-out list {TOY_HELDOUT} (assets/make_toy_data.py)"
            )
        held = {line.strip() for line in TOY_HELDOUT.read_text().splitlines() if line.strip()}
        return [p for p in (shapes.caption(**c) for c in shapes.all_combinations()) if p not in held]
    path = Path(source)
    if not path.is_file():
        raise DiffalignError(f"sampling.prompts: {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def set_fd(scorer, images) -> float:
    """Fréchet distance of a whole image set to the scorer's exemplar Gaussian (encoder units)."""
    mu, cov = gaussian_stats(scorer.encoder.embed_images(images))
    return float(frechet_distance(mu, cov, scorer.exemplars.mu, scorer.exemplars.cov))


def eval_fd(scorer, pairs: tuple) -> dict[str, float]:
    """FD to the exemplars of the base and aligned images of the held-out evaluation, `pairs` = its (prompts, base,
    aligned) as `generate_pair_sets` drew them (same seeds for both)."""
    _, base, aligned = pairs
    return {"base": set_fd(scorer, base), "aligned": set_fd(scorer, aligned), "images": len(base)}
