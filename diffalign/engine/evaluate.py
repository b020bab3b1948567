"""Base vs aligned on held-out prompts with the same seeds: rewards, win rate with a 95% CI, the drift from the base
next to them (diffalign.engine.drift), a table, a plot, a side-by-side sheet of the largest changes
(diffalign.engine.report) and report.html.

The base model is the same network with its LoRA adapters off (`reference_mode`), so both image sets come from one
loaded model. Used at the end of `diffalign train` and `diffalign online` and by the toy-world benchmark.
The prompts are called held-out only when they are the toy world's held-out set (eval.prompts: toy).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.config import EvalConfig
from diffalign.engine.drift import format_drift, measure_drift, resolve_drift
from diffalign.engine.report import sheet_title, side_by_side, write_html
from diffalign.errors import DiffalignError
from diffalign.lora import reference_mode
from diffalign.paths import TOY_HELDOUT
from diffalign.rewards import load_scorer, score_against_base
from diffalign.rewards.compare import summarize


def read_eval_prompts(ecfg: EvalConfig) -> list[str]:
    path = Path(TOY_HELDOUT if ecfg.prompts == "toy" else ecfg.prompts)
    if not path.is_file():
        raise DiffalignError(f"eval.prompts: {path} not found")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts[: ecfg.max_prompts] if ecfg.max_prompts else prompts


def pair_jobs(prompts: list[str], images_per_prompt: int) -> list[tuple[str, int]]:
    """(prompt, seed) for every image: seed = prompt index * images_per_prompt + k."""
    return [(p, i * images_per_prompt + k) for i, p in enumerate(prompts) for k in range(images_per_prompt)]


def drawn_by(family):
    """`generate(prompts, seeds, kw)` of one process: `family.generate` (the default of Curves and generate_pair_sets)."""
    return lambda ps, seeds, kw: family.generate(ps, seeds=seeds, **kw)


def generate_pair_sets(family, prompts: list[str], ecfg: EvalConfig, batch_size: int = 64, generate=None):
    """Base and aligned images for every (prompt, seed), same seeds for both. `generate(prompts, seeds, kw)`: how
    a batch is drawn (default `family.generate`; a sharded run passes one that every process calls, which returns
    None outside the main process, and so does this)."""
    generate = generate or drawn_by(family)
    jobs = pair_jobs(prompts, ecfg.images_per_prompt)
    base, aligned, main = [], [], True
    kw = {"steps": ecfg.steps, **({"guidance": ecfg.guidance} if ecfg.guidance > 0 else {})}  # 0: family default
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        ps, seeds = [p for p, _ in chunk], [s for _, s in chunk]
        with reference_mode(family.denoiser):
            b = generate(ps, seeds, kw)
        a = generate(ps, seeds, kw)
        if b is None:  # another process of a sharded run: it drew its share for the main process
            main = False
            continue
        base, aligned = base + b, aligned + a
    return ([p for p, _ in jobs], base, aligned) if main else None


def evaluate_base_vs_lora(family, ecfg: EvalConfig, out_dir: Path, verbose: bool = True, pairs=None) -> dict:
    """Score base vs aligned with every scorer in ecfg.scorers and measure the drift (ecfg.drift); write report.json,
    report.png, sheet.png (base | aligned, largest changes) and report.html (which also embeds curves.png when the
    run drew one). `pairs`: generate_pair_sets' result when it was drawn already (by every process of a sharded
    run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = read_eval_prompts(ecfg)
    held_out = ecfg.prompts == "toy"
    job_prompts, base, aligned = pairs or generate_pair_sets(family, prompts, ecfg)
    report = {"prompts": len(prompts), "images": len(base), "held_out": held_out, "scorers": {}}
    per_image = {"base": {}, "aligned": {}}
    for name in ecfg.scorers:
        scorer = load_scorer(name)
        with torch.no_grad():
            s_base = score_against_base(name, scorer, base, job_prompts, base).float().cpu()
            s_aligned = score_against_base(name, scorer, aligned, job_prompts, base).float().cpu()
        report["scorers"][name] = summarize(s_aligned, s_base)
        per_image["base"][name], per_image["aligned"][name] = s_base.tolist(), s_aligned.tolist()
    drift = resolve_drift(ecfg.drift, prompts)
    report["drift"] = measure_drift(drift, job_prompts, base, aligned, ecfg.drift_encoder)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out_dir / "report.png")
    seeds = [s for _, s in pair_jobs(prompts, ecfg.images_per_prompt)]
    title = sheet_title(len(base), len(prompts), held_out, ecfg.scorers[0])
    side_by_side(
        base, aligned, job_prompts, seeds, per_image["base"], per_image["aligned"], out_dir / "sheet.png", title=title
    )
    intro = f"{len(base)} pairs (same prompt and seed) over {len(prompts)} {'held-out ' * held_out}prompts."
    figures = [
        ("Scores", "report.png"),
        ("Base | aligned: largest changes", "sheet.png"),
        ("Learning curves", "curves.png"),
        ("Reward-hacking guards (diffalign/engine/guarding.py)", "guards.png"),
    ]
    write_html(out_dir, "aligned vs base", intro, report, figures)
    if verbose:
        print(format_report(report))
        print(f"report.json, report.png, sheet.png (base | aligned) and report.html in {out_dir}")
    return report


def format_report(report: dict) -> str:
    """The report as a table; "held-out" only when report["held_out"] says the prompts were held out."""
    lines = [
        f"base vs aligned on {report['prompts']} {'held-out ' * report.get('held_out', False)}prompts "
        f"({report['images']} images, same seeds)",
        f"{'scorer':<16}{'base':>9}{'aligned':>9}{'change':>9}   win rate [95% CI]",
    ]
    for name, r in report["scorers"].items():
        lines.append(
            f"{name:<16}{r['mean_old']:>9.3f}{r['mean_new']:>9.3f}{r['mean_delta']:>+9.3f}   "
            f"{100 * r['win_rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        )
    return "\n".join(lines + format_drift(report.get("drift", {})))


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
