"""The flow-matching toy model and the Euler ODE sampler: diffusers' own SD3 pipeline gives the same latents; the toy
family loads the flow folder as a flow model called at sigma * 1000."""

from pathlib import Path

import pytest
import torch

from diffalign.flow_sampling import sample_flow
from diffalign.models import load_family
from diffalign.models.toy import add_coords

REPO = Path(__file__).resolve().parents[1]
TOY_FLOW = REPO / "assets" / "toy_flow_model"


def test_euler_ode_equals_the_diffusers_sd3_pipeline():
    """Tiny SD3 (shift 3): `sample_flow` (the flow sampler at noise level 0, the grid generation and on-line rounds
    share) == StableDiffusion3Pipeline's own `steps`-step grid, CFG off, same x_1 seed."""
    family = load_family(str(REPO / "assets" / "tiny" / "sd3"))
    steps, seed, prompt = 4, 7, "a red circle"
    ours = sample_flow(family, [prompt], [seed], steps, guidance=1.0)
    theirs = family.pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images
    assert theirs.abs().max() > 1  # a real sample
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


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
