"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor", Schuhmann et al. 2022).

Score = MLP(CLIP ViT-L/14 image embedding / ||·||₂), a regression onto AVA-style 1–10 ratings; the prompt is
ignored. Typical SDXL values ≈ 5.5–6.5 (peers.md §4, unverified there). The MLP is 768→1024→128→64→16→1 with
dropouts and no activations (the ReLUs are commented out upstream), so it is an affine map of the embedding.

Weights: `sac+logos+ava1-l14-linearMSE.pth` (github.com/christophschuhmann/improved-aesthetic-predictor, 3.7 MB),
a torch pickle of the `nn.Sequential` state dict with keys `layers.{0,2,4,6,7}.{weight,bias}`; loading it needs
`allow_pickle=True` (read with weights_only=True). A `.safetensors` copy with the same keys loads without it.
Upstream embeds with the OpenAI `clip` package; here `openai/clip-vit-large-patch14` through transformers (what
most RL repos do; near-identical, not bit-identical).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffalign.rewards.embeddings import ClipEncoder, load_weights
from diffalign.rewards.preprocess import Images


def aesthetic_mlp(in_dim: int = 768) -> nn.Sequential:
    """The upstream `MLP.layers`; indices 0, 2, 4, 6, 7 are the Linear layers the checkpoint keys name."""
    return nn.Sequential(
        nn.Linear(in_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


@dataclass
class LaionAesthetic:
    encoder: ClipEncoder
    mlp: nn.Sequential

    @classmethod
    def load(
        cls,
        weights: str | Path,
        clip_model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        allow_pickle: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> LaionAesthetic:
        """`weights`: the predictor's .pth (needs allow_pickle) or .safetensors; `clip_model`: the embedding CLIP."""
        state = {k.removeprefix("layers."): v for k, v in load_weights(weights, allow_pickle).items()}
        if "0.weight" not in state:
            raise ValueError(f"{weights}: no 'layers.0.weight'; not an improved-aesthetic-predictor state dict")
        mlp = aesthetic_mlp(state["0.weight"].shape[1])
        mlp.load_state_dict(state, strict=True)
        encoder = ClipEncoder.load(clip_model, processor, device, dtype, batch_size)
        return cls(encoder, mlp.to(device).eval())

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """N images (prompts ignored) -> (N,) predicted rating."""
        emb = self.encoder.embed_images(images)  # (N, D)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb.to(self.mlp[0].weight.dtype)).squeeze(-1).float()  # (N, 1) -> (N,)
