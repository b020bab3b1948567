"""ImageReward (Xu et al. 2023, arXiv 2304.05977): BLIP ViT-L/16 + a cross-attention BERT, regressed onto human
preference rankings; the reward model of ReFL, used by Flow-GRPO and DanceGRPO as a reward.

Score, as the image-reward package's `ImageReward.score`: the prompt (BERT tokens, padded/truncated to 35) attends
to the image's ViT tokens; the [CLS] output goes through the same 768→1024→128→64→16→1 MLP as the LAION aesthetic
head, then (r − 0.16717) / 1.03334 (the package's mean and std, so scores sit around 0 ± 1; not measured here).
Unbounded. Compare images of the same prompt.

The official checkpoint is loaded into transformers' BLIP classes, no image-reward package needed:
- `ImageReward.pt` (HF `THUDM/ImageReward`, a torch pickle of the model state dict; needs `allow_pickle=True`, read
  with weights_only=True) or a `.safetensors` copy with the same keys;
- `med_config.json` (the BERT config next to it; `encoder_width` is set from the ViT, as BLIP_Pretrain does);
- `tokenizer`: `bert-base-uncased` (hub id or folder); [DEC] and [ENC] are added as upstream's `init_tokenizer`.
Key mapping: `blip.visual_encoder.*` (BLIP's timm-style ViT) -> `BlipVisionModel` (cls_token -> class_embedding,
pos_embed -> position_embedding, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp} -> encoder.layers.i.{layer_norm1,
self_attn.qkv,self_attn.projection,layer_norm2,mlp}, norm -> post_layernorm; LayerNorm eps 1e-6 as BLIP's ViT);
`blip.text_encoder.*` -> `BlipTextModel` (same names); `mlp.layers.*` -> the MLP. Every mapped key must be present.
Images: PIL through torchvision Resize(224, bicubic) + CenterCrop + CLIP mean/std, as upstream; tensors through the
torch path of preprocess.py (close, not bit-identical).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.rewards.aesthetic import aesthetic_mlp
from diffalign.rewards.embeddings import load_weights
from diffalign.rewards.preprocess import ClipPreprocess, Images

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 35
VISION_RENAMES = [  # BLIP ViT name -> BlipVisionModel name (regex, replacement)
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def rename_vision(key: str) -> str:
    for pattern, new in VISION_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, new, key)
    raise KeyError(f"unexpected BLIP ViT key '{key}'")


def split_checkpoint(state: dict[str, torch.Tensor], path) -> tuple[dict, dict, dict]:
    """ImageReward state dict -> (vision, text, mlp) state dicts in transformers / MLP names."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[rename_vision(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            mlp[key.removeprefix("mlp.layers.")] = value
    for name, part in (("blip.visual_encoder", vision), ("blip.text_encoder", text), ("mlp.layers", mlp)):
        if not part:
            raise ValueError(f"{path}: no '{name}.*' keys; not an ImageReward checkpoint")
    return vision, text, mlp


@dataclass
class ImageReward:
    vision: torch.nn.Module
    text: torch.nn.Module
    mlp: torch.nn.Sequential
    tokenizer: object
    preprocess: ClipPreprocess
    batch_size: int = 32
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        med_config: str | Path,
        tokenizer: str = "bert-base-uncased",
        vision_heads: int = 16,
        allow_pickle: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> ImageReward:
        """`checkpoint`: ImageReward.pt (needs allow_pickle) or .safetensors; `med_config`: med_config.json;
        `tokenizer`: BERT tokenizer id or folder; `vision_heads`: ViT attention heads (16 for BLIP's ViT-L;
        the only size not readable from the weight shapes)."""
        import torchvision.transforms as T
        from transformers import AutoTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        vision_sd, text_sd, mlp_sd = split_checkpoint(load_weights(checkpoint, allow_pickle), checkpoint)
        width, patch = (
            vision_sd["embeddings.class_embedding"].shape[-1],
            vision_sd["embeddings.patch_embedding.weight"],
        )
        grid = int(round((vision_sd["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
        depth = 1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers."))
        vcfg = BlipVisionConfig(hidden_size=width, intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                                num_hidden_layers=depth, num_attention_heads=vision_heads, patch_size=patch.shape[-1],
                                image_size=grid * patch.shape[-1], layer_norm_eps=1e-6, hidden_act="gelu")  # fmt: skip
        med = json.loads(Path(med_config).read_text())
        tcfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                              encoder_hidden_size=width, intermediate_size=med["intermediate_size"],
                              num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                              max_position_embeddings=med["max_position_embeddings"],
                              layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
                              pad_token_id=med.get("pad_token_id", 0), is_decoder=True)  # fmt: skip
        vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
        vision.load_state_dict(vision_sd, strict=True)
        missing, unexpected = text.load_state_dict(text_sd, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise ValueError(f"{checkpoint}: text encoder does not match {med_config} ({(missing + unexpected)[:3]})")
        mlp = aesthetic_mlp(med["hidden_size"])
        mlp.load_state_dict(mlp_sd, strict=True)
        tok = AutoTokenizer.from_pretrained(tokenizer)
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # init_tokenizer
        size = vcfg.image_size
        pil = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                         T.Normalize(CLIP_MEAN, CLIP_STD)])  # fmt: skip
        pre = ClipPreprocess(
            size, size, CLIP_MEAN, CLIP_STD, lambda ims: torch.stack([pil(im.convert("RGB")) for im in ims])
        )
        to = dict(device=device, dtype=dtype)
        return cls(vision.to(**to).eval(), text.to(**to).eval(), mlp.to(**to).eval(), tok, pre, batch_size,
                   torch.device(device), dtype)  # fmt: skip

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) (MLP([CLS] of the prompt attending to the image) − mean) / std."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            pixels = self.preprocess(images[i : i + self.batch_size]).to(self.device, self.dtype)
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # (n, 1 + patches, width)
            tok = self.tokenizer(list(prompts[i : i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=MAX_TOKENS, return_tensors="pt").to(self.device)  # fmt: skip
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts).last_hidden_state  # fmt: skip
            reward = self.mlp(hidden[:, 0]).squeeze(-1).float()  # (n, L, H) -> (n, H) -> (n,)
            out.append((reward - MEAN) / STD)
        return torch.cat(out)
