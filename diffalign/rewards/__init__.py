"""Reward scorers behind one batched signature: `scorer(images, prompts) -> (N,) tensor`.

Images are PIL images or a float tensor (N, 3, H, W) in [0, 1]. Each scorer is a small class in its own file,
registered here; heavy libraries (open_clip, transformers models) are imported inside `load`, so importing this
package is cheap.

    from diffalign.rewards import load_scorer
    scorer = load_scorer("toy_aesthetic")
    scores = scorer(images, prompts)   # (N,)

The scorers in `BASE_RELATIVE` measure drift: an image against the base model's image on the same prompt and seed,
`scorer(images, prompts, base_images) -> (N,)`. `score_against_base` calls any scorer by name with what it needs.
"""

from __future__ import annotations

import importlib

# name -> "module:Class" (imported on first use)
SCORERS: dict[str, str] = {
    "toy_aesthetic": "diffalign.rewards.toy:ToyAesthetic",
    "toy_fidelity": "diffalign.rewards.toy:ToyFidelity",
    "toy_position_error": "diffalign.rewards.toy_drift:ToyPositionError",
    "toy_size_error": "diffalign.rewards.toy_drift:ToySizeError",
    "toy_colour_error": "diffalign.rewards.toy_drift:ToyColourError",
    "toy_background_shift": "diffalign.rewards.toy_drift:ToyBackgroundShift",
    "toy_background_texture": "diffalign.rewards.toy_drift:ToyBackgroundTexture",
    "toy_outline_change": "diffalign.rewards.toy_drift:ToyOutlineChange",
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


# scorers called as scorer(images, prompts, base_images): the base model's images on the same prompts and seeds
BASE_RELATIVE = frozenset({"toy_background_shift", "toy_background_texture", "toy_outline_change"})
# every toy drift scorer, the default drift of a toy-world report (diffalign.rewards.toy_drift)
TOY_DRIFT = (
    "toy_position_error",
    "toy_size_error",
    "toy_colour_error",
    "toy_background_shift",
    "toy_background_texture",
    "toy_outline_change",
)


def scorer_class(name: str) -> type:
    if name not in SCORERS:
        raise KeyError(f"unknown scorer '{name}' (known: {', '.join(sorted(SCORERS))})")
    module, cls = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_scorer(name: str, **kwargs):
    """Build scorer `name`; kwargs (weights path, device, dtype, ...) go to its `load`."""
    return scorer_class(name).load(**kwargs)


def score_against_base(name: str, scorer, images, prompts, base_images=None):
    """`scorer` (registered as `name`) on images and prompts, with the base images when it measures against them.

    base_images: the base model's images on the same prompts and seeds, row for row; None where there are none,
    which a BASE_RELATIVE scorer refuses with a ValueError naming it."""
    if name not in BASE_RELATIVE:
        return scorer(images, prompts)
    if base_images is None:
        raise ValueError(f"scorer '{name}' measures images against the base model's images on the same prompts and "
                         "seeds, and none were given")  # fmt: skip
    return scorer(images, prompts, base_images)
