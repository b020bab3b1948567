"""HPSv2 / HPSv2.1 (Wu et al. 2023, arXiv 2306.09341): open_clip ViT-H-14 fine-tuned on human preference pairs.

Score = cos(normalised image features, normalised text features), no logit scale (the official `hpsv2.score`
takes the diagonal of image_features @ text_features.T). `scale=1` gives that raw cosine: ≈ 0.277 (v2.0) and
≈ 0.306 (v2.1) for SDXL-base; `scale=100` gives the benchmark tables' numbers (27.73, 30.63). v2.0 and v2.1 scores
are not comparable with each other; compare images of the same prompt.

Weights: `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` from HF `xswu/HPSv2`, a torch pickle of
`{"state_dict": <open_clip ViT-H-14 state dict>}`. It holds every weight, so the base LAION checkpoint is not needed.
Loading the pickle needs `allow_pickle=True` (read with weights_only=True); a `.safetensors` copy of the state dict
loads without it. v2.1 is the same scorer with the other checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.rewards.embeddings import OpenClipEncoder, cosine_pairs
from diffalign.rewards.preprocess import Images


@dataclass
class HPSv2:
    encoder: OpenClipEncoder
    scale: float = 1.0
    """1 -> raw cosine (HPSv2 package output); 100 -> the paper's tables."""

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        model_name: str = "ViT-H-14",
        allow_pickle: bool = False,
        scale: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> HPSv2:
        """`checkpoint`: HPS_v2(.1)_compressed.pt (needs allow_pickle) or a .safetensors state dict;
        `model_name`: the open_clip architecture (override only for tests / custom towers)."""
        return cls(OpenClipEncoder.load(model_name, checkpoint, allow_pickle, device, dtype, batch_size), scale)

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) scale · cos."""
        return self.scale * cosine_pairs(self.encoder.embed_images(images), self.encoder.embed_texts(prompts))
