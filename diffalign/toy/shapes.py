"""The toy shapes world: grammar, seeded renderer and a rule-based analyser, pure numpy + PIL.

An image is 32x32 RGB with ONE filled shape on a light, plain grey background. A caption names four attributes:
"a small red circle at the top left". Rendering varies what the caption does not fix, so a reward can prefer
some renderings over others without contradicting the prompt:

- colour: hue = the colour's hue +- 8 degrees; saturation ~ U(0.4, 1) and value ~ U(0.6, 1), so some reds are
  pale or dull and some vivid. Chroma (= saturation * value) is what the toy aesthetic scores.
- geometry: the centre jitters +-1.5 px around the position's anchor, the half-size +-0.5 px around the size's.
- background: a grey level ~ U(0.82, 0.95).
Edges are anti-aliased by rendering at 4x and box-downsampling.

`analyse` reads the attributes back from any image (rendered or generated): the foreground is every pixel far from
the median border colour (largest 4-connected component, so stray noise pixels do not count); its centroid gives
the nearest position anchor, its bounding-box half-size the size, the hue of its mean colour the nearest colour, and
its fill ratio of the bounding box the shape (circle pi/4 ~ 0.785, square 1.0; threshold 0.89).

`measure` reads the same image continuously, for the drift scorers (diffalign.rewards.toy_drift): each pixel's
coverage by the shape, alpha = the projection of (pixel - background) on (shape colour - background), in [0, 1],
which undoes the renderer's anti-aliased blend exactly; from it the centre and area in sub-pixel units, and the
background's mean colour and texture from the pixels at least one pixel away from the shape.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

RESOLUTION = 32
SHAPES = ("circle", "square")
COLOURS = {"red": 0.0, "yellow": 60.0, "green": 120.0, "blue": 240.0}  # name -> hue in degrees
SIZES = {"small": 4.5, "large": 8.5}  # name -> half-size in pixels (circle radius, half the square's side)
POSITIONS = {  # name -> anchor (x, y) of the shape's centre, pixels, origin at the top-left corner of the image
    "top left": (9.5, 9.5),
    "top right": (22.5, 9.5),
    "bottom left": (9.5, 22.5),
    "bottom right": (22.5, 22.5),
    "center": (16.0, 16.0),
}
ATTRIBUTES = ("colour", "shape", "size", "position")
WORDS = ["a", "at", "the", "top", "bottom", "left", "right", "center", *SHAPES, *COLOURS, *SIZES]

HUE_JITTER = 8.0  # degrees
SATURATION = (0.4, 1.0)
VALUE = (0.6, 1.0)
CENTRE_JITTER = 1.5  # pixels
SIZE_JITTER = 0.5  # pixels
BACKGROUND = (0.82, 0.95)  # grey level
SUPERSAMPLE = 4

FOREGROUND_DISTANCE = 0.15  # RGB euclidean distance from the border median that makes a pixel foreground
MIN_PIXELS = 6  # a foreground component smaller than this is "no shape"
SIZE_THRESHOLD = 6.5  # half-size (px) between small (4.5) and large (8.5)
FILL_THRESHOLD = 0.89  # bbox fill ratio between circle (0.785) and square (1.0)


@dataclass(frozen=True)
class Scene:
    """One sampled scene: the four captioned attributes plus the uncaptioned rendering variation."""

    shape: str
    colour: str
    size: str
    position: str
    hue: float  # degrees
    saturation: float
    value: float
    cx: float  # centre, pixels
    cy: float
    half: float  # half-size, pixels
    background: float  # grey level

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.size, self.position)

    @property
    def rgb(self) -> tuple[float, float, float]:
        return colorsys.hsv_to_rgb((self.hue % 360.0) / 360.0, self.saturation, self.value)


def caption(shape: str, colour: str, size: str, position: str) -> str:
    return f"a {size} {colour} {shape} at the {position}"


def all_combinations() -> list[dict[str, str]]:
    """All 2 * 4 * 2 * 5 = 80 attribute combinations, in a fixed order."""
    return [
        {"shape": s, "colour": c, "size": z, "position": p}
        for s in SHAPES
        for c in COLOURS
        for z in SIZES
        for p in POSITIONS
    ]


def sample_scene(rng: np.random.Generator, attrs: dict[str, str] | None = None) -> Scene:
    """Draw a scene; `attrs` fixes any of shape/colour/size/position, the rest are drawn uniformly."""
    attrs = dict(attrs or {})
    shape = attrs.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = attrs.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))]
    size = attrs.get("size") or list(SIZES)[rng.integers(len(SIZES))]
    position = attrs.get("position") or list(POSITIONS)[rng.integers(len(POSITIONS))]
    ax, ay = POSITIONS[position]
    return Scene(
        shape=shape,
        colour=colour,
        size=size,
        position=position,
        hue=COLOURS[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER),
        saturation=rng.uniform(*SATURATION),
        value=rng.uniform(*VALUE),
        cx=ax + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
        cy=ay + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
        half=SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER),
        background=rng.uniform(*BACKGROUND),
    )


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """Scene -> float32 image (H, W, 3) in [0, 1], anti-aliased by supersampling."""
    n = resolution * SUPERSAMPLE
    scale = resolution / RESOLUTION  # geometry is defined on the 32-px grid
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE / scale  # sub-pixel centres in 32-px units
    x, y = np.meshgrid(coords, coords)  # (n, n) each
    dx, dy = x - scene.cx, y - scene.cy
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= scene.half**2
    else:
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= scene.half
    # (n, n) -> (H, W): fraction of sub-pixels inside = coverage alpha
    alpha = inside.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg = np.asarray(scene.rgb, dtype=np.float32)
    bg = np.full(3, scene.background, dtype=np.float32)
    return (bg * (1 - alpha) + fg * alpha).astype(np.float32)


def render_batch(rng: np.random.Generator, n: int, empty_fraction: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """n random scenes -> images (n, H, W, 3) in [0, 1] and captions ("" with probability `empty_fraction`)."""
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    captions = [("" if rng.random() < empty_fraction else s.caption) for s in scenes]
    return images, captions


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt names (missing ones are left out): {"shape", "colour", "size", "position"}."""
    words = prompt.lower().replace(",", " ").split()
    attrs = {}
    for key, names in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
        found = [w for w in words if w in names]
        if found:
            attrs[key] = found[0]
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical and horizontal:
        attrs["position"] = f"{vertical} {horizontal}"
    elif "center" in words or "centre" in words:
        attrs["position"] = "center"
    return attrs


def _as_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) array in [0, 1] -> float (H, W, 3) in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.asarray(image, dtype=np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean (H, W) mask (flood fill; images are tiny)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for sy, sx in zip(*np.nonzero(mask)):
        if seen[sy, sx]:
            continue
        stack, comp = [(sy, sx)], []
        seen[sy, sx] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def foreground(image) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image -> (foreground mask (H, W) bool, background colour (3,)), the mask's largest component."""
    img = _as_array(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])  # (4H - 4, 3)
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(img - bg, axis=-1) > FOREGROUND_DISTANCE
    return _largest_component(mask), bg


def _nearest_colour(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*np.clip(rgb, 0, 1))[0] * 360.0
    return min(COLOURS, key=lambda c: min(abs(hue - COLOURS[c]), 360 - abs(hue - COLOURS[c])))


def analyse(image) -> dict[str, str] | None:
    """Detected attributes of one image (PIL or (H, W, 3) in [0, 1]), or None if no shape is found."""
    img = _as_array(image)
    mask, _ = foreground(img)
    if mask.sum() < MIN_PIXELS:
        return None
    scale = RESOLUTION / img.shape[0]  # report geometry on the 32-px grid
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) * scale, (ys.mean() + 0.5) * scale
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    half = (width + height) / 4 * scale
    fill = mask.sum() / (width * height)
    return {
        "colour": _nearest_colour(img[mask].mean(axis=0)),
        "shape": "square" if fill > FILL_THRESHOLD else "circle",
        "size": "large" if half > SIZE_THRESHOLD else "small",
        "position": min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2),
    }


def chroma(image) -> float:
    """Mean chroma (max - min channel, = saturation * value) of the foreground; 0 if no shape is found."""
    img = _as_array(image)
    mask, _ = foreground(img)
    if mask.sum() < MIN_PIXELS:
        return 0.0
    fg = img[mask]  # (P, 3)
    return float((fg.max(axis=1) - fg.min(axis=1)).mean())


@dataclass(frozen=True)
class Measurement:
    """One image measured continuously (`measure`); geometry on the 32-px grid, colours in [0, 1]."""

    found: bool  # a shape of >= MIN_PIXELS pixels; when False the geometry fields are 0
    cx: float  # coverage-weighted centre, pixels from the top-left corner
    cy: float
    area: float  # sum of the coverage, pixels²
    fill: float  # area / bounding-box area of the shape's pixels: circle ~ pi/4, square ~ 1
    hue: float  # degrees, of the mean colour of the shape's interior
    background: np.ndarray  # (3,) mean colour of the background pixels
    background_std: float  # RGB standard deviation of the background pixels around that mean
    alpha: np.ndarray  # (H, W) coverage of each pixel by the shape, in [0, 1]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """4-neighbour dilation by one pixel of a boolean (H, W) mask."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def measure(image) -> Measurement:
    """Continuous geometry, colour and background of one image (PIL or (H, W, 3) in [0, 1]); see the docstring."""
    img = _as_array(image)
    mask, _ = foreground(img)
    scale = RESOLUTION / img.shape[0]
    found = bool(mask.sum() >= MIN_PIXELS)
    near = _dilate(mask) if found else np.zeros_like(mask)  # the shape and its anti-aliased rim
    bg_pixels = img[~near]  # (P, 3)
    bg = bg_pixels.mean(axis=0)
    bg_std = float(np.sqrt(((bg_pixels - bg) ** 2).mean()))
    alpha = np.zeros(img.shape[:2], dtype=np.float64)
    if not found:
        return Measurement(False, 0.0, 0.0, 0.0, 0.0, 0.0, bg, bg_std, alpha)
    inner = mask & ~_dilate(~mask)  # pixels whose 4 neighbours are all shape: no background blended in
    core = img[inner] if inner.any() else img[mask]
    fg = np.median(core, axis=0)
    d = fg - bg
    alpha[near] = np.clip((img[near] - bg) @ d / max(float(d @ d), 1e-12), 0.0, 1.0)  # (P,)
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    area = alpha.sum()
    cx, cy = (alpha * (xs + 0.5)).sum() / area * scale, (alpha * (ys + 0.5)).sum() / area * scale
    my, mx = np.nonzero(mask)
    box = (mx.max() - mx.min() + 1) * (my.max() - my.min() + 1)
    hue = colorsys.rgb_to_hsv(*np.clip(core.mean(axis=0), 0, 1))[0] * 360.0
    return Measurement(True, float(cx), float(cy), float(area * scale**2), float(area / box), hue, bg, bg_std, alpha)


def half_size(m: Measurement, shape: str) -> float:
    """The half-size (pixels) of a `shape` ("circle" or "square") with the measured area: sqrt(A / pi), sqrt(A) / 2."""
    return float(np.sqrt(m.area / np.pi) if shape == "circle" else np.sqrt(m.area) / 2)
