"""Sample the toy base model and write the toy preference dataset (Pick-a-Pic v2 schema) plus held-out prompts.

    nice -n 10 python assets/make_toy_data.py --model assets/toy_model --out assets/toy_data      # ~6 min, 2 CPU cores
    python assets/make_toy_data.py --model PATH --eval-only                                         # fidelity only

Steps, top to bottom:
1. Split the 80 attribute combinations (diffalign.toy.shapes) into 64 training and 16 held-out prompts. Whole
   combinations are held out, chosen so every single attribute value still appears in training (the held-out
   prompts test composition, not unseen words).
2. Sample `--images-per-prompt` images per training prompt (DDIM, `--steps`, CFG `--guidance`), one seed each.
3. Score every image with the toy aesthetic (diffalign.rewards.toy) and pair images of the same prompt:
   `--pairs-per-prompt` distinct random pairs. Labels from the aesthetic difference d = a_0 - a_1:
   |d| < tie margin -> 0.5 / 0.5 (tie); |d| < soft margin -> 0.7 / 0.3 towards the higher score; else 1 / 0.
   The margins (0.1, 0.3) are set against the base model's aesthetic spread (std ~0.6 on the 0-10 scale), giving
   roughly 10% ties and 20% soft labels; margins 0.2 / 0.6 gave 20% ties and 34% soft.
   Labels use the aesthetic only, so the fidelity reward stays an independent check of what alignment costs.
4. Write train.parquet with the Pick-a-Pic v2 columns caption, jpg_0, jpg_1 (PNG bytes: lossless; the column names
   are Pick-a-Pic's), label_0, label_1 (float64), ranking_id (int64), are_different (bool); heldout_prompts.txt;
   stats.json (pairs, ties, soft labels, base-model fidelity per attribute and mean aesthetic).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffalign.models import load_family
from diffalign.rewards.toy import ToyAesthetic
from diffalign.toy import shapes

CHANCE = {
    "colour": 1 / len(shapes.COLOURS),
    "shape": 1 / len(shapes.SHAPES),
    "size": 1 / len(shapes.SIZES),
    "position": 1 / len(shapes.POSITIONS),
}


def split_prompts(seed: int, n_heldout: int = 16) -> tuple[list[str], list[str]]:
    """(train, held-out) captions; every attribute value keeps at least one training combination with it."""
    combos = shapes.all_combinations()
    rng = np.random.default_rng(seed)
    while True:
        held = set(rng.choice(len(combos), n_heldout, replace=False).tolist())
        train = [c for i, c in enumerate(combos) if i not in held]
        if all({c[k] for c in train} == {c[k] for c in combos} for k in shapes.ATTRIBUTES):
            break
    caption = lambda c: shapes.caption(c["shape"], c["colour"], c["size"], c["position"])  # noqa: E731
    return [caption(c) for c in train], [caption(combos[i]) for i in sorted(held)]


def generate(family, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int = 128):
    """-> list of PIL images, in batches."""
    images = []
    for i in range(0, len(prompts), batch_size):
        images += family.generate(prompts[i : i + batch_size], seeds[i : i + batch_size], steps, guidance)
    return images


def attribute_accuracy(images, prompts: list[str]) -> dict[str, float]:
    """Per-attribute fraction of images whose analysed attribute matches the prompt (no shape found = wrong)."""
    hits = {k: 0 for k in shapes.ATTRIBUTES}
    for image, prompt in zip(images, prompts):
        found = shapes.analyse(image) or {}
        for k, v in shapes.parse_prompt(prompt).items():
            hits[k] += found.get(k) == v
    return {k: round(v / len(images), 3) for k, v in hits.items()}


def evaluate(family, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> dict:
    images = generate(family, prompts, seeds, steps, guidance)
    acc = attribute_accuracy(images, prompts)
    return {
        "n": len(images),
        "accuracy": acc,
        "chance": {k: round(v, 3) for k, v in CHANCE.items()},
        "mean_fidelity": round(float(np.mean(list(acc.values()))), 3),
        "mean_aesthetic": round(float(ToyAesthetic()(images).mean()), 3),
    }


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def label(d: float, tie_margin: float, soft_margin: float) -> tuple[float, float]:
    """Aesthetic difference a_0 - a_1 -> (label_0, label_1)."""
    if abs(d) < tie_margin:
        return 0.5, 0.5
    p = 0.7 if abs(d) < soft_margin else 1.0
    return (p, 1 - p) if d > 0 else (1 - p, p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--out", default="assets/toy_data")
    p.add_argument("--images-per-prompt", type=int, default=16)
    p.add_argument("--pairs-per-prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--tie-margin", type=float, default=0.1)
    p.add_argument("--soft-margin", type=float, default=0.3)
    p.add_argument("--eval-only", action="store_true", help="only measure fidelity/aesthetic on all 80 prompts")
    p.add_argument("--eval-seeds", type=int, default=4, help="seeds per prompt for the evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    start = time.time()
    family = load_family(args.model)
    train_prompts, heldout_prompts = split_prompts(args.seed)

    # Evaluation seeds live in [10^6, 2 * 10^6), data seeds in [0, 10^6): never shared.
    def eval_set(prompts):
        n = args.eval_seeds
        return [q for q in prompts for _ in range(n)], [10**6 + i for i in range(len(prompts) * n)]

    if args.eval_only:
        result = evaluate(family, *eval_set(train_prompts + heldout_prompts), args.steps, args.guidance)
        print(json.dumps({"model": args.model, **result, "seconds": round(time.time() - start)}), flush=True)
        return

    # 2. sample
    k = args.images_per_prompt
    prompts = [q for q in train_prompts for _ in range(k)]
    seeds = [args.seed * 10**5 + i for i in range(len(prompts))]
    images = generate(family, prompts, seeds, args.steps, args.guidance)
    scores = ToyAesthetic()(images).tolist()
    sample_seconds = time.time() - start
    print(f"sampled {len(images)} images in {sample_seconds:.0f}s", flush=True)

    # 3. pair
    rng = np.random.default_rng(args.seed)
    pngs = [png_bytes(im) for im in images]
    rows = []
    for j, caption in enumerate(train_prompts):
        all_pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
        for idx in rng.choice(len(all_pairs), args.pairs_per_prompt, replace=False):
            a, b = all_pairs[idx]
            a, b = (a, b) if rng.random() < 0.5 else (b, a)  # random order: label_0 is not biased
            i0, i1 = j * k + a, j * k + b
            l0, l1 = label(scores[i0] - scores[i1], args.tie_margin, args.soft_margin)
            rows.append(
                {
                    "caption": caption,
                    "jpg_0": pngs[i0],
                    "jpg_1": pngs[i1],
                    "label_0": l0,
                    "label_1": l1,
                    "ranking_id": len(rows),
                    "are_different": pngs[i0] != pngs[i1],
                }
            )
    df = pd.DataFrame(rows).astype(
        {"label_0": "float64", "label_1": "float64", "ranking_id": "int64", "are_different": "bool"}
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "train.parquet", index=False)
    (out / "heldout_prompts.txt").write_text("\n".join(heldout_prompts) + "\n")

    # 4. statistics: dataset + base model quality (training samples; held-out prompts with their own seeds)
    ties = int((df.label_0 == 0.5).sum())
    soft = int(((df.label_0 > 0) & (df.label_0 < 1) & (df.label_0 != 0.5)).sum())
    stats = {
        "command": "python assets/make_toy_data.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "model": args.model,
        "pairs": len(df),
        "prompts": len(train_prompts),
        "heldout_prompts": len(heldout_prompts),
        "images": len(images),
        "ties": ties,
        "soft_labels": soft,
        "hard_labels": len(df) - ties - soft,
        "label_0_mean": round(float(df.label_0.mean()), 3),
        "mean_aesthetic": round(float(np.mean(scores)), 3),
        "aesthetic_std": round(float(np.std(scores)), 3),
        "base_accuracy_train_prompts": attribute_accuracy(images, prompts),
        "base_heldout": evaluate(family, *eval_set(heldout_prompts), args.steps, args.guidance),
        "chance": {k: round(v, 3) for k, v in CHANCE.items()},
        "parquet_bytes": (out / "train.parquet").stat().st_size,
        "seconds": round(time.time() - start),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2), flush=True)


if __name__ == "__main__":
    main()
