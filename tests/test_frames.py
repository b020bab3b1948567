"""Rewards on videos (diffalign.rewards.frames): an image scorer on every frame, reduced by mean / min / last, images
unchanged; the frame-consistency guard monitor, by hand."""

import pytest
import torch

from diffalign.guards import Monitor, PixelEncoder, measure_all, trips
from diffalign.rewards import load_scorer
from diffalign.rewards.frames import FrameReduced, frame_consistency, frame_strip


def solid_videos() -> torch.Tensor:
    """Video 0: frames red (1, 0, 0), grey 0.5, (0.2, 0.6, 0.4); video 1: grey 0.3 three times. (2, 3, 3, 8, 8)."""
    colours = [[(1, 0, 0), (0.5, 0.5, 0.5), (0.2, 0.6, 0.4)], [(0.3, 0.3, 0.3)] * 3]
    x = torch.tensor(colours).permute(0, 2, 1)  # (N, F, 3) -> (N, 3, F)
    return x[..., None, None].expand(2, 3, 3, 8, 8).contiguous()


@pytest.mark.parametrize("reduce, expected", [("mean", [1.4 / 3, 0.0]), ("min", [0.0, 0.0]), ("last", [0.4, 0.0])])
def test_frame_scores_reduce_per_video(reduce, expected):
    """saturation = mean chroma (max - min over RGB): video 0 frames 1, 0, 0.4; video 1 frames 0, 0, 0."""
    scorer = FrameReduced(load_scorer("saturation"), reduce)
    videos = solid_videos()
    torch.testing.assert_close(scorer(videos, ["a", "b"]), torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.equal(scorer(list(videos), ["a", "b"]), scorer(videos, ["a", "b"]))  # a list of videos too


def test_images_pass_through_and_bad_reduce_is_named():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = load_scorer("saturation")
    assert torch.equal(FrameReduced(plain)(images, ["a"] * 3), plain(images, ["a"] * 3))
    with pytest.raises(ValueError, match="reward.frame_reduce: 'median' unknown"):
        FrameReduced(plain, "median")


def test_frame_consistency_by_hand_and_as_a_guard():
    """pixels embedding = 2x - 1 per channel: video 0 moves |2 (0.5, 0.5, 0.5)| = 1 then |2 (0.3, 0.1, 0.1)| = 1/3
    per dim on average, video 1 not at all: (1 + 1/3 + 0 + 0) / 4 = 1/3."""
    videos = solid_videos()
    assert frame_consistency(PixelEncoder(), videos) == pytest.approx(1 / 3, abs=1e-6)
    still = videos[:, :, :1].expand(2, 3, 3, 8, 8)
    assert frame_consistency(PixelEncoder(), still) == 0.0
    flicker = Monitor.build("flicker", "frame_consistency", "max_rise", 0.1)
    base = measure_all([flicker], still, ["a", "b"], 1, still)
    values = measure_all([flicker], videos, ["a", "b"], 1, still)
    assert base == {"flicker": 0.0} and values["flicker"] == pytest.approx(1 / 3, abs=1e-6)
    assert trips([flicker], values, base) and not trips([flicker], base, base)
    with pytest.raises(ValueError, match="needs videos"):
        frame_consistency(PixelEncoder(), videos[:, :, 0])
    assert frame_strip(videos).shape == (2, 3, 8, 24) and torch.equal(frame_strip(videos)[..., 8:16], videos[:, :, 1])
