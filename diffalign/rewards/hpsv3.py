"""HPSv3 (Ma et al. 2025, arXiv 2508.03789): Qwen2-VL-7B-Instruct with a reward head, trained on HPDv3 preferences
with an uncertainty-aware ranking loss.

Score = μ, the first of the head's two outputs (μ, σ) at the `<|Reward|>` token, as the official
`HPSv3RewardInferencer.reward(...)[:, 0]`. Unbounded; the paper's leaderboard spans roughly 5–11 across models
(recalled, not measured or re-checked here); compare images of the same prompt.

Input, as the official inferencer: one user turn = the image, then `INSTRUCTION.format(text_prompt=prompt)` +
"Please provide the overall ratings of this image: <|Reward|> END", with the chat template's generation prompt;
the image is resized (PIL bicubic) to `pixels` = 256·28·28 pixels at the aspect ratio, in multiples of 28
(`smart_resize`); right padding. The official forward bypasses Qwen2-VL's multimodal RoPE index and runs the
language model with plain positions 0..L−1 on all three rotary sections; so does this one (`position_ids`).

Weights: `HPSv3.safetensors` (HF `MizzenAI/HPSv3`; or the older `model.pth`, a pickle that needs `allow_pickle`):
the whole reward model's state dict, so only the config and processor of `base` (`Qwen/Qwen2-VL-7B-Instruct`,
hub id or folder) are read, not its weights. `<|Reward|>` is added to the tokenizer and the embeddings sized to it,
as upstream. Keys saved by older transformers (`model.*` language model, `visual.*`) are mapped to today's
(`model.language_model.*`, `model.visual.*`). The head is read from its keys: `rm_head.weight` (linear) or
`rm_head.{0,3,5}` (upstream's default "ranknet" MLP h→1024→16→2 with ReLUs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from diffalign.rewards.embeddings import load_weights
from diffalign.rewards.geneval import to_pil
from diffalign.rewards.preprocess import Images

REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291 (upstream's text, trailing spaces included: they are tokens the model was trained on)
RATING = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def smart_resize(height: int, width: int, factor: int, pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule with min = max = `pixels`: sides in multiples of `factor`, area ≈ `pixels`."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def current_layout(key: str) -> str:
    """Qwen2-VL keys saved by transformers < 4.52 -> today's names."""
    if key.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    raise KeyError(key)


def reward_head(state: dict[str, torch.Tensor], path) -> nn.Module:
    """Upstream's rm_head from its keys (module docstring); loads the weights."""
    if "weight" in state and len(state) == 1:
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias=False)
    elif {"0.weight", "3.weight", "5.weight"} <= set(state):
        hidden, mid, out = state["0.weight"].shape[1], state["3.weight"].shape[1], state["5.weight"].shape[0]
        head = nn.Sequential(nn.Linear(hidden, mid), nn.ReLU(), nn.Dropout(0.05), nn.Linear(mid, state["3.weight"].shape[0]),
                             nn.ReLU(), nn.Linear(state["5.weight"].shape[1], out))  # fmt: skip
    else:
        raise ValueError(f"{path}: rm_head keys {sorted(state)[:4]} are neither a linear nor the ranknet head")
    head.load_state_dict(state, strict=True)
    return head.float().eval()


@dataclass
class HPSv3:
    model: nn.Module
    head: nn.Module
    processor: object
    reward_id: int
    pixels: int = PIXELS
    batch_size: int = 8
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        base: str = "Qwen/Qwen2-VL-7B-Instruct",
        processor: str | None = None,
        pixels: int = PIXELS,
        allow_pickle: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        batch_size: int = 8,
    ) -> HPSv3:
        """`checkpoint`: HPSv3.safetensors (or model.pth with allow_pickle); `base`: the Qwen2-VL whose config and
        processor it was trained from; `pixels`: image area fed to the model (upstream: 256·28·28)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

        state = load_weights(checkpoint, allow_pickle)
        state = state.get("model", state) if isinstance(state.get("model"), dict) else state
        head = reward_head(
            {k.removeprefix("rm_head."): v for k, v in state.items() if k.startswith("rm_head.")}, checkpoint
        )
        body = {current_layout(k): v for k, v in state.items() if not k.startswith("rm_head.")}
        proc = AutoProcessor.from_pretrained(processor or base, padding_side="right")
        proc.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        rows = body["model.language_model.embed_tokens.weight"].shape[0]
        if rows != len(proc.tokenizer):
            raise ValueError(f"{checkpoint}: {rows} token embeddings but the '{processor or base}' tokenizer has "
                             f"{len(proc.tokenizer)} tokens with {REWARD_TOKEN}; wrong base model?")  # fmt: skip
        config = AutoConfig.from_pretrained(base)
        config.text_config.vocab_size = rows  # upstream: resize_token_embeddings(len(tokenizer))
        config.pad_token_id = config.text_config.pad_token_id = proc.tokenizer.pad_token_id
        with init_empty_weights():  # parameters on "meta"; the checkpoint holds every weight
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in body.items()}, strict=True, assign=True)
        reward_id = proc.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        return cls(model.to(device).eval(), head.to(device), proc, reward_id, pixels, batch_size, torch.device(device))

    def message(self, prompt: str) -> str:
        turn = [{"type": "image"}, {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + RATING}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
        )

    def resize(self, image: Image.Image) -> Image.Image:
        ip = self.processor.image_processor
        h, w = smart_resize(image.height, image.width, ip.patch_size * ip.merge_size, self.pixels)
        return image.resize((w, h), Image.BICUBIC)

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) μ."""
        pils = [self.resize(im) for im in to_pil(images)]
        if len(pils) != len(prompts):
            raise ValueError(f"{len(pils)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(pils), self.batch_size):
            texts = [self.message(p) for p in prompts[i : i + self.batch_size]]
            # the images are already multiples of the patch grid, so the image processor keeps their size
            inputs = self.processor(
                text=texts, images=pils[i : i + self.batch_size], padding=True, return_tensors="pt"
            )
            inputs = inputs.to(self.device)
            ids = inputs["input_ids"]
            positions = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)  # (n, L), as upstream
            hidden = self.model.model(
                input_ids=ids,
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"].to(self.model.dtype),
                image_grid_thw=inputs["image_grid_thw"],
                position_ids=positions,
            ).last_hidden_state  # (n, L, H)
            at = ids == self.reward_id  # (n, L), one True per row
            if not (at.sum(dim=1) == 1).all():
                raise ValueError(f"expected one {REWARD_TOKEN} per prompt; a prompt may contain it")
            out.append(self.head(hidden[at].float())[:, 0])  # (n, H) -> (n, 2) -> μ (n,)
        return torch.cat(out).cpu()
