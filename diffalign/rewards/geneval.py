"""GenEval-style compositional reward: an open-vocabulary detector checks the objects, counts, colours and positions
a prompt asks for (GenEval, Ghosh et al. 2023, arXiv 2310.11513; as an RL reward: Flow-GRPO, Liu et al. 2025,
arXiv 2505.05470, GenEval 0.63 -> 0.95 on SD3.5-M).

Score, in requirements.py: `mode="partial"` (default) = the share of requirements met, Flow-GRPO's training signal
(≤ 1; a count term goes negative when far too many objects are found, as upstream); `mode="strict"` = 1 if every
requirement is met exactly, else 0 (GenEval's accuracy).

Differences from GenEval, which this scorer does not hide:
- detector: OWLv2 (`Owlv2ForObjectDetection`, Minderer et al. 2023) queried with "a photo of a <noun>" for each
  noun in the prompt, instead of Mask2Former on the 80 COCO classes; so any noun works, and the numbers are not
  GenEval's. Detections above `threshold` (`counting_threshold` when a count above 1 is asked; GenEval uses 0.3 and
  0.9 for Mask2Former, whose confidences run higher than OWLv2's, so both default to 0.3 here, not tuned) are kept
  per noun after greedy
  NMS at IoU `nms_iou` (OWLv2 returns overlapping boxes; Mask2Former does not need it), at most `max_objects` each.
- colour: GenEval's zero-shot CLIP classifier on each box crop (the 10 colours, its three templates, mean of the
  normalised text embeddings) with transformers CLIP ViT-L/14 (the same OpenAI weights GenEval loads via open_clip);
  GenEval masks the crop's background with the segmentation, a box detector cannot.

Weights: `google/owlv2-base-patch16-ensemble` (detector and processor) and `openai/clip-vit-large-patch14` (colour),
hub ids or local folders. Prompts must follow GenEval's templates (requirements.parse_prompt); others raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.rewards.embeddings import ClipEncoder
from diffalign.rewards.preprocess import Images
from diffalign.rewards.requirements import COLOURS, Box, Item, check, parse_prompt
from diffalign.rewards.toy import as_tensor

COLOUR_TEMPLATES = ("a photo of a {c} {noun}", "a photo of a {c}-colored {noun}", "a photo of a {c} object")


def to_pil(images: Images) -> list[Image.Image]:
    """PIL list or (N, 3, H, W) tensor in [0, 1] -> RGB PIL images (uint8, rounded)."""
    if not isinstance(images, torch.Tensor):
        return [im.convert("RGB") for im in images]
    x = (as_tensor(images).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return [Image.fromarray(a) for a in x]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (GenEval's +1 pixel convention)."""
    area = lambda x: max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def nms(boxes: list[Box], iou_threshold: float, max_objects: int) -> list[Box]:
    """Greedy NMS by score, as GenEval's loop (keep the best, drop boxes overlapping it above `iou_threshold`)."""
    order, kept = sorted(boxes, key=lambda b: -b.score), []
    while order and len(kept) < max_objects:
        best = order.pop(0)
        kept.append(best)
        order = [b for b in order if iou_threshold >= 1 or iou(best.xyxy, b.xyxy) < iou_threshold]
    return kept


@dataclass
class GenEvalScore:
    detector: torch.nn.Module
    processor: object
    colour: ClipEncoder
    mode: str = "partial"
    threshold: float = 0.3
    counting_threshold: float = 0.3
    nms_iou: float = 0.5
    max_objects: int = 16
    query: str = "a photo of a {noun}"
    batch_size: int = 8
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(
        cls,
        model: str = "google/owlv2-base-patch16-ensemble",
        processor: str | None = None,
        colour_model: str = "openai/clip-vit-large-patch14",
        colour_processor: str | None = None,
        mode: str = "partial",
        threshold: float = 0.3,
        counting_threshold: float = 0.3,
        nms_iou: float = 0.5,
        max_objects: int = 16,
        query: str = "a photo of a {noun}",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> GenEvalScore:
        """`model`/`processor`: OWLv2 hub id or folder; `colour_model`/`colour_processor`: the colour CLIP;
        `mode`: "partial" | "strict"; `threshold` / `counting_threshold`: detection score cut-offs (a prompt with a
        count above 1 uses the second); `nms_iou`: NMS overlap (1 = no NMS); `query`: detector text per noun."""
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        if mode not in ("partial", "strict"):
            raise ValueError(f"geneval mode '{mode}' unknown (partial, strict)")
        proc = Owlv2Processor.from_pretrained(processor or model)
        if len(proc.tokenizer) <= 2:
            raise OSError(f"tokenizer of '{processor or model}' has {len(proc.tokenizer)} tokens: not found offline?")
        net = Owlv2ForObjectDetection.from_pretrained(model, dtype=dtype).to(device).eval()
        clip = ClipEncoder.load(colour_model, colour_processor, device, dtype, batch_size)
        return cls(net, proc, clip, mode, threshold, counting_threshold, nms_iou, max_objects, query, batch_size,
                   torch.device(device))  # fmt: skip

    @torch.no_grad()
    def detect(self, images: list[Image.Image], nouns: list[list[str]], thresholds: list[float]) -> list[list[Box]]:
        """Per image: OWLv2 boxes for its nouns above its threshold, NMS per noun, colour-classified."""
        out = []
        for i in range(0, len(images), self.batch_size):
            ims, qs = images[i : i + self.batch_size], nouns[i : i + self.batch_size]
            text = [[self.query.format(noun=n) for n in q] for q in qs]
            inputs = self.processor(text=text, images=ims, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.detector.dtype)
            raw = self.detector(**inputs)
            side = [(max(im.size), max(im.size)) for im in ims]  # OWLv2 pads to a square at the bottom / right
            results = self.processor.post_process_grounded_object_detection(raw, threshold=0.0, target_sizes=side)
            for im, q, res, th in zip(ims, qs, results, thresholds[i : i + self.batch_size]):
                boxes = [
                    Box(q[int(label)], float(score), tuple(float(v) for v in xyxy))
                    for score, label, xyxy in zip(res["scores"], res["labels"], res["boxes"])
                    if score > th
                ]
                kept = [b for n in q for b in nms([b for b in boxes if b.noun == n], self.nms_iou, self.max_objects)]
                out.append(self.classify_colours(im, kept))
        return out

    def classify_colours(self, image: Image.Image, boxes: list[Box]) -> list[Box]:
        """GenEval's zero-shot colour of each box crop (argmax over COLOURS of cos(crop, mean template embedding))."""
        if not boxes:
            return boxes
        w, h = image.size
        crops = []
        for b in boxes:
            x0, y0, x1, y1 = (int(round(v)) for v in b.xyxy)
            x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
            crops.append(image.crop((x0, y0, max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1))))
        img = F.normalize(self.colour.embed_images(crops), dim=-1)  # (K, D)
        names = []
        for box, e in zip(boxes, img):
            texts = [t.format(c=c, noun=box.noun) for c in COLOURS for t in COLOUR_TEMPLATES]
            txt = F.normalize(self.colour.embed_texts(texts), dim=-1).view(len(COLOURS), len(COLOUR_TEMPLATES), -1)
            clf = F.normalize(txt.mean(dim=1), dim=-1)  # (colours, templates, D) -> (colours, D)
            names.append(COLOURS[int((clf @ e).argmax())])
        return [Box(b.noun, b.score, b.xyxy, c) for b, c in zip(boxes, names)]

    def __call__(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """N images, N GenEval-style prompts -> (N,) partial share or strict 0/1."""
        pils = to_pil(images)
        if len(pils) != len(prompts):
            raise ValueError(f"{len(pils)} images but {len(prompts)} prompts")
        items = [parse_prompt(p) for p in prompts]
        nouns = [list(dict.fromkeys(it.noun for it in its)) for its in items]
        thresholds = [self.counting_threshold if any(it.count > 1 for it in its) else self.threshold for its in items]
        detections = self.detect(pils, nouns, thresholds)
        scores = [score_items(its, boxes, self.mode) for its, boxes in zip(items, detections)]
        return torch.tensor(scores, dtype=torch.float32)


def score_items(items: Sequence[Item], boxes: Sequence[Box], mode: str) -> float:
    strict, partial = check(items, boxes)
    return float(strict) if mode == "strict" else partial
