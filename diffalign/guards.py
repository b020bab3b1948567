"""Reward-hacking guards: monitors measured on held-out prompts with fixed seeds, each with a rule relative to the
base model's value, so a run can stop before a hacked reward breaks the images.

Why: on-line alignment games its reward (flow_grpo #92, #204, #233: grids, blur; DanceGRPO #36: ImageReward corrupts
images; Pref-GRPO #2: over-saturation; SRPO #22: collapse in ~10 steps). A KL term slows this down but does not stop
it (Flow-GRPO: KL "is not the same as early stopping"); the remedy in use is a person watching held-out "gold"
metrics. This module automates that watch.

A monitor is a function (images (N, 3, H, W) in [0, 1], prompts (N,), group G, base images (N, 3, H, W)) -> float,
where the N images are P prompts x G seeds (flat index p * G + g) and the base images are the base model's on the
same prompts and seeds. Kinds (MONITOR_KINDS):
- scorer: the mean of any registered scorer (a gold reward: use one other than the training reward); a base-relative
  one (diffalign.rewards.BASE_RELATIVE: toy_background_shift, ...) measures each image against the base image on the
  same prompt and seed, so its base value is 0 and `max_rise` bounds the drift itself;
- vendi: diversity, the mean over prompts of the Vendi score (Friedman & Dieng 2023, exp of the entropy of the
  cosine-kernel eigenvalues, 1 ... G) of the G same-prompt samples;
- fd / cmmd: drift, the Fréchet distance (Heusel et al. 2017) or CMMD (Jayasumana et al. 2024, scale 1000, RBF
  sigma 10 on normalised embeddings) between the images and the base model's own images (0 at the base);
- saturation, hf_energy, sharpness: the mean of the cheap image statistics of diffalign.rewards.imagestats
  (over-saturation, grid artifacts, blur);
- frame_consistency (video families): the mean embedding change between consecutive frames
  (diffalign.rewards.frames), max_rise against flicker, max_drop against frozen videos. On videos
  (N, 3, F, H, W) the scorer kinds average their frame scores.

A rule compares value v with the base value b measured once at the start (`check`):
    max_drop: trips when  b - v > limit      max_rise: trips when  v - b > limit
with `relative`, the limit is a fraction of |b| (0.1 = 10%).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffalign.rewards import load_scorer, score_against_base
from diffalign.rewards.distributional import cmmd, frechet_distance, gaussian_stats, vendi_score
from diffalign.rewards.frames import FrameReduced, as_videos, frame_consistency
from diffalign.rewards.toy import as_tensor

Measure = Callable[[torch.Tensor, Sequence[str], int, torch.Tensor], float]


# ---- embeddings for vendi / fd / cmmd -------------------------------------------------------------------------


class PixelEncoder:
    """(N, 3, H, W) in [0, 1] -> (N, 3 * 8 * 8): the image average-pooled to 8x8, in [-1, 1]. No weights."""

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        x = as_tensor(images) * 2 - 1
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)  # (N, 3, H, W) -> (N, 192)


def toy_stats_encoder():
    from diffalign.online.exemplars import ToyStatsEncoder

    return ToyStatsEncoder()


ENCODERS: dict[str, Callable[[], object]] = {"pixels": PixelEncoder, "toy_stats": toy_stats_encoder}


def load_encoder(name: str):
    """A registered encoder, else a transformers CLIP model id or folder."""
    if name in ENCODERS:
        return ENCODERS[name]()
    from diffalign.rewards.embeddings import ClipEncoder

    return ClipEncoder.load(name)


# ---- monitor kinds --------------------------------------------------------------------------------------------


def scorer_measure(name: str, scorer) -> Measure:
    """The mean of scorer `name`; a base-relative one (diffalign.rewards.BASE_RELATIVE) against the base images."""

    scorer = FrameReduced(scorer)  # videos: the frame average; images unchanged

    def measure(images, prompts, group, base):
        with torch.no_grad():
            return float(score_against_base(name, scorer, images, list(prompts), base).float().mean())

    return measure


def vendi_measure(encoder) -> Measure:
    def measure(images, prompts, group, base):
        if group < 2:
            raise ValueError("the vendi monitor needs guards.images_per_prompt >= 2")
        emb = encoder.embed_images(images).float().cpu()  # (N, D)
        per_prompt = [vendi_score(e) for e in emb.split(group)]  # P x (G, D) -> P x ()
        return float(torch.stack(per_prompt).mean())

    return measure


def frame_measure(encoder) -> Measure:
    def measure(images, prompts, group, base):
        return frame_consistency(encoder, images)

    return measure


def fd_between(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between two embedding sets (N, D) and (M, D), float64."""
    mu, cov = gaussian_stats(x.double().cpu())
    mu0, cov0 = gaussian_stats(y.double().cpu())
    return max(float(frechet_distance(mu, cov, mu0, cov0)), 0.0)  # tiny negatives are round-off


def cmmd_between(x: torch.Tensor, y: torch.Tensor) -> float:
    """CMMD (biased) between two embedding sets, each embedding normalised to unit length."""
    x, y = x.float().cpu(), y.float().cpu()
    return float(cmmd(x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True), unbiased=False))


SET_MEASURES = {"fd": fd_between, "cmmd": cmmd_between}  # a set of images against the base's own images


def set_measure(between, encoder) -> Measure:
    def measure(images, prompts, group, base):
        return between(encoder.embed_images(images), encoder.embed_images(base))

    return measure


MONITOR_KINDS: dict[str, Callable[..., Measure]] = {
    "scorer": lambda scorer, scorer_args, encoder: scorer_measure(scorer, load_scorer(scorer, **scorer_args)),
    "vendi": lambda scorer, scorer_args, encoder: vendi_measure(load_encoder(encoder)),
    "fd": lambda scorer, scorer_args, encoder: set_measure(fd_between, load_encoder(encoder)),
    "cmmd": lambda scorer, scorer_args, encoder: set_measure(cmmd_between, load_encoder(encoder)),
    "saturation": lambda scorer, scorer_args, encoder: scorer_measure("saturation", load_scorer("saturation")),
    "hf_energy": lambda scorer, scorer_args, encoder: scorer_measure("hf_energy", load_scorer("hf_energy")),
    "sharpness": lambda scorer, scorer_args, encoder: scorer_measure("sharpness", load_scorer("sharpness")),
    "frame_consistency": lambda scorer, scorer_args, encoder: frame_measure(load_encoder(encoder)),
}


# ---- rules ----------------------------------------------------------------------------------------------------


def change(value: float, base: float, rule: str) -> float:
    """The change a rule limits: base - value (max_drop) or value - base (max_rise)."""
    return {"max_drop": base - value, "max_rise": value - base}[rule]


def allowed(base: float, limit: float, relative: bool) -> float:
    return limit * abs(base) if relative else limit


@dataclass
class Monitor:
    name: str
    measure: Measure
    rule: str  # max_drop | max_rise
    limit: float
    relative: bool = False

    @classmethod
    def build(cls, name: str, kind: str, rule: str, limit: float, relative: bool = False, scorer: str = "",
              scorer_args: dict | None = None, encoder: str = "pixels") -> Monitor:  # fmt: skip
        if kind == "scorer" and not scorer:
            raise ValueError(f"monitor '{name}': kind scorer needs a scorer name")
        return cls(name, MONITOR_KINDS[kind](scorer, scorer_args or {}, encoder), rule, limit, relative)

    def trip(self, value: float, base: float) -> str | None:
        """None if the rule holds, else one line naming the monitor, its value, the base and the limit."""
        limit = allowed(base, self.limit, self.relative)
        moved = change(value, base, self.rule)
        if moved <= limit:
            return None
        way = {"max_drop": "dropped", "max_rise": "rose"}[self.rule]
        pct = f" ({self.limit:.0%} of base)" if self.relative else ""
        return f"{self.name} {value:.4g} {way} {moved:.4g} from base {base:.4g} (limit {limit:.4g}{pct})"


def measure_all(monitors: Sequence[Monitor], images, prompts, group: int, base) -> dict[str, float]:
    """Every monitor's value on `images` (P*G, 3, H, W) in [0, 1] (videos: (P*G, 3, F, H, W)) against the base."""
    videos = as_videos(images)
    x, x0 = (as_tensor(images), as_tensor(base)) if videos is None else (videos, as_videos(base))
    return {m.name: m.measure(x, prompts, group, x0) for m in monitors}


def trips(monitors: Sequence[Monitor], values: dict[str, float], base: dict[str, float]) -> list[str]:
    """The lines of every rule that fails (empty: all guards pass)."""
    return [line for m in monitors if (line := m.trip(values[m.name], base[m.name])) is not None]
