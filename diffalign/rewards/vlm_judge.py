"""VLM judge: a vision-language model answers a yes/no question about the image and its prompt; score = P(yes).

Score = softmax over the two answer tokens' logits at the first answer position
      = exp(l_yes) / (exp(l_yes) + exp(l_no)) = sigmoid(l_yes − l_no), in (0, 1).
This is VQAScore (Lin et al. 2024, arXiv 2404.01291), which takes P("Yes") for the question "Does this figure
show "{prompt}"? Please answer yes or no."; renormalising over {yes, no} (as UnifiedReward-style and VeRL-Omni
judges do) keeps the score from depending on how much mass the model puts on other tokens.

The model is any transformers image-text-to-text model with a chat template (`AutoModelForImageTextToText` +
`AutoProcessor`: Qwen2-VL, Qwen2.5-VL, LLaVA, ...); the question is one user turn with the image first, then
`template.format(prompt=...)`, followed by the template's generation prompt. `yes` / `no` are the answer words;
each must be a single token of the model's tokenizer (the default "Yes" / "No" are, for Qwen2-VL). Batches are left
padded so the last position is every row's answer position.

Weights: `Qwen/Qwen2-VL-2B-Instruct` by default; any hub id or local folder. Not differentiable as used here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffalign.rewards.geneval import to_pil
from diffalign.rewards.preprocess import Images

TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'


def p_yes(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """(N, V) answer-position logits -> (N,) softmax over (yes, no), the yes share."""
    pair = torch.stack([logits[:, yes_id], logits[:, no_id]], dim=-1).float()  # (N, V) -> (N, 2)
    return pair.softmax(dim=-1)[:, 0]


def single_token(tokenizer, word: str, model: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"vlm_judge: answer word {word!r} is {len(ids)} tokens for '{model}'; pick a one-token word")
    return ids[0]


@dataclass
class VlmJudge:
    model: torch.nn.Module
    processor: object
    yes_id: int
    no_id: int
    template: str = TEMPLATE
    batch_size: int = 8
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(
        cls,
        model: str = "Qwen/Qwen2-VL-2B-Instruct",
        processor: str | None = None,
        template: str = TEMPLATE,
        yes: str = "Yes",
        no: str = "No",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> VlmJudge:
        """`model`/`processor`: hub id or folder; `template`: the question, with `{prompt}`; `yes`/`no`: the answer
        words whose logits are compared (one token each)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if "{prompt}" not in template:
            raise ValueError(f"vlm_judge: template {template!r} has no {{prompt}} field")
        proc = AutoProcessor.from_pretrained(processor or model)
        proc.tokenizer.padding_side = "left"  # the last position is the answer position of every row
        yes_id, no_id = single_token(proc.tokenizer, yes, model), single_token(proc.tokenizer, no, model)
        if yes_id == no_id:
            raise ValueError(f"vlm_judge: '{yes}' and '{no}' are the same token")
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
        return cls(net, proc, yes_id, no_id, template, batch_size, torch.device(device))

    def question(self, prompt: str) -> str:
        """The chat-formatted text of one judge query (image placeholder, question, generation prompt)."""
        turn = [{"type": "image"}, {"type": "text", "text": self.template.format(prompt=prompt)}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
        )

    @torch.no_grad()
    def answer_logits(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N, V) next-token logits at the answer position."""
        pils = to_pil(images)
        if len(pils) != len(prompts):
            raise ValueError(f"{len(pils)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(pils), self.batch_size):
            texts = [self.question(p) for p in prompts[i : i + self.batch_size]]
            inputs = self.processor(
                text=texts, images=pils[i : i + self.batch_size], padding=True, return_tensors="pt"
            )
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out.append(self.model(**inputs).logits[:, -1].float())  # (n, L, V) -> (n, V)
        return torch.cat(out)

    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N prompts -> (N,) P(yes) in (0, 1)."""
        return p_yes(self.answer_logits(images, prompts), self.yes_id, self.no_id).cpu()
