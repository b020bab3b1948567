"""Reference image sets for on-line methods: DRAGON exemplar sets and Diffusion-DRO expert sets.

- `toy_vivid_exemplars`: toy-world scenes (diffalign.toy.shapes) re-rendered at high saturation and value, the
  "chosen property" of a distribution-level DRAGON run (Fréchet distance to this set should fall).
- `ToyStatsEncoder`: a fixed, hand-made colour-statistics embedding for 32 px toy images, so FD / log-likelihood
  exemplar rewards run offline on the toy world (CLIP would need hub weights). Same members as the CLIP encoders
  (`name`, `device`, `embed_images`), so it plugs into `load_scorer("fd_exemplar", exemplars=..., encoder=...)`.
- `preference_winners`: the expert set of Diffusion-DRO from a preference source (diffalign.data): the preferred
  image of each pair, or (with a scorer) the top-K images of the whole set by that scorer, as the paper's top-K
  Pick-a-Pic pairs by PickScore / HPSv2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffalign.rewards.preprocess import Images, pil_to_tensor
from diffalign.toy import shapes

VIVID_SATURATION = (0.9, 1.0)
VIVID_VALUE = (0.9, 1.0)


def toy_vivid_exemplars(n: int, seed: int = 0) -> list[Image.Image]:
    """n random toy scenes (any caption) rendered with saturation ~ U(0.9, 1) and value ~ U(0.9, 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = shapes.sample_scene(rng)
        scene = dataclasses.replace(scene, saturation=rng.uniform(*VIVID_SATURATION), value=rng.uniform(*VIVID_VALUE))
        out.append(shapes.to_pil(shapes.render(scene)))
    return out


@dataclass
class ToyStatsEncoder:
    """(N, 3, H, W) in [0, 1] -> (N, 8) colour statistics, x10: chroma quantiles (50/75/90/97/max), mean chroma,
    mean brightness (max channel), and the grey level of the border (background)."""

    name: str = "toy_stats_v1"
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def embed_images(self, images: Images) -> torch.Tensor:
        x = images.float() if isinstance(images, torch.Tensor) else torch.stack([pil_to_tensor(im) for im in images])
        x = x.clamp(0, 1)
        chroma = (x.max(1).values - x.min(1).values).flatten(1)  # (N, 3, H, W) -> (N, H*W)
        q = torch.quantile(chroma, torch.tensor([0.5, 0.75, 0.9, 0.97, 1.0]), dim=1).T  # (N, 5)
        border = torch.cat([x[..., 0, :], x[..., -1, :]], dim=-1).mean((1, 2))  # (N,)
        feats = [q, chroma.mean(1, keepdim=True), x.max(1).values.flatten(1).mean(1, keepdim=True), border[:, None]]
        return 10.0 * torch.cat(feats, dim=1)  # (N, 8)


def preference_winners(
    source: str, resolution: int, limit: int = 0, scorer=None, batch_size: int = 64
) -> tuple[torch.Tensor, list[str]]:
    """Expert images of a preference source -> pixels (M, 3, R, R) in [-1, 1] and their prompts.

    scorer None: the preferred image of each pair, in source order, the first `limit` (0 = all).
    scorer given (`scorer(images in [0, 1], prompts) -> (N,)`): every image of every pair (winners and losers) is
    scored and the `limit` best (image, prompt) items are kept, as Diffusion-DRO's tools/pickapic.py picks its
    top-K = 500 Pick-a-Pic pairs by PickScore or HPSv2.
    """
    from diffalign.data import load_image, load_preferences

    rows = load_preferences(source, drop_ties=scorer is None)
    pixels, prompts = [], []
    for i in range(len(rows)):
        rec = rows[i]
        if scorer is None:
            images = [rec.image_0 if rec.label_0 >= 0.5 else rec.image_1]
        else:
            images = [rec.image_0, rec.image_1]
        for image in images:
            pixels.append(load_image(image, resolution, rec.where)[0])
            prompts.append(rec.prompt)
        if scorer is None and limit and len(prompts) >= limit:
            break
    pixels = torch.stack(pixels)  # (N, 3, R, R)
    if scorer is None:
        return pixels, prompts
    with torch.no_grad():
        scores = torch.cat(
            [
                scorer((pixels[i : i + batch_size] + 1) / 2, prompts[i : i + batch_size]).float().cpu()
                for i in range(0, len(prompts), batch_size)
            ]
        )  # (N,)
    keep = scores.argsort(descending=True)[: limit or len(prompts)]
    return pixels[keep], [prompts[i] for i in keep.tolist()]
