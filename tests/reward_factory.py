"""Tiny reward checkpoints in the official on-disk formats, built offline in a few seconds.

- transformers CLIP (`save_pretrained` model folder + a separate processor folder, as PickScore_v1 + the LAION
  processor): hidden 32, 2 layers, 32 px images, projection 16.
- open_clip CLIP from a registered tiny config, saved as the HPS checkpoints are: `torch.save({"state_dict": sd})`,
  plus a safetensors copy. Real open_clip tokenizer (the BPE vocab ships in the wheel).
- LAION aesthetic MLP: the upstream `MLP` module layout, `torch.save(model.state_dict())` -> keys `layers.0.weight` ...

Both CLIPs get a few steps of contrastive training on solid-colour images and "a photo of a <colour> square"
captions, so a matching caption scores higher than a mismatched one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}
WORDS = ["a", "photo", "of", "square", *COLOURS]
OPEN_CLIP_TINY = "diffalign-tiny-clip"  # open_clip model name of the config below
OPEN_CLIP_TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def caption(colour: str) -> str:
    return f"a photo of a {colour} square"


def colour_images(colours: list[str], seed: int = 0, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    """Solid colours + a little noise: (N, 3, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([COLOURS[c] for c in colours])[:, :, None, None]  # (N, 3, 1, 1)
    return (base + 0.05 * torch.randn(len(colours), 3, *size, generator=g)).clamp(0, 1)


def _contrastive_steps(logits_fn, steps: int, params, seed: int) -> None:
    """CLIP loss on one image per colour per step (no duplicate captions in a batch)."""
    opt = torch.optim.Adam(params, lr=3e-3)
    names = list(COLOURS)
    for step in range(steps):
        logits = logits_fn(colour_images(names, seed=seed + step), [caption(c) for c in names])  # (4, 4)
        target = torch.arange(len(names))
        loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()


def build_hf_clip(root: Path, steps: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """-> (model folder, processor folder), both loadable with `from_pretrained`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.models.tokenizers import build_clip_tokenizer
    from diffalign.rewards.preprocess import ClipPreprocess

    tok = build_clip_tokenizer(WORDS)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
                eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pre = ClipPreprocess.from_hf(image_processor)

    def logits(images, texts):
        ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt")
        return model(pixel_values=pre(images), **ids).logits_per_image

    _contrastive_steps(logits, steps, model.parameters(), seed)
    model.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(root / "processor")
    return root / "clip", root / "processor"


def register_tiny_open_clip(root: Path) -> str:
    """Write the tiny config as `<name>.json` and register it with open_clip; returns the model name."""
    import open_clip

    path = root / f"{OPEN_CLIP_TINY}.json"
    path.write_text(json.dumps(OPEN_CLIP_TINY_CONFIG))
    open_clip.add_model_config(path)
    return OPEN_CLIP_TINY


def build_open_clip(root: Path, steps: int = 40, seed: int = 0) -> tuple[str, Path, Path]:
    """-> (model name, HPS-format .pt, .safetensors copy) of a contrastively trained tiny open_clip model."""
    import open_clip

    from diffalign.rewards.preprocess import ClipPreprocess

    name = register_tiny_open_clip(root)
    torch.manual_seed(seed)
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None)
    tokenizer, pre = open_clip.get_tokenizer(name), ClipPreprocess.from_open_clip(model, transform)

    def logits(images, texts):
        img, txt, scale = model(pre(images), tokenizer(texts))[:3]  # normalised features, logit_scale.exp()
        return scale * img @ txt.T

    _contrastive_steps(logits, steps, model.parameters(), seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, root / "HPS_v2_compressed.pt")
    save_file(state, root / "HPS_v2_compressed.safetensors")
    return name, root / "HPS_v2_compressed.pt", root / "HPS_v2_compressed.safetensors"


class UpstreamAestheticMLP(nn.Module):
    """improved-aesthetic-predictor's `MLP` (Lightning parts dropped): same attribute name, same layer indices."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def build_aesthetic(root: Path, input_size: int = 16, seed: int = 0) -> tuple[UpstreamAestheticMLP, Path, Path]:
    """-> (module, `sac+logos+ava1-l14-linearMSE.pth`-format pickle, .safetensors copy)."""
    torch.manual_seed(seed)
    mlp = UpstreamAestheticMLP(input_size).eval()
    torch.save(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    save_file(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.safetensors")
    return mlp, root / "sac+logos+ava1-l14-linearMSE.pth", root / "sac+logos+ava1-l14-linearMSE.safetensors"
