"""`diffalign compare base=DIR_OR_MANIFEST aligned=DIR_OR_MANIFEST scorers=[a,b]`: aligned vs base, paired.

Both sides are `diffalign generate` outputs (or hand-written manifests); an image of one side is paired with the
image of the other side that has the same (prompt, seed), so every pair shares its prompt and initial noise.
Preference scores only compare within a prompt, so the statistics are per pair: win rate of aligned over base
(ties half) with a Wilson 95% CI and mean delta with a bootstrap 95% CI (`diffalign.rewards.compare.summarize`).
Next to the scores, the drift of the aligned images from the base image of each pair (`drift`, default auto: the toy
drift scorers on toy prompts, else FD / CMMD to the base's images, saturation and high-frequency energy;
diffalign.engine.drift). Base-relative scorers (diffalign.rewards.BASE_RELATIVE) get the base image of each pair.
Writes report.json, report.png, sheet.png (base | aligned side by side, the largest reward changes in both
directions, each tile captioned with its scores; diffalign.engine.report), pairs.jsonl (per-pair scores), a self-contained
report.html and the run record, and prints the table (pairs.jsonl holds each pair's drift as `drift/<name>`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch
from diffalign.pipelines.score import load_scorers, open_images, pair_rows, read_side, score_rows

from diffalign.config import CompareConfig, load_config, save_config
from diffalign.engine.common import prepare_output_dir
from diffalign.engine.drift import resolve_drift, set_entry
from diffalign.engine.evaluate import format_report, plot_report
from diffalign.engine.report import pick_pairs, sheet_title, side_by_side, write_html
from diffalign.errors import DiffalignError
from diffalign.guards import SET_MEASURES, load_encoder
from diffalign.rewards.compare import summarize
from diffalign.runinfo import write_run_record


@torch.no_grad()
def embed_rows(encoder, root: Path, rows: list[dict], batch_size: int) -> torch.Tensor:
    """(N, D) embeddings of the images `rows` name, read one batch at a time."""
    parts = [
        encoder.embed_images(open_images(root, rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)
    ]
    return torch.cat([p.float().cpu() for p in parts])


def measure_drift(cfg: CompareConfig, prompts: list[str], base: tuple, aligned: tuple) -> tuple[dict, dict]:
    """The report's drift block (diffalign.engine.drift) and {name: aligned scores (N,)} of its per-pair measures.

    base, aligned: (root, rows), row i of both on one prompt and seed."""
    names = resolve_drift(cfg.drift, prompts)
    per_pair = [n for n in names if n not in SET_MEASURES]
    scorers = load_scorers(per_pair, {}) if per_pair else {}
    s_base = score_rows(scorers, *base, cfg.batch_size, desc="drift base", base=base) if scorers else {}
    s_aligned = score_rows(scorers, *aligned, cfg.batch_size, desc="drift aligned", base=base) if scorers else {}
    embedded = {}
    if len(per_pair) < len(names):
        encoder = load_encoder(cfg.drift_encoder)
        embedded = {side: embed_rows(encoder, *rows, cfg.batch_size) for side, rows in (("b", base), ("a", aligned))}
    drift = {
        name: set_entry(SET_MEASURES[name](embedded["a"], embedded["b"]), cfg.drift_encoder, len(prompts))
        if name in SET_MEASURES
        else summarize(s_aligned[name], s_base[name])
        for name in names
    }
    return drift, s_aligned


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> Path:
    cfg: CompareConfig = load_config(CompareConfig, config, list(overrides))
    base_root, base_rows = read_side(cfg.base, "base")
    aligned_root, aligned_rows = read_side(cfg.aligned, "aligned")
    pairs = pair_rows(base_rows, aligned_rows)
    if cfg.grid_pairs < 1:
        raise DiffalignError(f"grid_pairs must be >= 1, not {cfg.grid_pairs}")
    scorers = load_scorers(cfg.scorers, cfg.scorer_args)
    out = prepare_output_dir(cfg.output_dir, default_name="compare")

    base_rows, aligned_rows = [b for b, _ in pairs], [a for _, a in pairs]
    base = (base_root, base_rows)  # what the base-relative scorers measure against, pair by pair
    s_base = score_rows(scorers, base_root, base_rows, cfg.batch_size, desc="score base", base=base)
    s_aligned = score_rows(scorers, aligned_root, aligned_rows, cfg.batch_size, desc="score aligned", base=base)
    drift, drift_aligned = measure_drift(cfg, [b["prompt"] for b in base_rows], base, (aligned_root, aligned_rows))
    n_show = min(cfg.grid_pairs, len(pairs))
    report = {
        "base": str(base_root),
        "aligned": str(aligned_root),
        "prompts": len({b["prompt"] for b in base_rows}),
        "images": len(pairs),
        "grid_pairs": n_show,
        "scorers": {name: summarize(s_aligned[name], s_base[name]) for name in scorers},  # new = aligned, old = base
        "drift": drift,
    }

    with open(out / "pairs.jsonl", "w") as f:
        for i, (b, a) in enumerate(pairs):
            row = {"prompt": b["prompt"], "seed": b["seed"], "base_file": b["file"], "aligned_file": a["file"]}
            for name in scorers:
                row[f"{name}_base"], row[f"{name}_aligned"] = float(s_base[name][i]), float(s_aligned[name][i])
            for name, s in drift_aligned.items():
                row[f"drift/{name}"] = float(s[i])
            f.write(json.dumps(row) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out / "report.png")
    first = list(scorers)[0]  # the sheet shows the pairs this scorer moved most, both ways
    deltas = (s_aligned[first] - s_base[first]).tolist()
    idx = pick_pairs(deltas, n_show)
    shown = {"base": open_images(base_root, [base_rows[i] for i in idx]),
             "aligned": open_images(aligned_root, [aligned_rows[i] for i in idx])}  # fmt: skip
    scores = {
        side: {n: [float(s[n][i]) for i in idx] for n in scorers}
        for side, s in (("base", s_base), ("aligned", s_aligned))
    }
    title = sheet_title(len(pairs), report["prompts"], False, first)  # compare cannot know how prompts were chosen
    side_by_side(
        shown["base"],
        shown["aligned"],
        [base_rows[i]["prompt"] for i in idx],
        [base_rows[i]["seed"] for i in idx],
        scores["base"],
        scores["aligned"],
        out / "sheet.png",
        n_pairs=n_show,
        title=title,
    )
    intro = (
        f"base: <code>{html.escape(report['base'])}</code><br>aligned: <code>{html.escape(report['aligned'])}</code><br>"
        f"{report['images']} pairs (same prompt and seed) over {report['prompts']} prompts."
    )
    write_html(
        out,
        "aligned vs base",
        intro,
        report,
        [("Scores", "report.png"), (f"Base | aligned: the {n_show} largest changes in {first}", "sheet.png")],
    )
    save_config(cfg, out / "config.yaml")
    write_run_record(out)
    print(format_report(report))
    print(f"wrote report.json, report.png, sheet.png (base | aligned), pairs.jsonl and report.html to {out}")
    return out
