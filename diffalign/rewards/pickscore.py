"""PickScore (Kirstain et al. 2023, arXiv 2305.01569): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Score = logit_scale.exp() · cos(image, prompt), as in the official model card snippet (logit_scale.exp() ≈ 100).
Typical SDXL values ≈ 21–23 (peers.md §4, unverified there); flow_grpo divides by 26. Softmax over the scores of
candidates for one prompt gives preference probabilities; scores of different prompts are not comparable.

Weights: `yuvalkirstain/PickScore_v1` (a transformers `CLIPModel`), processor `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`
(224 px bicubic, centre crop, CLIP mean/std; text truncated to 77 tokens). Both may be local folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.rewards.embeddings import ClipEncoder, cosine_pairs
from diffalign.rewards.preprocess import Images


@dataclass
class PickScore:
    encoder: ClipEncoder

    @classmethod
    def load(
        cls,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> PickScore:
        return cls(ClipEncoder.load(model, processor, device, dtype, batch_size))

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) logit_scale.exp() · cos."""
        cos = cosine_pairs(self.encoder.embed_images(images), self.encoder.embed_texts(prompts))  # (N,)
        return self.encoder.logit_scale.exp() * cos
