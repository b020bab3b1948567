"""Rewards on videos: any image scorer scores every frame, and the frame scores reduce to one per video; and the
frame-consistency value the guards watch (`guards.monitors.<name>.kind: frame_consistency`).

A video batch is a tensor (N, 3, F, H, W) in [0, 1] (what `WanFamily.decode` gives, rescaled), or a list of N
(3, F, H, W) tensors (what the guards collect). Frames go to the scorer as (N·F, 3, H, W) with each video's prompt
repeated F times; the scores (N, F) reduce by `reward.frame_reduce`:
    mean  the frame average (the default; DanceGRPO and Flow-Factory score video frames with image rewards and
          average them)
    min   the worst frame (a video is as good as its worst frame)
    last  the last frame
Images (N, 3, H, W) pass through unchanged, so the wrapper is a no-op for image families.

Frame consistency: the mean change of an embedding between consecutive frames,
    c = mean_{n, f} mean_d |e(x_{n, f+1}) - e(x_{n, f})|          (the `pixels` encoder: 8x8 pooled pixels in [-1, 1])
0 for a still video; a rise over the base model's value is flicker, a drop towards 0 a frozen video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FRAME_REDUCE = {
    "mean": lambda s: s.mean(1),  # (N, F) -> (N,)
    "min": lambda s: s.min(1).values,
    "last": lambda s: s[:, -1],
}


def as_videos(images) -> torch.Tensor | None:
    """(N, 3, F, H, W) float tensor for a video batch (a 5-D tensor or a list of (3, F, H, W) tensors), else None."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor) and images[0].ndim == 4:
        images = torch.stack(list(images))
    if isinstance(images, torch.Tensor) and images.ndim == 5:
        if images.shape[1] != 3:
            raise ValueError(f"expected videos (N, 3, F, H, W), got {tuple(images.shape)}")
        return images.float()
    return None


def frames_of(videos: torch.Tensor) -> torch.Tensor:
    """(N, 3, F, H, W) -> (N·F, 3, H, W), video-major (row n·F + f is frame f of video n)."""
    n, c, f, h, w = videos.shape
    return videos.transpose(1, 2).reshape(n * f, c, h, w)


def frame_strip(images: torch.Tensor) -> torch.Tensor:
    """Videos (N, 3, F, H, W) -> (N, 3, H, F·W), the frames side by side (a round's grid); images unchanged."""
    if images.ndim != 5:
        return images
    n, c, f, h, w = images.shape
    return images.permute(0, 1, 3, 2, 4).reshape(n, c, h, f * w)


@dataclass
class FrameReduced:
    """An image scorer made to score videos frame by frame; images pass through (module docstring)."""

    scorer: object
    reduce: str = "mean"

    def __post_init__(self):
        if self.reduce not in FRAME_REDUCE:
            raise ValueError(f"reward.frame_reduce: '{self.reduce}' unknown (known: {', '.join(FRAME_REDUCE)})")

    def __getattr__(self, name):  # the wrapped scorer's own attributes (encoder, exemplars, ...)
        if name in ("scorer", "reduce"):
            raise AttributeError(name)
        return getattr(self.scorer, name)

    def __call__(self, images, prompts, *base):
        videos = as_videos(images)
        if videos is None:
            return self.scorer(images, prompts, *base)
        f = videos.shape[2]
        frame_prompts = [p for p in prompts for _ in range(f)]  # (N,) -> (N·F,)
        base_frames = [frames_of(as_videos(b)) for b in base]
        scores = self.scorer(frames_of(videos), frame_prompts, *base_frames).float()  # (N·F,)
        return FRAME_REDUCE[self.reduce](scores.view(len(videos), f))  # (N, F) -> (N,)


def frame_consistency(encoder, videos) -> float:
    """Mean absolute embedding change between consecutive frames (module docstring); needs videos of >= 2 frames."""
    x = as_videos(videos)
    if x is None or x.shape[2] < 2:
        raise ValueError("the frame_consistency monitor needs videos (N, 3, F, H, W) with F >= 2 frames")
    n, _, f = x.shape[:3]
    emb = encoder.embed_images(frames_of(x)).float().view(n, f, -1)  # (N·F, D) -> (N, F, D)
    return float((emb[:, 1:] - emb[:, :-1]).abs().mean())
