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


def scorer_class(name: str) -> type:
    if name not in SCORERS:
        raise KeyError(f"unknown scorer '{name}' (known: {', '.join(sorted(SCORERS))})")
    module, cls = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_scorer(name: str, **kwargs):
    """Build scorer `name`; kwargs (weights path, device, dtype, ...) go to its `load`."""
    return scorer_class(name).load(**kwargs)
