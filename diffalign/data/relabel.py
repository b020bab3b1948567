"""AI-feedback labels: score both images of every pair once with a reward scorer, then reorder and relabel.

Diffusion-DPO (§5.4, `--choice_model`) relabels each pair by a scorer's argmax; SmPO orders each pair by the
scorer (official code: PickScore argmax) and labels it with the smoothed preference
p = softmax(min-max-normalised scores) (`diffalign.objectives.smpo.smpo_preference`). The scores are computed
once from the unaugmented images and saved as JSON, keyed by the pair's `index`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.data.pairs import PreferencePairs, collate, plain_view
from diffalign.errors import DiffalignError
from diffalign.objectives.smpo import smpo_preference

LABEL_MODES = ("argmax", "smpo")


def score_pairs(pairs: PreferencePairs, scorer, batch_size: int = 32, progress: bool = True) -> dict[int, list[float]]:
    """{pair index: [score of w, score of l]} for every pair (images as [0, 1] tensors, the pair's prompt)."""
    scores: dict[int, list[float]] = {}
    loader = DataLoader(plain_view(pairs), batch_size=batch_size, collate_fn=collate)
    for batch in tqdm(loader, desc="scoring pairs", disable=not progress):
        if "label" not in batch:
            continue
        prompts = batch["prompt"] * 2
        images = torch.cat([batch["pixels_w"], batch["pixels_l"]]) / 2 + 0.5  # (2B, 3, H, W) in [0, 1]
        with torch.no_grad():
            s_w, s_l = scorer(images, prompts).float().cpu().chunk(2)  # (2B,) -> (B,), (B,)
        for i, a, b in zip(batch["index"].tolist(), s_w.tolist(), s_l.tolist()):
            scores[i] = [a, b]
    return scores


def load_or_score(path: Path, pairs: PreferencePairs, scorer_name: str, scorer_factory, progress: bool = True):
    """Scores from `path` if it was made with the same scorer, else computed and written there atomically."""
    path = Path(path)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["scorer"] == scorer_name:
            return {int(k): v for k, v in saved["scores"].items()}
    scores = score_pairs(pairs, scorer_factory(), progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"scorer": scorer_name, "scores": scores}))
    os.replace(tmp, path)
    return scores


def relabel(
    scores: dict[int, list[float]], mode: str, lo: float = 0.0, hi: float = 0.0
) -> dict[int, tuple[bool, float]]:
    """{index: (swap w and l?, label = P(new w preferred))}.

    argmax: the higher-scored image wins with label 1 (ties keep the order, label 0.5).
    smpo: the higher-scored image wins with p = smpo_preference(score_hi, score_lo, lo, hi); lo/hi default to the
    min/max over all scores (the official code uses fixed PickScore bounds 0.11544 / 0.28202).
    """
    if mode not in LABEL_MODES:
        raise DiffalignError(f"data.label_mode must be one of {', '.join(LABEL_MODES)}, not '{mode}'")
    values = torch.tensor(list(scores.values()))  # (n, 2)
    if mode == "smpo" and lo == hi:
        lo, hi = float(values.min()), float(values.max())
    out = {}
    for index, (s_w, s_l) in scores.items():
        swap = s_l > s_w
        s_hi, s_lo = (s_l, s_w) if swap else (s_w, s_l)
        if mode == "argmax":
            label = 0.5 if s_hi == s_lo else 1.0
        else:
            label = float(smpo_preference(torch.tensor(s_hi), torch.tensor(s_lo), lo, hi))
        out[index] = (swap, label)
    return out


class Relabeled(Dataset):
    """A pairs dataset (raw or cached) with w/l swapped and labels replaced per pair index."""

    def __init__(self, dataset, labels: dict[int, tuple[bool, float]]):
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def counts(self):
        return self.dataset.counts

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        swap, label = self.labels[int(item["index"])]
        if swap:
            for key in [k for k in item if k.endswith("_w")]:
                other = key[:-2] + "_l"
                item[key], item[other] = item[other], item[key]
        item["label"] = label
        return item
