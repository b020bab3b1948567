"""Reward scorers behind one batched signature: `scorer(images, prompts) -> (N,) tensor`.

Images are PIL images or a float tensor (N, 3, H, W) in [0, 1]. Each scorer is a small class in its own file,
registered here; heavy libraries (open_clip, transformers models) are imported inside `load`, so importing this
package is cheap.

    from diffalign.rewards import load_scorer
    scorer = load_scorer("toy_aesthetic")
    scores = scorer(images, prompts)   # (N,)
"""

from __future__ import annotations

import importlib

# name -> "module:Class" (imported on first use)
SCORERS: dict[str, str] = {
    "toy_aesthetic": "diffalign.rewards.toy:ToyAesthetic",
    "toy_fidelity": "diffalign.rewards.toy:ToyFidelity",
    "clip_score": "diffalign.rewards.clip_score:ClipScore",
    "clip_score_openclip": "diffalign.rewards.clip_score:OpenClipScore",
    "aesthetic": "diffalign.rewards.aesthetic:LaionAesthetic",
    "pickscore": "diffalign.rewards.pickscore:PickScore",
    "hpsv2": "diffalign.rewards.hpsv2:HPSv2",
    "fd_exemplar": "diffalign.rewards.distributional:FDExemplar",
    "loglik_exemplar": "diffalign.rewards.distributional:LoglikExemplar",
    "cmmd_exemplar": "diffalign.rewards.distributional:CMMDExemplar",
    "vendi": "diffalign.rewards.distributional:Vendi",
    "geneval": "diffalign.rewards.geneval:GenEvalScore",
    "ocr": "diffalign.rewards.ocr:OcrScore",
    "vlm_judge": "diffalign.rewards.vlm_judge:VlmJudge",
    "remote": "diffalign.rewards.remote:RemoteScore",
    "imagereward": "diffalign.rewards.imagereward:ImageReward",
    "hpsv3": "diffalign.rewards.hpsv3:HPSv3",
    "multi": "diffalign.rewards.multi:MultiReward",
    "saturation": "diffalign.rewards.imagestats:Saturation",
    "hf_energy": "diffalign.rewards.imagestats:HighFrequency",
    "sharpness": "diffalign.rewards.imagestats:Sharpness",
    "toy_saturation": "diffalign.rewards.imagestats:ToySaturation",
    "toy_area": "diffalign.rewards.imagestats:ToyArea",
}

# Scorers whose score of one image depends on the other images of the call (a set statistic): a call is never
# split into chunks or merged with another (on-line overlap, the reward server's batching).
SET_LEVEL = frozenset({"fd_exemplar", "loglik_exemplar", "cmmd_exemplar", "vendi"})
# Scorers that hold no model and may be called from several threads at once (their calls wait on a server).
CONCURRENT = frozenset({"remote"})


def scores_each_image(name: str, args: dict | None = None) -> bool:
    """Whether scorer `name` loaded with `args` scores every image on its own, so that its calls may be split or
    merged without changing a score. `multi` does when it does not normalise and each of its components does."""
    args = args or {}
    if name == "multi":
        parts = args.get("components") or {}
        return args.get("normalize", "none") == "none" and all(scores_each_image(n, o) for n, o in parts.items())
    return name not in SET_LEVEL


def scorer_class(name: str) -> type:
    if name not in SCORERS:
        raise KeyError(f"unknown scorer '{name}' (known: {', '.join(sorted(SCORERS))})")
    module, cls = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_scorer(name: str, **kwargs):
    """Build scorer `name`; kwargs (weights path, device, dtype, ...) go to its `load`."""
    return scorer_class(name).load(**kwargs)
