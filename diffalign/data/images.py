"""Decode, convert to RGB, resize + center-crop, flip and normalise one training image.

The geometry follows diffusers' SDXL training scripts (train_text_to_image_sdxl.py): resize the shortest side to
the resolution (bilinear), center-crop, then flip; `size_info` = (orig_h, orig_w, crop_top, crop_left) is what SDXL
micro-conditioning reads ("original_size" + "crops_coords_top_left").
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from diffalign.data.readers import DataError

WHITE = (255, 255, 255)


def decode_image(src: bytes | str, where: str = "") -> Image.Image:
    """Encoded bytes or a file path -> a fully loaded PIL image (any mode); DataError naming `where` if unusable."""
    if isinstance(src, (bytes, bytearray)) and len(src) == 0:
        raise DataError(f"{where}: zero-size image")
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        img.load()  # decode now: truncated data fails here, not later in a worker
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: undecodable image ({type(err).__name__}: {err})") from None
    return ImageOps.exif_transpose(img)  # photos from phones: honour the orientation tag


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency (RGBA, LA, palette with transparency) is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits instead of clipping
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / peak * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, P, L, 1, YCbCr, RGB


def resize_crop(img: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Shortest side -> `resolution` (bilinear), center crop to (resolution, resolution).

    Returns the crop and size_info = (orig_h, orig_w, crop_top, crop_left), the crop offsets in the resized image,
    computed as torchvision's Resize/CenterCrop do.
    """
    w, h = img.size
    if w <= h:  # torchvision Resize(int): the long side is truncated, not rounded
        new_w, new_h = resolution, int(resolution * h / w)
    else:
        new_w, new_h = int(resolution * w / h), resolution
    resized = img.resize((new_w, new_h), Image.BILINEAR) if (new_w, new_h) != (w, h) else img
    top = max(0, int(round((new_h - resolution) / 2.0)))
    left = max(0, int(round((new_w - resolution) / 2.0)))
    return resized.crop((left, top, left + resolution, top + resolution)), (h, w, top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1] (same as ToTensor + Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # (H, W, 3)
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0  # (H, W, 3) -> (3, H, W)


def hflip(pixels: torch.Tensor, size_info: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a cropped image (..., 3, H, W) and its size_info (..., 4).

    crop_left becomes W - crop_left, as diffusers' SDXL scripts write it after cropping (`x1 = image.width - x1`,
    where image.width is already the crop width). Kept identical so LoRAs match models trained with those scripts.
    """
    flipped = size_info.clone()
    flipped[..., 3] = pixels.shape[-1] - size_info[..., 3]
    return pixels.flip(-1), flipped


def load_image(src: bytes | str, resolution: int, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes or path -> (pixels (3, R, R) in [-1, 1], size_info (4,) long), unflipped."""
    img, size_info = resize_crop(to_rgb(decode_image(src, where)), resolution)
    return to_tensor(img), torch.tensor(size_info, dtype=torch.long)
