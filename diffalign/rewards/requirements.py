"""Compositional requirements of a prompt (GenEval, Ghosh et al. 2023, arXiv 2310.11513) and how detections meet them.

A GenEval prompt names objects with a count, optionally a colour, optionally a position relative to the previous
object: "a photo of three dogs", "a photo of a red car and a blue bench", "a photo of a cat left of a dog".
`parse_prompt` turns it into the `include` list of GenEval's metadata (a position refers to an earlier item, as
GenEval's `[relation, target index]`); `check` scores detections against it:

- strict (GenEval's `correct`, as Flow-GRPO's `strict_correct`): every item has exactly `count` detections of its
  class, exactly `count` of them have the colour, and every pair (object, target object) has the relation;
- partial (Flow-GRPO's training reward, reward-server's `evaluate_reward`): the mean of one term per requirement:
  count term 1 − |count − found| / count (negative when far too many are found, as upstream); colour term
  1 − |count − n_colour| / count; position term 1 if every pair has the relation, else 0. When the count is wrong, the
  colour / position terms are 0; a position whose target item failed is 0. (Upstream appends an extra 1.0 after a
  failed position check; here a failed check adds only its 0.)

`relative_position` is GenEval's, with its threshold 0.1: the centre offset shrunk by 0.1 × the summed box sizes,
normalised by the unshrunk offset length; a component beyond ±0.5 names the relation (image y grows downwards).

The toy world's `toy_fidelity` scores the same way, one term per attribute the prompt names, through `share_met`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # GenEval's
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
POSITION_THRESHOLD = 0.1

_WORD = r"(?!(?:a|an|the|of|with|on|in)\b)[a-z][a-z\-]*"  # a noun word: not an article or a preposition
_ITEM = re.compile(
    rf"^(?P<n>{'|'.join(NUMBERS)})\s+(?:(?P<colour>{'|'.join(COLOURS)})\s+)?(?P<noun>{_WORD}(?:\s+{_WORD}){{0,2}})$"
)
_RELATION = re.compile(rf"\s+({'|'.join(RELATIONS)})\s+")


@dataclass(frozen=True)
class Item:
    """One `include` clause: `count` objects of class `noun`, optionally coloured and placed relative to an item."""

    noun: str
    count: int = 1
    colour: str | None = None
    relation: str | None = None
    """"left of" / "right of" / "above" / "below" the item at index `target`."""
    target: int | None = None


@dataclass(frozen=True)
class Box:
    """One detection: class name (the query noun), score, xyxy pixels, colour name (or None if not classified)."""

    noun: str
    score: float
    xyxy: tuple[float, float, float, float]
    colour: str | None = None


def parse_prompt(prompt: str) -> list[Item]:
    """GenEval-style prompt -> include items. Raises ValueError naming the prompt if it does not parse."""
    text = prompt.strip().lower().rstrip(".")
    text = re.sub(r"^(a photo of|an image of|a picture of)\s+", "", text)
    parts = _RELATION.split(text)  # "a cat", "left of", "a dog" or one chunk
    if len(parts) == 3:
        a, relation, b = parts
        first, second = _item(b, prompt), _item(a, prompt)
        # GenEval lists the target first and gives the relation to the second item
        return [first, Item(second.noun, second.count, second.colour, relation, 0)]
    if len(parts) != 1:
        raise ValueError(f"prompt {prompt!r}: at most one relation ({', '.join(RELATIONS)}) is supported")
    return [_item(chunk, prompt) for chunk in re.split(r"\s+and\s+", text)]


def _item(chunk: str, prompt: str) -> Item:
    m = _ITEM.match(chunk.strip())
    if m is None:
        raise ValueError(f"prompt {prompt!r}: cannot parse {chunk!r} as '<a|an|number> [colour] <1-3 word object>'")
    return Item(m["noun"].strip(), NUMBERS[m["n"]], m["colour"])


def relative_position(a: Box, b: Box) -> set[str]:
    """GenEval's relation(s) of box `a` to box `b` (see module docstring)."""
    boxes = np.array([a.xyxy, b.xyxy], dtype=np.float64).reshape(2, 2, 2)  # (box, corner, xy)
    centre_a, centre_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, hit in zip(RELATIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if hit}


def share_met(terms: Sequence[float]) -> float:
    """Mean of per-requirement terms (1 = met); 0 when nothing is required."""
    return sum(terms) / len(terms) if terms else 0.0


def check(items: Sequence[Item], boxes: Sequence[Box]) -> tuple[bool, float]:
    """-> (strict: every requirement met exactly, partial: share of requirements met). See the module docstring."""
    strict, terms, groups = True, [], []
    for item in items:
        found = [b for b in boxes if b.noun == item.noun]
        terms.append(1 - abs(item.count - len(found)) / item.count)
        matched = len(found) == item.count
        if item.colour is not None:
            n_colour = sum(b.colour == item.colour for b in found)
            ok = matched and n_colour == item.count
            terms.append(1 - abs(item.count - n_colour) / item.count if matched else 0.0)
            matched = ok
        if item.relation is not None:
            targets = groups[item.target] if item.target is not None and item.target < len(groups) else None
            ok = matched and targets is not None
            ok = ok and all(item.relation in relative_position(o, t) for o in found for t in targets)
            terms.append(1.0 if ok else 0.0)
            matched = ok
        strict = strict and matched
        groups.append(found if matched else None)
    return strict, share_met(terms)
