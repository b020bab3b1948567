"""Learning curves: held-out reward and fidelity along a run, next to its loss and implicit accuracy.

Every `train.validate_every` steps (and at step 0, where the LoRA is still zero so the point is the base model)
`Curves.point` samples the first `MAX_PROMPTS` eval prompts with `eval.curve_seeds` fixed seeds each, scores them
with every eval scorer and logs the means to tensorboard (`val/<scorer>`) and to `curves.jsonl`, with the win rate
of the first scorer against the base model's images on the same seeds (`win/<scorer>`: ties half; the base is the
step-0 point, or sampled with the adapters off after a resume; base-relative scorers such as toy_background_shift
measure against those base images). At the end `plot_curves`
draws curves.png from those rows and the run's metrics.jsonl (loss, implicit_acc). Sampling uses explicit seeds
and the training noise comes from per-pair generators, so drawing a curve does not change the training run.
Cost: MAX_PROMPTS images per point (the toy model: 16 images x 20 steps, about a second on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.config import EvalConfig
from diffalign.engine.evaluate import drawn_by, read_eval_prompts
from diffalign.lora import reference_mode
from diffalign.rewards import BASE_RELATIVE, load_scorer, score_against_base
from diffalign.rewards.compare import win_rate

MAX_PROMPTS = 16  # images per curve point: one seed per prompt


class Curves:
    """Held-out reward/fidelity points for one run; rows go to `path` (JSONL, one per point)."""

    def __init__(self, family, ecfg: EvalConfig, path: Path, generate=None, main: bool = True):
        """`generate(prompts, seeds, kw)`: how the images are drawn (default `family.generate`). A sharded run builds
        Curves on every process (`main` False but on one), with a `generate` that every process calls; the main
        process gets the images, scores and logs them."""
        self.family, self.path, self.main = family, Path(path), main
        self.generate = generate or drawn_by(family)
        self.label = "held-out" if ecfg.prompts == "toy" else "eval"  # "held-out" only for the held-out set
        self.prompts = [p for p in read_eval_prompts(ecfg)[:MAX_PROMPTS] for _ in range(ecfg.curve_seeds)]
        self.seeds = list(range(len(self.prompts)))  # fixed: every point scores the same noise
        self.scorers = {name: load_scorer(name) for name in ecfg.scorers} if main else {}
        self.kw = {"steps": ecfg.steps, **({"guidance": ecfg.guidance} if ecfg.guidance > 0 else {})}
        self.headline = ecfg.scorers[0]
        self.base = None  # (N,) the base model's headline scores on the same prompts and seeds
        self.base_images = None  # the base model's images, kept for the base-relative scorers
        self.has_base = False  # whether the base point was drawn (step 0, or after a resume)

    def scores(self) -> dict[str, torch.Tensor] | None:
        images = self.generate(self.prompts, self.seeds, self.kw)
        if images is None:  # not the main process of a sharded run: its share is drawn
            return None
        if self.base_images is None and self.paired:  # the first point: step 0 or, resumed, the base itself
            self.base_images = images
        with torch.no_grad():
            return {
                name: score_against_base(name, scorer, images, self.prompts, self.base_images).float().cpu()
                for name, scorer in self.scorers.items()
            }

    @property
    def paired(self) -> bool:
        return any(name in BASE_RELATIVE for name in self.scorers)

    def point(self, step: int, accelerator) -> dict:
        """Sample, score, log and append one row {"step", "images", "<scorer>": mean, "win/<headline>": rate}
        (the main process; the others draw their share and return {})."""
        if step > 0 and not self.has_base:  # resumed: the base on the same seeds, adapters off
            with reference_mode(self.family.denoiser):
                base = self.scores()
            self.base, self.has_base = (base[self.headline] if base is not None else None), True
        scores = self.scores()
        if scores is None:
            self.has_base = True
            return {}
        row = {"step": step, "images": len(self.prompts), **{k: float(v.mean()) for k, v in scores.items()}}
        if step == 0:
            self.base, self.has_base = scores[self.headline], True
        else:
            row[f"win/{self.headline}"] = win_rate(scores[self.headline], self.base)["win_rate"]
        accelerator.log({f"val/{k}": v for k, v in row.items() if k not in ("step", "images")}, step=step)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


TRAIN_KEYS = ("loss", "implicit_acc")  # `train` metrics.jsonl rows: {"step", "loss", ...}
ROUND_KEYS = ("reward", "train/loss")  # `online` rounds.jsonl rows: {"round", "reward", "train/loss", ...}


def plot_curves(
    curves_path: Path,
    metrics_path: Path,
    out_png: Path,
    label: str = "eval",
    train_keys: tuple[str, ...] = TRAIN_KEYS,
    x_key: str = "step",
) -> Path | None:
    """curves.png: one panel per scorer (held-out mean vs step) and one per `train_keys` metric from metrics_path
    (x = its `x_key`: "step" for train, "round" for online). Returns None (and draws nothing) when there are no
    curve points."""
    points, metrics = read_rows(curves_path), read_rows(metrics_path)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = [k for k in points[-1] if k not in ("step", "images")]  # win/<headline> is on every point but 0
    train_keys = [k for k in train_keys if metrics and k in metrics[0]]
    panels = len(scorers) + len(train_keys)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.0), squeeze=False)
    steps = [p["step"] for p in points]
    for ax, name in zip(axes[0], scorers):
        if name.startswith("win/"):  # vs the base on the same seeds: 0.5 = no change
            ax.plot(steps, [p.get(name, 0.5) for p in points], "o-", color="#2a9d4b")
            ax.axhline(0.5, color="gray", ls="--", lw=1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{label} win rate vs base, {name[4:]}", fontsize=9)
            continue
        ax.plot(steps, [p[name] for p in points], "o-", color="#3b7dd8")
        ax.axhline(points[0][name], color="gray", ls="--", lw=1)  # step 0 = the base model
        ax.set_title(f"{label} {name} (mean of {points[0]['images']} images)", fontsize=9)
    for ax, key in zip(axes[0][len(scorers) :], train_keys):
        ax.plot([m[x_key] for m in metrics], [m[key] for m in metrics], color="#d8823b")
        ax.set_title(key if "/" in key else f"train {key}", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel(x_key, fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
