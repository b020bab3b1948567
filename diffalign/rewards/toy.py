"""Programmatic rewards of the toy shapes world (diffalign.toy.shapes): an aesthetic and a prompt fidelity.

ToyAesthetic = 10 * vividness * cleanliness, in [0, 10]:
- vividness: mean chroma (max - min channel = saturation * value) of the shape's pixels. The renderer draws
  saturation ~ U(0.4, 1) and value ~ U(0.6, 1) whatever the prompt says, so the base model samples the whole
  range (chroma 0.24-1, mean ~0.56) and nothing in a prompt conflicts with vivid colours.
- cleanliness: exp(-std of the background pixels / 0.1): rendered backgrounds are flat (std 0), a model's samples
  are a little noisy; mild on purpose, so vividness dominates.
The foreground is a soft mask, sigmoid((|pixel - border median| - 0.15) / 0.03), so on a tensor input the score is
differentiable (reward back-propagation works) and batched.

ToyFidelity = fraction of the prompt's attributes (colour, shape, size, position; those the prompt names) that
`shapes.analyse` reads back from the image, in [0, 1]; 0 if no shape is found. Not differentiable. The share is
the one the GenEval-style `geneval` scorer uses (requirements.share_met); the toy's attributes (absolute position,
size, fill-ratio shape) have no GenEval counterpart, so only that step is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.rewards.preprocess import Images, pil_to_tensor
from diffalign.rewards.requirements import share_met
from diffalign.toy import shapes

SOFT_MASK_WIDTH = 0.03
CLEAN_SCALE = 0.1
MAX_SCORE = 10.0


def as_tensor(images: Images) -> torch.Tensor:
    """PIL list or (N, 3, H, W) tensor in [0, 1] -> (N, 3, H, W) float32 tensor."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        return images.float()
    return torch.stack([pil_to_tensor(im) for im in images])


def aesthetic(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) toy aesthetic in [0, 10] (see module docstring)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)  # (N, 3, 4H-4)
    bg = border.median(dim=-1).values[..., None, None]  # (N, 3, 1, 1)
    dist = (x - bg).norm(dim=1)  # (N, 3, H, W) -> (N, H, W)
    fg = torch.sigmoid((dist - shapes.FOREGROUND_DISTANCE) / SOFT_MASK_WIDTH)  # (N, H, W)
    chroma = x.max(dim=1).values - x.min(dim=1).values  # (N, H, W)
    vivid = (fg * chroma).sum(dim=(1, 2)) / (fg.sum(dim=(1, 2)) + 1.0)  # (N, H, W) -> (N,)
    bgw = 1 - fg  # (N, H, W)
    bg_mean = (bgw[:, None] * x).sum(dim=(2, 3), keepdim=True) / bgw.sum(dim=(1, 2))[:, None, None, None]
    bg_var = (bgw[:, None] * (x - bg_mean) ** 2).sum(dim=(1, 2, 3)) / (3 * bgw.sum(dim=(1, 2)))  # (N,)
    clean = torch.exp(-(bg_var + 1e-12).sqrt() / CLEAN_SCALE)  # (N,)
    return MAX_SCORE * vivid * clean


@dataclass
class ToyAesthetic:
    """Vivid shape on a clean background; the prompt is ignored."""

    @classmethod
    def load(cls) -> ToyAesthetic:
        return cls()

    def __call__(self, images: Images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return aesthetic(as_tensor(images))


def fidelity(image, prompt: str) -> float:
    """Fraction of the attributes `prompt` names that `shapes.analyse` detects in `image` ((H, W, 3) in [0, 1])."""
    wanted = shapes.parse_prompt(prompt)
    if not wanted:
        raise ValueError(f"prompt names no toy-world attribute: {prompt!r}")
    found = shapes.analyse(image)
    if found is None:
        return 0.0
    return share_met([float(found[k] == v) for k, v in wanted.items()])


@dataclass
class ToyFidelity:
    """How many of the prompt's attributes the image shows (rule-based analyser), in [0, 1]."""

    @classmethod
    def load(cls) -> ToyFidelity:
        return cls()

    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        x = as_tensor(images)
        if len(prompts) != len(x):
            raise ValueError(f"{len(x)} images but {len(prompts)} prompts")
        arrays = x.clamp(0, 1).permute(0, 2, 3, 1).detach().cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)
        return torch.tensor([fidelity(a, p) for a, p in zip(arrays, prompts)], dtype=torch.float32)
