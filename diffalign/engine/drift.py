"""Drift next to the reward: how far the aligned model's images moved from the base model's on the same prompts and
seeds, in the end-of-run report (diffalign.engine.evaluate) and in `diffalign compare`.

A reward can rise through changes a person sees at once while the prompt checks stay green (a background cast,
shapes pushed off their place, texture). So every report shows, beside the reward, a list of drift measures
(`eval.drift`, `compare`'s `drift`):
- a scorer name: per pair, aligned vs base; base-relative scorers (diffalign.rewards.BASE_RELATIVE) get the base
  image of the pair and score 0 on the base itself. Summarised like the scores (means, mean change with a bootstrap
  CI); the "win rate" reads as the share of pairs where the value rose (ties half);
- `fd` / `cmmd`: the aligned set against the base's own images (Fréchet distance, CMMD: diffalign.guards'
  SET_MEASURES), embedded by `drift_encoder`; 0 at the base. One number, no per-pair CI;
- `auto`: the toy drift scorers (diffalign.rewards.TOY_DRIFT) when every prompt names the four toy attributes,
  else `REAL_DRIFT` (fd, cmmd to the base's images, saturation, high-frequency energy), which need no toy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.guards import SET_MEASURES, load_encoder
from diffalign.rewards import TOY_DRIFT, load_scorer, score_against_base
from diffalign.rewards.compare import summarize
from diffalign.toy import shapes

REAL_DRIFT = ("fd", "cmmd", "saturation", "hf_energy")
UNITS = {  # shown next to the names in the tables
    "toy_position_error": "px",
    "toy_size_error": "px",
    "toy_colour_error": "deg",
    "toy_background_shift": "/255",
    "toy_background_texture": "/255",
    "toy_outline_change": "1-IoU",
}


def is_toy_prompt(prompt: str) -> bool:
    return len(shapes.parse_prompt(prompt)) == len(shapes.ATTRIBUTES)


def resolve_drift(names: Sequence[str], prompts: Sequence[str]) -> list[str]:
    """`auto` -> the world's drift measures (see the module docstring); the order kept, duplicates dropped."""
    auto = list(TOY_DRIFT) if prompts and all(is_toy_prompt(p) for p in prompts) else list(REAL_DRIFT)
    out = []
    for name in names:
        for n in auto if name == "auto" else [name]:
            if n not in out:
                out.append(n)
    return out


def measure_drift(names: Sequence[str], prompts: Sequence[str], base, aligned, encoder: str = "pixels") -> dict:
    """{name: entry} for every drift measure (`resolve_drift`'s names) of N pairs: base[i] and aligned[i] are PIL
    images (or (N, 3, H, W) in [0, 1]) from prompts[i] and one seed. Entries: `summarize`'s for per-pair measures,
    {value, encoder, n} for fd / cmmd."""
    out = {}
    for name in names:
        if name in SET_MEASURES:
            embed = load_encoder(encoder).embed_images
            out[name] = set_entry(SET_MEASURES[name](embed(aligned), embed(base)), encoder, len(base))
            continue
        scorer = load_scorer(name)
        with torch.no_grad():
            s_base = score_against_base(name, scorer, base, prompts, base).float().cpu()
            s_aligned = score_against_base(name, scorer, aligned, prompts, base).float().cpu()
        out[name] = summarize(s_aligned, s_base)
    return out


def set_entry(value: float, encoder: str, n: int) -> dict:
    return {"value": value, "encoder": encoder, "n": n}


def format_drift(drift: dict) -> list[str]:
    """Text lines of a report's drift block (empty when there is none)."""
    if not drift:
        return []
    lines = [
        "drift from the base on the same prompts and seeds (base-relative measures are 0 at the base)",
        f"{'measure':<30}{'base':>9}{'aligned':>9}{'change':>9}   rose in",
    ]
    for name, r in drift.items():
        unit = f" ({UNITS[name]})" if name in UNITS else ""
        if "value" in r:
            lines.append(f"{name + ' (' + r['encoder'] + ', the set)':<30}{0.0:>9.3f}{r['value']:>9.3f}")
        else:
            lines.append(
                f"{name + unit:<30}{r['mean_old']:>9.3f}{r['mean_new']:>9.3f}{r['mean_delta']:>+9.3f}   "
                f"{100 * r['win_rate']:.1f}% of pairs"
            )
    return lines
