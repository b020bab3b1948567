"""`diffalign compare base=DIR_OR_MANIFEST aligned=DIR_OR_MANIFEST scorers=[a,b]`: aligned vs base, paired.

Both sides are `diffalign generate` outputs (or hand-written manifests); an image of one side is paired with the
image of the other side that has the same (prompt, seed), so every pair shares its prompt and initial noise.
Preference scores only compare within a prompt, so the statistics are per pair: win rate of aligned over base
(ties half) with a Wilson 95% CI and mean delta with a bootstrap 95% CI (`pipelines.evaluate.summarize`).
Writes report.json, report.png, pairs.png (base row over aligned row), pairs.jsonl (per-pair scores), a
self-contained report.html and the run record, and prints the table.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from diffalign.config import CompareConfig, load_config, save_config
from diffalign.errors import DiffalignError
from diffalign.runinfo import write_run_record
from pipelines.common import prepare_output_dir, save_grid
from pipelines.evaluate import format_report, plot_report, summarize
from pipelines.score import MANIFEST, load_scorers, open_images, read_manifest, score_rows

THUMB = 256  # longest side of an image in pairs.png (keeps report.html small for 1024 px models)


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


def thumbnail(image, size: int = THUMB):
    image = image.copy()
    image.thumbnail((size, size))
    return image


def write_html(report: dict, out: Path) -> Path:
    """report.html: the table and both PNGs embedded as data URIs, so the file can be sent on its own."""

    def img(name: str) -> str:
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{name}">'

    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['mean_old']:.4f} ± {r['sem_old']:.4f}</td>"
        f"<td>{r['mean_new']:.4f} ± {r['sem_new']:.4f}</td>"
        f"<td>{r['mean_delta']:+.4f} [{r['delta_ci'][0]:+.4f}, {r['delta_ci'][1]:+.4f}]</td>"
        f"<td>{100 * r['win_rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]</td></tr>"
        for name, r in report["scorers"].items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>diffalign compare</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child{{text-align:left}}
img{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>aligned vs base</h1>
<p>base: <code>{html.escape(report["base"])}</code><br>aligned: <code>{html.escape(report["aligned"])}</code><br>
{report["images"]} pairs (same prompt and seed) over {report["prompts"]} prompts.
Mean ± s.e.m.; delta = aligned − base with a paired bootstrap 95% CI; win rate of aligned over base, ties counted
half, with a Wilson 95% CI.</p>
<table><tr><th>scorer</th><th>base</th><th>aligned</th><th>mean delta [95% CI]</th><th>win rate [95% CI]</th></tr>
{rows}</table>
<h2>Scores</h2>{img("report.png")}
<h2>First {report["grid_pairs"]} pairs: base (top) over aligned (bottom)</h2>{img("pairs.png")}
</body></html>
"""
    (out / "report.html").write_text(page)
    return out / "report.html"


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
    shown = open_images(base_root, base_rows[:n_show]) + open_images(aligned_root, aligned_rows[:n_show])
    size = thumbnail(shown[0]).size  # one cell size, so sides of different resolutions still tile
    save_grid([thumbnail(im).resize(size) for im in shown], out / "pairs.png", cols=n_show)
    write_html(report, out)
    save_config(cfg, out / "config.yaml")
    write_run_record(out)
    print(format_report(report, prompts="prompts"))
    print(f"wrote report.json, report.png, pairs.png, pairs.jsonl and report.html to {out}")
    return out
