"""CLIP score: 100 · cos(image embedding, prompt embedding), no clamping.

Scale: 100 × raw cosine, *not* clamped at 0 (torchmetrics reports 100·max(cos, 0); the `clip-score` PyPI package
reports the raw cosine). Typical raw cosine on SDXL images with ViT-L/14 ≈ 0.33–0.36, i.e. ≈ 33–36 here
(peers.md §4, unverified there). Always state the backbone next to the number.

Weights: `openai/clip-vit-large-patch14` (transformers, the torchmetrics default) or any `CLIPModel` folder; the
open_clip variant (`clip_score_openclip`) takes an architecture name + local checkpoint, e.g. `ViT-L-14` with the
OpenAI or LAION weights file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.rewards.embeddings import ClipEncoder, OpenClipEncoder, cosine_pairs
from diffalign.rewards.preprocess import Images


@dataclass
class ClipScore:
    encoder: ClipEncoder | OpenClipEncoder

    @classmethod
    def load(
        cls,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> ClipScore:
        """transformers backbone: `model` hub id or folder; `processor` defaults to `model`."""
        return cls(ClipEncoder.load(model, processor, device, dtype, batch_size))

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) 100·cos."""
        return 100.0 * cosine_pairs(self.encoder.embed_images(images), self.encoder.embed_texts(prompts))


class OpenClipScore:
    """Registry entry `clip_score_openclip`: a `ClipScore` on an open_clip backbone."""

    @staticmethod
    def load(
        checkpoint: str | Path,
        model_name: str = "ViT-L-14",
        allow_pickle: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> ClipScore:
        """`model_name`: open_clip architecture; `checkpoint`: its full state dict (.safetensors, or a torch pickle
        with `allow_pickle=True`)."""
        return ClipScore(OpenClipEncoder.load(model_name, checkpoint, allow_pickle, device, dtype, batch_size))
