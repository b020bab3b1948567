"""Multi-reward: a weighted sum of scorers, each normalised first, so rewards on different scales can be mixed.

Score = Σ_k w_k · norm(s_k(images, prompts)), with `normalize`:
- "none": raw scores (the weights carry the scales);
- "batch": z-score over the batch, (s − mean) / (std + ε);
- "group": z-score within each group of images that share a prompt (the on-line round's G samples of one
  prompt), as Flow-GRPO's per-prompt advantage normalisation when it mixes GenEval, OCR and PickScore; a group of
  one image, or one whose scores are all equal, contributes 0.
std is the population std (ddof 0), ε = 1e-6. Use "none" or "batch" for `diffalign compare` (its batches are not
groups of one prompt).

    load_scorer("multi", components={"pickscore": {"weight": 1.0}, "ocr": {"weight": 0.5, "model": PATH}},
                normalize="group")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffalign.rewards.preprocess import Images

EPS = 1e-6


def zscore(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean()) / (s.std(unbiased=False) + EPS)


def group_zscore(s: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """(N,) scores, N prompts -> (N,) z-scored within each set of equal prompts."""
    out = torch.zeros_like(s)
    for prompt in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        out[idx] = zscore(s[idx])
    return out


NORMALIZE: dict[str, Callable[[torch.Tensor, Sequence[str]], torch.Tensor]] = {
    "none": lambda s, prompts: s,
    "batch": lambda s, prompts: zscore(s),
    "group": group_zscore,
}


@dataclass
class MultiReward:
    scorers: dict
    weights: dict[str, float]
    normalize: str = "none"

    @classmethod
    def load(cls, components: dict[str, dict], normalize: str = "none") -> MultiReward:
        """`components`: {scorer name: {weight: w, <that scorer's load options>}}; `normalize`: none | batch | group."""
        from diffalign.rewards import load_scorer

        if normalize not in NORMALIZE:
            raise ValueError(f"multi: normalize '{normalize}' unknown ({', '.join(NORMALIZE)})")
        if not components or "multi" in components:
            raise ValueError("multi: components must name at least one scorer other than multi")
        scorers, weights = {}, {}
        for name, options in components.items():
            options = dict(options or {})
            if "weight" not in options:
                raise ValueError(f"multi: components.{name} needs a weight")
            weights[name] = float(options.pop("weight"))
            scorers[name] = load_scorer(name, **options)
        return cls(scorers, weights, normalize)

    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) weighted sum of normalised scores."""
        norm = NORMALIZE[self.normalize]
        parts = [w * norm(self.scorers[n](images, prompts).float().cpu(), prompts) for n, w in self.weights.items()]
        return torch.stack(parts).sum(dim=0)  # (K, N) -> (N,)
