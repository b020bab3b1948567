"""Reports a person can read: a side-by-side sheet (base | aligned, same prompt and seed) and a self-contained HTML page.

The sheet shows the pairs whose first score (the reward) changed most, in both directions: the largest gains first,
then the largest losses, so a reader sees both what the alignment did and where it hurt. Tiles are upscaled to at
least `MIN_TILE` px with nearest-neighbour (the toy model's 32 px images stay crisp pixels) and large images are
shrunk to `MAX_TILE`; each tile is captioned with its own scores, each pair with its prompt, seed and change.
Used at the end of `diffalign train`, `diffalign online` (through diffalign.engine.evaluate) and `diffalign compare`.
"""

from __future__ import annotations

import base64
import html
import math
import os
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # smallest tile side: 32 px toy images are upscaled 4x
MAX_TILE = 256  # largest tile side: keeps report.html small for 1024 px models
FONT_SIZE = 12
PAD = 6


def pick_pairs(deltas: list[float], n: int) -> list[int]:
    """Indices of the n pairs with the largest changes: the ceil(n/2) largest gains (descending), then the
    largest losses (most negative first); fewer pairs than n -> all, sorted by change."""
    order = sorted(range(len(deltas)), key=lambda i: -deltas[i])  # largest gain first
    if len(order) <= n:
        return order
    top = order[: math.ceil(n / 2)]
    bottom = order[::-1][: n - len(top)]  # largest loss first
    return top + bottom


def tile(image: Image.Image) -> Image.Image:
    """Upscale small images by an integer factor (nearest) to >= MIN_TILE; shrink large ones to <= MAX_TILE."""
    w, h = image.size
    if max(w, h) < MIN_TILE:
        k = math.ceil(MIN_TILE / max(w, h))
        return image.convert("RGB").resize((w * k, h * k), Image.NEAREST)
    image = image.convert("RGB").copy()
    image.thumbnail((MAX_TILE, MAX_TILE))
    return image


def side_by_side(
    base: list[Image.Image],
    aligned: list[Image.Image],
    prompts: list[str],
    seeds: list[int],
    scores_base: dict[str, list[float]],
    scores_aligned: dict[str, list[float]],
    path: Path,
    n_pairs: int = 8,
    title: str = "",
    cols: int = 2,
) -> list[int]:
    """Write the sheet to `path` (PNG, atomically); returns the indices shown, in sheet order.

    Args:
        base, aligned: N images each, pair i = (base[i], aligned[i]) from the same prompt and seed.
        scores_base, scores_aligned: {scorer: N scores}; the first scorer orders the pairs (aligned − base).
        n_pairs: pairs on the sheet; cols: pairs per sheet row.
    """
    names = list(scores_base)
    reward = names[0]
    deltas = [a - b for a, b in zip(scores_aligned[reward], scores_base[reward])]
    shown = pick_pairs(deltas, n_pairs)
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 3
    tiles = {i: (tile(base[i]), tile(aligned[i])) for i in shown}
    tw, th = max(t[0].size[0] for t in tiles.values()), max(t[0].size[1] for t in tiles.values())
    chars = max(16, (2 * tw + PAD) // (FONT_SIZE * 6 // 10))  # roughly what fits under the two tiles
    prompt_lines = {i: textwrap.wrap(prompts[i], chars)[:2] for i in shown}
    cap_h = line * (2 + 1 + len(names))  # prompt (2 lines), "base, seed" | "aligned, change", a line per scorer
    cell_w, cell_h = 2 * tw + 3 * PAD, th + cap_h + 2 * PAD
    title_lines = textwrap.wrap(title, (cols * cell_w) // (FONT_SIZE * 6 // 10))
    header = line * len(title_lines) + PAD if title else 0
    rows = math.ceil(len(shown) / cols)
    sheet = Image.new("RGB", (cols * cell_w + PAD, header + rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        for k, text in enumerate(title_lines):
            draw.text((PAD, PAD + k * line), text, fill="black", font=font)
    for slot, i in enumerate(shown):
        x0 = PAD + (slot % cols) * cell_w
        y0 = header + PAD + (slot // cols) * cell_h
        b, a = tiles[i]
        sheet.paste(b, (x0, y0))
        sheet.paste(a, (x0 + tw + PAD, y0))
        y = y0 + th + 2
        for text in prompt_lines[i]:
            draw.text((x0, y), text, fill="black", font=font)
            y += line
        y = y0 + th + 2 + 2 * line
        color = "#1a7f37" if deltas[i] > 0 else "#cf222e" if deltas[i] < 0 else "black"
        draw.text((x0, y), f"base, seed {seeds[i]}", fill="#555555", font=font)
        draw.text((x0 + tw + PAD, y), f"aligned, {deltas[i]:+.2f}", fill=color, font=font)  # first scorer's change
        for name in names:
            y += line
            short = name.removeprefix("toy_")[:10]
            draw.text((x0, y), f"{short} {scores_base[name][i]:.2f}", fill="black", font=font)
            draw.text((x0 + tw + PAD, y), f"{short} {scores_aligned[name][i]:.2f}", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return shown


def sheet_title(n_images: int, n_prompts: int, held_out: bool, reward: str) -> str:
    """The sheet's header line; "held-out" only when the prompts were held out of training."""
    which = "held-out prompts" if held_out else "prompts"
    return (
        f"base | aligned, same prompt and seed ({n_images} pairs, {n_prompts} {which}): largest {reward} "
        "gains first, then the other end (largest losses or smallest gains)"
    )


def score_table(report: dict) -> str:
    """The scorers' table as HTML rows (mean ± s.e.m., delta with CI, win rate with CI)."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['mean_old']:.4f} ± {r['sem_old']:.4f}</td>"
        f"<td>{r['mean_new']:.4f} ± {r['sem_new']:.4f}</td>"
        f"<td>{r['mean_delta']:+.4f} [{r['delta_ci'][0]:+.4f}, {r['delta_ci'][1]:+.4f}]</td>"
        f"<td>{100 * r['win_rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]</td></tr>"
        for name, r in report["scorers"].items()
    )
    return (
        "<table><tr><th>scorer</th><th>base</th><th>aligned</th><th>mean delta [95% CI]</th>"
        f"<th>win rate [95% CI]</th></tr>\n{rows}</table>"
    )


def drift_table(report: dict) -> str:
    """The drift block as HTML (diffalign.engine.drift): per-pair measures with their change and the share of pairs
    where they rose, set measures (fd, cmmd) as one value; "" when the report has none."""
    drift = report.get("drift") or {}
    if not drift:
        return ""
    rows = []
    for name, r in drift.items():
        if "value" in r:
            rows.append(
                f"<tr><td>{html.escape(name)} ({html.escape(r['encoder'])}, the set)</td><td>0</td>"
                f"<td>{r['value']:.4f}</td><td></td><td></td></tr>"
            )
        else:
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{r['mean_old']:.4f} ± {r['sem_old']:.4f}</td>"
                f"<td>{r['mean_new']:.4f} ± {r['sem_new']:.4f}</td>"
                f"<td>{r['mean_delta']:+.4f} [{r['delta_ci'][0]:+.4f}, {r['delta_ci'][1]:+.4f}]</td>"
                f"<td>{100 * r['win_rate']:.1f}%</td></tr>"
            )
    return (
        "<h2>Drift from the base (same prompt and seed; 0 = none)</h2><table><tr><th>measure</th><th>base</th>"
        f"<th>aligned</th><th>mean change [95% CI]</th><th>rose in (pairs)</th></tr>\n{''.join(rows)}</table>"
    )


def write_html(out: Path, title: str, intro: str, report: dict, figures: list[tuple[str, str]]) -> Path:
    """out/report.html: `intro` (HTML), the score table, the drift table and each (heading, PNG file in out)
    embedded as a data URI, so the page can be sent on its own. Missing PNGs are left out."""
    out = Path(out)
    parts = []
    for heading, name in figures:
        if (out / name).is_file():
            data = base64.b64encode((out / name).read_bytes()).decode()
            parts.append(f'<h2>{html.escape(heading)}</h2><img src="data:image/png;base64,{data}" alt="{name}">')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child{{text-align:left}}
img{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{intro}
Mean ± s.e.m.; delta = aligned − base with a paired bootstrap 95% CI; win rate of aligned over base, ties counted
half, with a Wilson 95% CI.</p>
{score_table(report)}
{drift_table(report)}
{"".join(parts)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
