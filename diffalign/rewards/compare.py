"""Paired comparison of two models' scores on the same prompts (and seeds): win rate and mean delta with 95% CIs.

Pure functions of (N,) score tensors, row i of `scores_a` and `scores_b` scored on the same prompt; used by the
`diffalign compare` command. Preference scorers are only meaningful per prompt, so pair by prompt, never pool.
"""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054  # standard normal 97.5% quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); `successes` may count ties as halves."""
    if n <= 0:
        raise ValueError("need at least one pair")
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores_a: torch.Tensor, scores_b: torch.Tensor) -> dict[str, float]:
    """Share of pairs where a beats b, ties counted as half a win, with a Wilson 95% CI.

    Returns: win_rate, ci_low, ci_high, wins, ties, losses, n.
    """
    a, b = _paired(scores_a, scores_b)
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = a.numel()
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return dict(
        win_rate=(wins + 0.5 * ties) / n, ci_low=lo, ci_high=hi, wins=wins, ties=ties, losses=n - wins - ties, n=n
    )


def mean_delta(scores_a: torch.Tensor, scores_b: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over pairs with a paired percentile-bootstrap 95% CI (seeded, so reruns agree).

    Returns: mean_delta, ci_low, ci_high, std (of the per-pair deltas), n.
    """
    a, b = _paired(scores_a, scores_b)
    delta = (a - b).double()  # (N,)
    n = delta.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)  # resample pairs with replacement
    boot = delta[idx].mean(1)  # (n_boot, N) -> (n_boot,)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    std = float(delta.std()) if n > 1 else 0.0
    return dict(mean_delta=float(delta.mean()), ci_low=lo, ci_high=hi, std=std, n=n)


def summarize(new: torch.Tensor, old: torch.Tensor) -> dict:
    """Means (± s.e.m.) of both, win rate of new over old (ties half) with a Wilson 95% CI, mean delta with CI."""
    wins, delta = win_rate(new, old), mean_delta(new, old)
    sem = lambda x: float(x.std() / len(x) ** 0.5) if len(x) > 1 else 0.0  # noqa: E731
    return {
        "mean_old": float(old.mean()),
        "mean_new": float(new.mean()),
        "sem_old": sem(old),
        "sem_new": sem(new),
        "mean_delta": delta["mean_delta"],
        "delta_ci": [delta["ci_low"], delta["ci_high"]],
        "win_rate": wins["win_rate"],
        "ci_low": wins["ci_low"],
        "ci_high": wins["ci_high"],
        "n": len(new),
    }


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a).flatten().cpu(), torch.as_tensor(b).flatten().cpu()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"need two non-empty score vectors of equal length, got {a.numel()} and {b.numel()}")
    return a, b
