"""`diffalign compare base=DIR_OR_MANIFEST aligned=DIR_OR_MANIFEST scorers=[a,b]`: aligned vs base, paired.

Both sides are `diffalign generate` outputs (or hand-written manifests); an image of one side is paired with the
image of the other side that has the same (prompt, seed), so every pair shares its prompt and initial noise.
Preference scores only compare within a prompt, so the statistics are per pair: win rate of aligned over base
(ties half) with a Wilson 95% CI and mean delta with a bootstrap 95% CI (`diffalign.engine.evaluate.summarize`).
Writes report.json, report.png, sheet.png (base | aligned side by side, the largest reward changes in both
directions, each tile captioned with its scores; diffalign.engine.report), pairs.jsonl (per-pair scores), a self-contained
report.html and the run record, and prints the table.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from diffalign.pipelines.score import MANIFEST, load_scorers, open_images, read_manifest, score_rows

from diffalign.config import CompareConfig, load_config, save_config
from diffalign.engine.common import prepare_output_dir
from diffalign.engine.evaluate import format_report, plot_report, summarize
from diffalign.engine.report import pick_pairs, sheet_title, side_by_side, write_html
from diffalign.errors import DiffalignError
from diffalign.runinfo import write_run_record


def read_side(path: str, side: str) -> tuple[Path, list[dict]]:
    """`base=` / `aligned=` -> (root, rows); a folder must hold a manifest (pairing needs prompts and seeds)."""
    p = Path(path)
    if not path or not p.exists():
        raise DiffalignError(f"{side}: {p} not found" if path else f"{side}: set {side}=DIR or {side}=MANIFEST")
    if p.is_dir() and not (p / MANIFEST).is_file():
        raise DiffalignError(f"{side}: {p} has no {MANIFEST} (compare pairs images by prompt and seed)")
    return read_manifest(p if p.is_file() else p / MANIFEST)


def pair_rows(base: list[dict], aligned: list[dict]) -> list[tuple[dict, dict]]:
    """(base row, aligned row) with equal (prompt, seed), in base order; every row must find exactly one partner."""
    by_key = {}
    for side, rows in (("base", base), ("aligned", aligned)):
        seen = {}
        for row in rows:
            key = (row["prompt"], row["seed"])
            if key in seen:
                raise DiffalignError(
                    f"{side}: {row['file']} and {seen[key]} have the same prompt {key[0]!r} and seed {key[1]}"
                )
            seen[key] = row["file"]
        by_key[side] = {(r["prompt"], r["seed"]): r for r in rows}
    for side, other in (("base", "aligned"), ("aligned", "base")):
        for key, row in by_key[side].items():
            if key not in by_key[other]:
                raise DiffalignError(
                    f"{side} image {row['file']} (prompt {key[0]!r}, seed {key[1]}) has no {other} image with the "
                    "same prompt and seed"
                )
    return [(row, by_key["aligned"][key]) for key, row in by_key["base"].items()]


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
    s_base = score_rows(scorers, base_root, base_rows, cfg.batch_size, desc="score base")
    s_aligned = score_rows(scorers, aligned_root, aligned_rows, cfg.batch_size, desc="score aligned")
    n_show = min(cfg.grid_pairs, len(pairs))
    report = {
        "base": str(base_root),
        "aligned": str(aligned_root),
        "prompts": len({b["prompt"] for b in base_rows}),
        "images": len(pairs),
        "grid_pairs": n_show,
        "scorers": {name: summarize(s_aligned[name], s_base[name]) for name in scorers},  # new = aligned, old = base
    }

    with open(out / "pairs.jsonl", "w") as f:
        for i, (b, a) in enumerate(pairs):
            row = {"prompt": b["prompt"], "seed": b["seed"], "base_file": b["file"], "aligned_file": a["file"]}
            for name in scorers:
                row[f"{name}_base"], row[f"{name}_aligned"] = float(s_base[name][i]), float(s_aligned[name][i])
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
