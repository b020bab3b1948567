"""Who wins: pair builders (D3PO), DRAGON's positive / negative split rules, human-label files.

A round's images are laid out as P prompt groups of G images, flat index i = p * G + g; the G images of a group
share the prompt (and, for D3PO, the initial noise x_T). Rewards come in as (P, G). Every builder returns flat
indices, so the trainer can gather latents, trajectories and prompts with them.

DRAGON (Bai et al. 2025, arXiv 2504.15217) has no public code and its split rule is unverified
(docs/objectives.md §5), so these are our choices:

- paired, for the Diffusion-DPO surrogate (`best_worst`): in every group the highest-reward image is the winner
  and the lowest the loser; a group whose best-worst gap is <= min_gap gives no pair.
  Why: comparing within a prompt removes prompt difficulty (a hard prompt's best image can score below an easy
  prompt's worst), as Pick-a-Pic pairs do; best vs worst is the largest, least noisy gap a group offers, and one
  pair per group keeps the pairs independent.
- unpaired, for the Diffusion-KTO surrogate (`top_bottom`): advantage a = r - mean of its group; over the whole
  round, the top `fraction` of advantages is desirable and the bottom `fraction` undesirable; the middle is dropped.
  Why: KTO needs only set membership, so the split can use every group at once, but still relative to its prompt
  (same reason as above); dropping the middle keeps ambiguous samples out of both sets.
  Distribution-level rewards (fd_exemplar, cmmd_exemplar, vendi) give per-image leave-one-out contributions to
  the set metric of the round's whole batch; the same rules then split them.
- D3PO (`all_pairs`): every pair (i, j) of a group with |r_i - r_j| > min_gap, the higher reward preferred; with
  G = 2 this is the official one pair per x_T. Ties are skipped (the official h = 0 gives no gradient anyway).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _flat(p: torch.Tensor, g: torch.Tensor, group_size: int) -> torch.Tensor:
    return p * group_size + g


def all_pairs(rewards: torch.Tensor, min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every within-group pair with a gap > min_gap: rewards (P, G) -> idx_w (B,), idx_l (B,) flat indices."""
    n_prompts, g = rewards.shape
    i, j = torch.triu_indices(g, g, offset=1)  # (2, G(G-1)/2)
    r_i, r_j = rewards[:, i], rewards[:, j]  # (P, M)
    keep = (r_i - r_j).abs() > min_gap  # (P, M)
    p = torch.arange(n_prompts)[:, None].expand_as(r_i)
    win = torch.where(r_i >= r_j, i.expand_as(r_i), j.expand_as(r_i))
    lose = torch.where(r_i >= r_j, j.expand_as(r_i), i.expand_as(r_i))
    return _flat(p[keep], win[keep], g), _flat(p[keep], lose[keep], g)


def best_worst(rewards: torch.Tensor, min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair per group, best vs worst, if their gap > min_gap: (P, G) -> idx_w (B,), idx_l (B,)."""
    n_prompts, g = rewards.shape
    best, worst = rewards.argmax(1), rewards.argmin(1)  # (P,)
    gap = rewards.max(1).values - rewards.min(1).values  # (P,)
    keep = gap > min_gap
    p = torch.arange(n_prompts)
    return _flat(p[keep], best[keep], g), _flat(p[keep], worst[keep], g)


def top_bottom(rewards: torch.Tensor, fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Top / bottom `fraction` of within-group advantages over the round: (P, G) -> idx (M,), desirable (M,) bool."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"top_bottom: fraction must be in (0, 0.5], got {fraction}")
    adv = (rewards - rewards.mean(1, keepdim=True)).flatten()  # (P, G) -> (P*G,)
    k = max(1, int(round(fraction * adv.numel())))
    order = adv.argsort(descending=True)
    top, bottom = order[:k], order[-k:]
    idx = torch.cat([top, bottom])
    desirable = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)])
    keep = torch.cat([adv[top] > adv[bottom].max(), adv[bottom] < adv[top].min()])  # all-equal rounds give nothing
    return idx[keep], desirable[keep]


PAIR_RULES = {"all_pairs": all_pairs, "best_worst": best_worst}
SPLIT_RULES = {"top_bottom": top_bottom}


def pairs_from_labels(labels: list[dict], round_index: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Human choices of one round -> idx_w, idx_l; ties skipped.

    Each label: {"round": r, "prompt": p (index within the round), "a": i, "b": j (indices within the group),
    "choice": "a" | "b" | "tie"}, as a person fills it in from the round's grid (`rounds/round-XXXX.png`, r = XXXX:
    row p = prompt group p, column = image index). Sampling is seeded per round, so a preview run with
    `train.steps_per_round=0` writes the same grid the labelled run will train on (from the same starting policy). The D3PO human-feedback script likewise uses all labelled pairs, ties skipped.
    """
    idx_w, idx_l = [], []
    for item in labels:
        if item["round"] != round_index:
            continue
        if item["choice"] not in ("a", "b", "tie"):
            raise ValueError(f"label {item}: choice must be 'a', 'b' or 'tie'")
        if not (0 <= item["a"] < group_size and 0 <= item["b"] < group_size) or item["a"] == item["b"]:
            raise ValueError(f"label {item}: a and b must be two different indices in [0, {group_size})")
        if item["choice"] == "tie":
            continue
        win, lose = (item["a"], item["b"]) if item["choice"] == "a" else (item["b"], item["a"])
        idx_w.append(item["prompt"] * group_size + win)
        idx_l.append(item["prompt"] * group_size + lose)
    return torch.tensor(idx_w, dtype=torch.long), torch.tensor(idx_l, dtype=torch.long)


def read_labels(path: str | Path) -> list[dict]:
    """A JSON list of label dicts (see `pairs_from_labels`)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of pair choices")
    return data
