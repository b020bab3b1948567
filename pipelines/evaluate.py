"""Base vs aligned on held-out prompts with the same seeds: rewards, win rate with a 95% CI, a table and a plot.

The base model is the same network with its LoRA adapters off (`reference_mode`), so both image sets come from one
loaded model. Used at the end of `diffalign train` and by the toy-world benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.config import EvalConfig
from diffalign.errors import DiffalignError
from diffalign.lora import reference_mode
from diffalign.paths import TOY_HELDOUT
from diffalign.rewards import load_scorer
from diffalign.rewards.compare import mean_delta, win_rate
from pipelines.common import save_grid


def read_eval_prompts(ecfg: EvalConfig) -> list[str]:
    path = Path(TOY_HELDOUT if ecfg.prompts == "toy" else ecfg.prompts)
    if not path.is_file():
        raise DiffalignError(f"eval.prompts: {path} not found")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts[: ecfg.max_prompts] if ecfg.max_prompts else prompts


def generate_pair_sets(family, prompts: list[str], ecfg: EvalConfig, batch_size: int = 64):
    """Base and aligned images for every (prompt, seed), same seeds for both."""
    jobs = [(p, i * ecfg.images_per_prompt + k) for i, p in enumerate(prompts) for k in range(ecfg.images_per_prompt)]
    base, aligned = [], []
    kw = {"steps": ecfg.steps, **({"guidance": ecfg.guidance} if ecfg.guidance > 0 else {})}  # 0: family default
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        ps, seeds = [p for p, _ in chunk], [s for _, s in chunk]
        with reference_mode(family.denoiser):
            base += family.generate(ps, seeds=seeds, **kw)
        aligned += family.generate(ps, seeds=seeds, **kw)
    return [p for p, _ in jobs], base, aligned


def evaluate_base_vs_lora(family, ecfg: EvalConfig, out_dir: Path, verbose: bool = True) -> dict:
    """Score base vs aligned with every scorer in ecfg.scorers; write report.json + report.png + grids."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = read_eval_prompts(ecfg)
    job_prompts, base, aligned = generate_pair_sets(family, prompts, ecfg)
    report = {"prompts": len(prompts), "images": len(base), "scorers": {}}
    for name in ecfg.scorers:
        scorer = load_scorer(name)
        with torch.no_grad():
            s_base, s_aligned = scorer(base, job_prompts), scorer(aligned, job_prompts)
        report["scorers"][name] = summarize(s_aligned.float().cpu(), s_base.float().cpu())
    n_show = min(16, len(base))
    save_grid(base[:n_show], out_dir / "base.png", cols=n_show // 2 or 1)
    save_grid(aligned[:n_show], out_dir / "aligned.png", cols=n_show // 2 or 1)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out_dir / "report.png")
    if verbose:
        print(format_report(report))
        print(f"report, plot and image grids in {out_dir}")
    return report


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


def format_report(report: dict, prompts: str = "held-out prompts") -> str:
    """The report as a table; `prompts` says what the prompts were (compare does not know they were held out)."""
    lines = [
        f"base vs aligned on {report['prompts']} {prompts} ({report['images']} images, same seeds)",
        f"{'scorer':<16}{'base':>9}{'aligned':>9}{'change':>9}   win rate [95% CI]",
    ]
    for name, r in report["scorers"].items():
        lines.append(
            f"{name:<16}{r['mean_old']:>9.3f}{r['mean_new']:>9.3f}{r['mean_delta']:>+9.3f}   "
            f"{100 * r['win_rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        )
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scorers"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = report["scorers"][name]
        ax.bar(
            ["base", "aligned"],
            [r["mean_old"], r["mean_new"]],
            color=["#999999", "#3b7dd8"],
            yerr=[r["sem_old"], r["sem_new"]],
            capsize=4,
        )
        ax.set_title(
            f"{name}\nwin {100 * r['win_rate']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]", fontsize=9
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
