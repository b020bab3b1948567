"""`diffalign score images=DIR_OR_MANIFEST scorers=[a,b] scorer_args={a: {...}}`: score an image set.

The images come from a `diffalign generate` folder (its manifest.jsonl gives file, prompt and seed), a manifest
file, or a plain folder with one `prompt` for every image or a `prompts_file` (one line per image, sorted names).
`base=DIR` names the base model's images on the same prompts and seeds (paired by prompt and seed, as `compare` does):
the base-relative scorers (diffalign.rewards.BASE_RELATIVE: toy_background_shift, ...) measure against them.
Writes `scores.jsonl` (file, prompt, seed and one column per scorer, one row per image), `summary.json` (mean, std,
n per scorer) and the run record, and prints the summary table. `diffalign compare` reuses the readers below.
"""

from __future__ import annotations

import difflib
import inspect
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.config import ScoreConfig, load_config, save_config
from diffalign.engine.common import DTYPES, prepare_output_dir
from diffalign.errors import DiffalignError
from diffalign.rewards import BASE_RELATIVE, SCORERS, load_scorer, score_against_base, scorer_class
from diffalign.runinfo import write_run_record

MANIFEST = "manifest.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_manifest(path: Path) -> tuple[Path, list[dict]]:
    """manifest.jsonl -> (its folder, rows {file, prompt, seed}); files are relative to that folder."""
    root, rows = path.parent, []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffalignError(f"{path}:{i}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("prompt"), str):
            raise DiffalignError(f"{path}:{i}: a manifest row needs a string 'file' and 'prompt'")
        if not (root / row["file"]).is_file():
            raise DiffalignError(f"{path}:{i}: image {root / row['file']} not found")
        rows.append({"file": row["file"], "prompt": row["prompt"], "seed": row.get("seed")})  # seed: optional
    if not rows:
        raise DiffalignError(f"{path}: no rows")
    return root, rows


def read_image_set(images: str, prompt: str = "", prompts_file: str = "") -> tuple[Path, list[dict]]:
    """A folder or a manifest -> (root folder, rows {file, prompt, seed}) with `file` relative to the root."""
    path = Path(images)
    if not images or not path.exists():
        raise DiffalignError(f"images: {path} not found" if images else "images: set images=DIR or images=MANIFEST")
    if path.is_file() or (path / MANIFEST).is_file():
        if prompt or prompts_file:
            raise DiffalignError(f"images: {path} has a manifest with its prompts; drop prompt / prompts_file")
        return read_manifest(path if path.is_file() else path / MANIFEST)
    files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DiffalignError(f"images: no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    if prompt and prompts_file:
        raise DiffalignError("set prompt or prompts_file, not both")
    if prompts_file:
        if not Path(prompts_file).is_file():
            raise DiffalignError(f"prompts_file {prompts_file} not found")
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if len(prompts) != len(files):
            raise DiffalignError(f"prompts_file {prompts_file}: {len(prompts)} prompts for {len(files)} images")
    elif prompt:
        prompts = [prompt] * len(files)
    else:
        raise DiffalignError(f"images: {path} has no {MANIFEST}; set prompt=... or prompts_file=PATH")
    return path, [{"file": f, "prompt": p, "seed": None} for f, p in zip(files, prompts)]


def read_side(path: str, side: str) -> tuple[Path, list[dict]]:
    """`base=` / `aligned=` -> (root, rows); a folder must hold a manifest (pairing needs prompts and seeds)."""
    p = Path(path)
    if not path or not p.exists():
        raise DiffalignError(f"{side}: {p} not found" if path else f"{side}: set {side}=DIR or {side}=MANIFEST")
    if p.is_dir() and not (p / MANIFEST).is_file():
        raise DiffalignError(f"{side}: {p} has no {MANIFEST} (compare pairs images by prompt and seed)")
    return read_manifest(p if p.is_file() else p / MANIFEST)


def pair_rows(base: list[dict], aligned: list[dict], other: str = "aligned") -> list[tuple[dict, dict]]:
    """(base row, aligned row) with equal (prompt, seed), in base order; every row must find exactly one partner.
    `other` names the second side in the errors ("aligned" in compare, "images" in score)."""
    by_key = {}
    for side, rows in (("base", base), (other, aligned)):
        seen = {}
        for row in rows:
            key = (row["prompt"], row["seed"])
            if key in seen:
                raise DiffalignError(
                    f"{side}: {row['file']} and {seen[key]} have the same prompt {key[0]!r} and seed {key[1]}"
                )
            seen[key] = row["file"]
        by_key[side] = {(r["prompt"], r["seed"]): r for r in rows}
    for side, partner in (("base", other), (other, "base")):
        for key, row in by_key[side].items():
            if key not in by_key[partner]:
                raise DiffalignError(
                    f"{side} image {row['file']} (prompt {key[0]!r}, seed {key[1]}) has no {partner} image with the "
                    "same prompt and seed"
                )
    return [(row, by_key[other][key]) for key, row in by_key["base"].items()]


def load_scorers(names: list[str], scorer_args: dict) -> dict:
    """name -> loaded scorer; each `scorer_args[name]` is checked against the scorer's `load` signature first."""
    if not names:
        raise DiffalignError(f"no scorers: set scorers=[...] (known: {', '.join(SCORERS)})")
    for name in [*names, *scorer_args]:
        if name not in SCORERS:
            close = difflib.get_close_matches(name, list(SCORERS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(SCORERS)})"
            raise DiffalignError(f"unknown scorer '{name}'{hint}")
    for name in scorer_args:
        if name not in names:
            raise DiffalignError(f"scorer_args.{name}: '{name}' is not in scorers={names}")
    scorers = {}
    for name in names:
        kwargs = scorer_args.get(name) or {}
        if not isinstance(kwargs, dict):
            raise DiffalignError(f"scorer_args.{name}: expected a mapping of load options, got {kwargs!r}")
        kwargs = dict(kwargs)
        params = inspect.signature(scorer_class(name).load).parameters
        for key in kwargs:
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" (options: {', '.join(params) or 'none'})"
                raise DiffalignError(f"scorer_args.{name}.{key}: not an option of '{name}'{hint}")
        missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
        if missing:
            raise DiffalignError(f"scorer '{name}' needs scorer_args.{name}.{missing[0]}")
        if "dtype" in kwargs:  # YAML gives a string; the scorers take a torch dtype
            if kwargs["dtype"] not in DTYPES:
                raise DiffalignError(f"scorer_args.{name}.dtype must be one of {', '.join(DTYPES)}")
            kwargs["dtype"] = DTYPES[kwargs["dtype"]]
        scorers[name] = load_scorer(name, **kwargs)
    return scorers


def open_images(root: Path, rows: list[dict]) -> list[Image.Image]:
    images = []
    for row in rows:
        with Image.open(root / row["file"]) as im:
            images.append(im.convert("RGB"))
    return images


@torch.no_grad()
def score_rows(scorers: dict, root: Path, rows: list[dict], batch_size: int, desc: str = "score", base=None) -> dict:
    """name -> (N,) float32 scores of the images `rows` name, in row order; images are read one batch at a time.

    base: (root, rows) of the base model's images, row i on the same prompt and seed as `rows[i]`; the base-relative
    scorers (diffalign.rewards.BASE_RELATIVE) measure against them, and need them."""
    if batch_size < 1:
        raise DiffalignError(f"batch_size must be >= 1, not {batch_size}")
    check_base(list(scorers), base is not None)
    paired = base is not None and any(name in BASE_RELATIVE for name in scorers)
    scores = {name: [] for name in scorers}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        chunk = rows[start : start + batch_size]
        images, prompts = open_images(root, chunk), [row["prompt"] for row in chunk]
        base_images = open_images(base[0], base[1][start : start + batch_size]) if paired else None
        for name, scorer in scorers.items():
            try:
                scores[name].append(score_against_base(name, scorer, images, prompts, base_images).float().cpu())
            except ValueError as err:  # a scorer's bad-input error (prompt it cannot parse, too few images, ...)
                raise DiffalignError(f"scorer '{name}' on {root / chunk[0]['file']} ...: {err}") from None
    return {name: torch.cat(parts) for name, parts in scores.items()}  # b-sized pieces -> (N,)


def check_base(names: list[str], have_base: bool) -> None:
    """One line when a base-relative scorer has no base images to measure against."""
    needs = [n for n in names if n in BASE_RELATIVE]
    if needs and not have_base:
        raise DiffalignError(
            f"scorer '{needs[0]}' measures images against the base model's images on the same prompts and seeds: "
            "set base=DIR (a diffalign generate folder of the base model; pairs by prompt and seed)"
        )


def summarize_scores(scores: dict) -> dict:
    """name -> {mean, std (N-1 denominator; 0 for one image), n}."""
    return {
        name: {"mean": float(s.mean()), "std": float(s.std()) if len(s) > 1 else 0.0, "n": len(s)}
        for name, s in scores.items()
    }


def format_scores(summary: dict) -> str:
    lines = [
        f"scores of {summary['images']} images in {summary['root']}",
        f"{'scorer':<20}{'mean':>10}{'std':>10}{'n':>7}",
    ]
    for name, r in summary["scorers"].items():
        lines.append(f"{name:<20}{r['mean']:>10.4f}{r['std']:>10.4f}{r['n']:>7}")
    return "\n".join(lines)


def run(config: str | None = None, overrides: list[str] | tuple = ()) -> Path:
    cfg: ScoreConfig = load_config(ScoreConfig, config, list(overrides))
    root, rows = read_image_set(cfg.images, cfg.prompt, cfg.prompts_file)
    check_base(cfg.scorers, bool(cfg.base))
    base = None
    if cfg.base:  # row i of base = the base model's image with rows[i]'s prompt and seed
        base_root, base_rows = read_side(cfg.base, "base")
        by_image = {id(a): b for b, a in pair_rows(base_rows, rows, other="images")}
        base = (base_root, [by_image[id(row)] for row in rows])
    scorers = load_scorers(cfg.scorers, cfg.scorer_args)
    out = prepare_output_dir(cfg.output_dir, default_name="score")
    scores = score_rows(scorers, root, rows, cfg.batch_size, base=base)

    with open(out / "scores.jsonl", "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, **{name: float(s[i]) for name, s in scores.items()}}) + "\n")
    summary = {"root": str(root), "images": len(rows), "scorers": summarize_scores(scores)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    save_config(cfg, out / "config.yaml")
    write_run_record(out)
    print(format_scores(summary))
    print(f"wrote scores.jsonl and summary.json to {out}")
    return out
