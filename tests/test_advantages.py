"""Group-relative advantages (Flow-GRPO) and DiffusionNFT's optimality probability, by hand."""

import pytest
import torch

from diffalign.online.advantages import group_advantages, optimality


def test_global_std_advantages_by_hand():
    r = torch.tensor([[1.0, 3.0], [10.0, 10.0]])
    # prompt means 2 and 10; centred [-1, 1, 0, 0]; population std of all four rewards: mean 6, var (25+9+16+16)/4
    std = (66 / 4) ** 0.5
    want = torch.tensor([[-1.0, 1.0], [0.0, 0.0]]) / (std + 1e-4)
    assert torch.allclose(group_advantages(r), want)


def test_per_prompt_std_and_clip():
    r = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    a = group_advantages(r, global_std=False)
    assert torch.allclose(a[0], torch.tensor([-1.0, 1.0]) / (1 + 1e-4))
    assert torch.equal(a[1], torch.zeros(2))  # a group of equal rewards gives no signal
    assert group_advantages(torch.tensor([[0.0, 0.0, 0.0, 1e6]]), global_std=False, clip=1.5).max() == 1.5


def test_advantages_ignore_a_prompts_offset_and_scale_with_the_reward():
    r = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    shifted = r + torch.tensor([[5.0], [-2.0], [0.3]])
    assert torch.allclose(
        group_advantages(r, global_std=False), group_advantages(shifted, global_std=False), atol=1e-5
    )
    assert torch.allclose(group_advantages(r, global_std=False), group_advantages(3 * r, global_std=False), atol=1e-3)


def test_optimality_maps_clipped_advantages_to_unit_interval():
    a = torch.tensor([-9.0, -5.0, 0.0, 2.5, 5.0, 9.0])
    assert torch.allclose(optimality(a), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_bad_shape_names_it():
    with pytest.raises(ValueError, match=r"\(prompts, group\)"):
        group_advantages(torch.zeros(4))
