"""CLIP-style image preprocessing shared by every scorer: resize shortest side (bicubic), centre crop, normalise.

Two inputs, one output `(N, 3, crop, crop)` float32:
- a list of PIL images goes through the model's own transform when it has one (the transformers image processor,
  the open_clip val transform), so PIL scores match the official preprocessing;
- a float tensor `(N, 3, H, W)` in [0, 1] goes through `resize_center_crop` below: torch ops only, so it stays on
  its device and is differentiable (reward backprop). Its settings (size, crop, mean, std) are read from the same
  model transform. PIL bicubic and torch antialiased bicubic differ by ~1e-2 per pixel, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

Images = Sequence[Image.Image] | torch.Tensor


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [0, 1] (RGB)."""
    x = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return x.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)


def resize_center_crop(x: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """Resize the shortest side to `size` (bicubic, antialiased), centre-crop to `crop` x `crop`.

    Output sizes follow torchvision's `Resize(size)` + `CenterCrop(crop)` (long side `int(size * long / short)`,
    crop offset `round((h - crop) / 2)`), which open_clip's val transform uses.

    Args:
        x: (N, 3, H, W) float in [0, 1].
    Returns:
        (N, 3, crop, crop), clamped to [0, 1] (bicubic overshoots, as PIL's uint8 output cannot).
    """
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    if crop > nh or crop > nw:
        raise ValueError(f"crop {crop} is larger than the resized image {nh}x{nw}")
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return x[..., top : top + crop, left : left + crop].clamp(0.0, 1.0)  # (N, 3, crop, crop)


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize + centre crop + normalise for one CLIP-style image tower."""

    size: int
    """Shortest side after the resize."""
    crop: int
    """Side of the square centre crop (the tower's input resolution)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pil_transform: Callable[[list[Image.Image]], torch.Tensor] | None = None
    """The model's own transform for PIL input, returning (N, 3, crop, crop) normalised; None -> the tensor path."""

    @classmethod
    def from_hf(cls, image_processor) -> ClipPreprocess:
        """Settings and PIL path from a transformers `CLIPImageProcessor` (e.g. `processor.image_processor`)."""
        if image_processor.size.shortest_edge is None:
            raise ValueError(f"expected a shortest-edge resize, got size={image_processor.size}")
        if image_processor.resample != Image.BICUBIC:
            raise ValueError(f"expected bicubic resampling, got resample={image_processor.resample}")
        crop = image_processor.crop_size
        if crop.height != crop.width:
            raise ValueError(f"expected a square crop, got {crop}")

        def pil_transform(images: list[Image.Image]) -> torch.Tensor:
            return image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

        return cls(
            image_processor.size.shortest_edge,
            crop.height,
            tuple(image_processor.image_mean),
            tuple(image_processor.image_std),
            pil_transform,
        )

    @classmethod
    def from_open_clip(cls, model, transform: Callable) -> ClipPreprocess:
        """Settings from `model.visual.preprocess_cfg`; PIL path: open_clip's val `transform`, image by image."""
        cfg = model.visual.preprocess_cfg
        if cfg["resize_mode"] != "shortest" or cfg["interpolation"] != "bicubic":
            raise ValueError(f"expected shortest-side bicubic resize, got {cfg}")
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]

        def pil_transform(images: list[Image.Image]) -> torch.Tensor:
            return torch.stack([transform(im.convert("RGB")) for im in images])  # N x (3, crop, crop)

        return cls(size, size, tuple(cfg["mean"]), tuple(cfg["std"]), pil_transform)

    def __call__(self, images: Images) -> torch.Tensor:
        """PIL list or (N, 3, H, W) tensor in [0, 1] -> (N, 3, crop, crop) float32, normalised."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected an image tensor (N, 3, H, W), got shape {tuple(images.shape)}")
            x = resize_center_crop(images.float(), self.size, self.crop)
        elif self.pil_transform is not None:
            return self.pil_transform(list(images)).float()
        else:
            # PIL images may differ in size: resize each, then stack.
            x = torch.cat([resize_center_crop(pil_to_tensor(im)[None], self.size, self.crop) for im in images])
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std
