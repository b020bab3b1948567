"""Cheap image statistics that catch the reported ways reward hacking breaks images, plus one deliberately hackable
toy reward for the demo of the reward-hacking guards (diffalign.guards).

All take (N, 3, H, W) in [0, 1] (or PIL images) and return (N,); the prompt is ignored.

- `saturation`: mean chroma, max(rgb) - min(rgb) = HSV saturation x value, over every pixel, in [0, 1].
  Over-saturation is Pref-GRPO #2's failure.
- `hf_energy`: share of the image's spectral energy (mean removed) above half the Nyquist frequency
  (|f_x| or |f_y| > 1/4 cycles per pixel), in [0, 1]. Grid and checkerboard artifacts (flow_grpo #92, #233) put
  energy there; natural images and the toy renders have little.
- `sharpness`: variance of the 4-neighbour Laplacian of the grey image (Pech-Pacheco et al. 2000, "Diffraction
  blur assessment" / the usual "variance of the Laplacian" focus measure). Blur (DanceGRPO #29: OCR-only rewards)
  lowers it: guard it with `max_drop`.
- `toy_saturation` (DEMO ONLY): 10 x `saturation`, a reward that a model can raise without drawing the prompt
  better, e.g. by colouring the background or every shape alike. It exists to show an unguarded run gaming a
  reward. Differentiable.
- `toy_area` (DEMO ONLY): 10 x the share of the image covered by the foreground (the soft shape mask of
  diffalign.rewards.toy): bigger shapes score more whatever the prompt's size word says, so a run that games it
  draws "small" shapes large and loses prompt fidelity (toy_fidelity reads the size back). It shows an unguarded
  run gaming a reward (configs/toy_hack.yaml) and the guards stopping it (configs/toy_hack_guarded.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.rewards.toy import SOFT_MASK_WIDTH, as_tensor
from diffalign.toy.shapes import FOREGROUND_DISTANCE

GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def saturation(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) mean chroma."""
    return (x.max(dim=1).values - x.min(dim=1).values).mean(dim=(1, 2))  # (N, H, W) -> (N,)


def foreground_share(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N,) mean soft foreground mask: distance from the border median, as ToyAesthetic's."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)  # (N, 3, 4H-4)
    dist = (x - border.median(dim=-1).values[..., None, None]).norm(dim=1)  # (N, H, W)
    return torch.sigmoid((dist - FOREGROUND_DISTANCE) / SOFT_MASK_WIDTH).mean(dim=(1, 2))


def grey(x: torch.Tensor) -> torch.Tensor:
    return (x * GREY.to(x)[None, :, None, None]).sum(dim=1)  # (N, 3, H, W) -> (N, H, W)


def hf_energy(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N,) share of the grey image's spectral power with |f_x| or |f_y| > 1/4 cycles per pixel."""
    g = grey(x)
    g = g - g.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(g).abs() ** 2  # (N, H, W)
    fy = torch.fft.fftfreq(g.shape[1]).abs()[:, None]  # (H, 1) cycles per pixel
    fx = torch.fft.fftfreq(g.shape[2]).abs()[None, :]  # (1, W)
    high = ((fy > 0.25) | (fx > 0.25)).to(power)  # (H, W)
    return (power * high).sum(dim=(1, 2)) / (power.sum(dim=(1, 2)) + 1e-12)


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N,) variance of the Laplacian of the grey image (valid pixels only), in grey-level² units."""
    lap = torch.nn.functional.conv2d(grey(x)[:, None], LAPLACIAN.to(x)[None, None])  # (N, 1, H-2, W-2)
    return lap.flatten(1).var(dim=1)


@dataclass
class _Stat:
    @classmethod
    def load(cls):
        return cls()

    def __call__(self, images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return type(self).fn(as_tensor(images))


class Saturation(_Stat):
    """Mean chroma of the whole image, in [0, 1]."""

    fn = staticmethod(saturation)


class HighFrequency(_Stat):
    """Share of spectral power above half the Nyquist frequency (grid artifacts), in [0, 1]."""

    fn = staticmethod(hf_energy)


class Sharpness(_Stat):
    """Variance of the Laplacian (falls when images blur)."""

    fn = staticmethod(sharpness)


class ToySaturation(_Stat):
    """DEMO: 10 x mean chroma of the whole image, a deliberately hackable reward (see the module docstring)."""

    fn = staticmethod(lambda x: 10.0 * saturation(x))


class ToyArea(_Stat):
    """DEMO: 10 x the foreground share of the image, a deliberately hackable reward (see the module docstring)."""

    fn = staticmethod(lambda x: 10.0 * foreground_share(x))
