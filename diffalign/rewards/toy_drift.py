"""Continuous toy fidelity and drift: how far each toy image is from what its prompt asks and from the base model's
image on the same prompt and seed, in pixels, degrees and colour levels.

`toy_fidelity` only asks whether colour, shape, size and position are still *recognised* (nearest anchor, nearest
hue, size threshold), so a run can move the shape 1.5 px off its place, grow it, or cast a tint over the background
and keep its fidelity at 1. These scorers read the same image continuously (`shapes.measure`: the shape's coverage
of each pixel, so sub-pixel moves count) and give one number per image, lower = closer:

against the prompt, `scorer(images, prompts) -> (N,)`:
- `toy_position_error`: distance from the shape's centre to the prompt's position anchor, pixels (the renderer
  jitters the centre by up to 1.5 px per axis, so rendered scenes score 0-2.1);
- `toy_size_error`: |half-size - the prompt's size's half-size|, pixels; the half-size is the radius (circle) or half
  the side (square) of the prompt's shape with the measured area (the renderer: up to 0.5);
- `toy_colour_error`: hue distance from the named colour, degrees (the renderer: up to 8).
A prompt that does not name the attribute gives 0; an image without a shape gives MISSING_POSITION px, the named
half-size and 180 degrees.

against the base model's image on the same prompt and seed, `scorer(images, prompts, base_images) -> (N,)`:
- `toy_background_shift`: 255 x the RGB distance between the two backgrounds' mean colours (a colour cast), levels
  of 255;
- `toy_background_texture`: 255 x (the background's RGB standard deviation - the base's), levels of 255; rises
  when the background gets texture, falls when it gets flatter;
- `toy_outline_change`: 1 - IoU of the two shapes' coverage maps (sum of min / sum of max), in [0, 1]: any move,
  growth or change of outline; 0 when neither image has a shape.
These are in `diffalign.rewards.BASE_RELATIVE`: `compare` and `score` (with `base=`), the end-of-run report, the
curves and the guards pass them the base images they pair by (prompt, seed); the base scores 0 against itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffalign.rewards.preprocess import Images
from diffalign.rewards.toy import as_tensor
from diffalign.toy import shapes

MISSING_POSITION = shapes.RESOLUTION / 2  # px: no shape counts as half the image away from its anchor
MISSING_HUE = 180.0  # degrees: the farthest hue


def arrays(images: Images) -> np.ndarray:
    """PIL list or (N, 3, H, W) tensor in [0, 1] -> (N, H, W, 3) float array in [0, 1]."""
    return as_tensor(images).clamp(0, 1).permute(0, 2, 3, 1).detach().cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)


def position_error(m: shapes.Measurement, wanted: dict[str, str]) -> float:
    if "position" not in wanted:
        return 0.0
    if not m.found:
        return MISSING_POSITION
    ax, ay = shapes.POSITIONS[wanted["position"]]
    return float(np.hypot(m.cx - ax, m.cy - ay))


def size_error(m: shapes.Measurement, wanted: dict[str, str]) -> float:
    if "size" not in wanted:
        return 0.0
    shape = wanted.get("shape") or ("square" if m.fill > shapes.FILL_THRESHOLD else "circle")
    return abs(shapes.half_size(m, shape) - shapes.SIZES[wanted["size"]]) if m.found else shapes.SIZES[wanted["size"]]


def colour_error(m: shapes.Measurement, wanted: dict[str, str]) -> float:
    if "colour" not in wanted:
        return 0.0
    if not m.found:
        return MISSING_HUE
    gap = abs(m.hue - shapes.COLOURS[wanted["colour"]]) % 360.0
    return float(min(gap, 360.0 - gap))


def background_shift(m: shapes.Measurement, base: shapes.Measurement) -> float:
    return float(255.0 * np.linalg.norm(m.background - base.background))


def background_texture(m: shapes.Measurement, base: shapes.Measurement) -> float:
    return 255.0 * (m.background_std - base.background_std)


def outline_change(m: shapes.Measurement, base: shapes.Measurement) -> float:
    union = np.maximum(m.alpha, base.alpha).sum()
    return float(1.0 - np.minimum(m.alpha, base.alpha).sum() / union) if union > 0 else 0.0


@dataclass
class _PromptRelative:
    """(images, prompts) -> (N,): `fn(measurement, the prompt's attributes)` per image."""

    @classmethod
    def load(cls):
        return cls()

    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        x = arrays(images)
        if len(prompts) != len(x):
            raise ValueError(f"{len(x)} images but {len(prompts)} prompts")
        out = []
        for image, prompt in zip(x, prompts):
            wanted = shapes.parse_prompt(prompt)
            if not wanted:
                raise ValueError(f"prompt names no toy-world attribute: {prompt!r}")
            out.append(type(self).fn(shapes.measure(image), wanted))
        return torch.tensor(out, dtype=torch.float32)


@dataclass
class _BaseRelative:
    """(images, prompts, base_images) -> (N,): `fn(measurement, the base image's measurement)` per pair."""

    @classmethod
    def load(cls):
        return cls()

    def __call__(self, images: Images, prompts: Sequence[str], base_images: Images) -> torch.Tensor:
        x, x0 = arrays(images), arrays(base_images)
        if len(x) != len(x0) or len(prompts) != len(x):
            raise ValueError(f"{len(x)} images, {len(x0)} base images and {len(prompts)} prompts: need one each")
        fn = type(self).fn
        return torch.tensor([fn(shapes.measure(a), shapes.measure(b)) for a, b in zip(x, x0)], dtype=torch.float32)


class ToyPositionError(_PromptRelative):
    """Distance from the shape's centre to the prompt's position anchor, pixels."""

    fn = staticmethod(position_error)


class ToySizeError(_PromptRelative):
    """|half-size - the prompt's size's half-size|, pixels."""

    fn = staticmethod(size_error)


class ToyColourError(_PromptRelative):
    """Hue distance from the prompt's colour, degrees."""

    fn = staticmethod(colour_error)


class ToyBackgroundShift(_BaseRelative):
    """Distance between the background's mean colour and the base image's, levels of 255."""

    fn = staticmethod(background_shift)


class ToyBackgroundTexture(_BaseRelative):
    """Background standard deviation minus the base image's, levels of 255."""

    fn = staticmethod(background_texture)


class ToyOutlineChange(_BaseRelative):
    """1 - IoU of the shape's coverage and the base image's, in [0, 1]."""

    fn = staticmethod(outline_change)
