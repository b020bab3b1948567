"""The flow-matching toy model and the Euler ODE sampler: diffusers' own SD3 pipeline gives the same latents on the
same sigma grid; the toy family loads the flow folder as a flow model called at sigma * 1000."""

from pathlib import Path

import pytest
import torch

from diffalign.flow_ode import flow_timesteps, sample_flow
from diffalign.models import load_family
from diffalign.models.toy import add_coords

REPO = Path(__file__).resolve().parents[1]
TOY_FLOW = REPO / "assets" / "toy_flow_model"


def test_flow_timesteps_trailing():
    assert flow_timesteps(1000, 4).tolist() == [999, 749, 499, 249]


def test_euler_ode_equals_the_diffusers_sd3_pipeline_on_the_same_sigmas():
    """Tiny SD3 (shift 3): our loop on the training table == StableDiffusion3Pipeline given the unshifted grid
    1 - k/S (its scheduler applies the same shift), CFG off, same x_T seed."""
    family = load_family(str(REPO / "assets" / "tiny" / "sd3"))
    steps, seed, prompt = 4, 7, "a red circle"
    ours = sample_flow(family, [prompt], [seed], steps, guidance=1.0)
    sigmas = [1 - k / steps for k in range(steps)]
    theirs = family.pipe(
        prompt,
        sigmas=sigmas,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images
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
