"""The flow-matching toy model: the toy family loads the flow folder as a flow model called at sigma * 1000 and
generates with the Euler ODE (`sample_flow`, checked against diffusers' SD3 pipeline in tests/test_flow_sampling.py)."""

from pathlib import Path

import pytest
import torch

from diffalign.models import load_family
from diffalign.models.toy import add_coords

REPO = Path(__file__).resolve().parents[1]
TOY_FLOW = REPO / "assets" / "toy_flow_model"


@pytest.mark.skipif(not (TOY_FLOW / "model_index.json").is_file(), reason="assets/toy_flow_model not built")
def test_toy_flow_model_is_a_flow_family_called_at_sigma_times_1000():
    family = load_family(str(TOY_FLOW))
    assert family.name == "toy" and family.prediction_type == "flow"
    assert type(family.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    xt, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([249, 999])
    cond = family.encode_prompts(["a red circle", ""])
    with torch.no_grad():
        direct = family.denoiser(add_coords(xt), torch.tensor([250.0, 1000.0]), cond["prompt_embeds"]).sample
        assert torch.allclose(family.denoise(xt, t, cond), direct)
    images = family.generate(["a small red circle in the centre"], [0], steps=4)
    assert images[0].size == (32, 32)
