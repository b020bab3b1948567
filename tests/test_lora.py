"""LoRA: exact base output at init, reference mode, diffusers-format save/load round trips, scales, wrong base."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffalign.lora import (
    add_lora,
    load_lora,
    load_lora_many,
    lora_state_dict,
    read_metadata,
    reference_mode,
    save_lora,
)
from diffalign.models import load_family

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny"
PIPES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
RANK, ALPHA = 4, 8  # alpha != rank, so a lost alpha changes outputs


def family(name="sd15"):
    return load_family(str(TINY / name))


def inputs(fam, seed=0):
    """xt (2, 4, 8, 8), t (2,), cond for two prompts."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([20, 600]),
        fam.encode_prompts(["a photo of a cat", "dog"]),
    )


def out(fam, xt, t, cond):
    with torch.no_grad():
        return fam.denoise(xt, t, cond)


def trained(fam, seed=1):
    """Add a LoRA and give it nonzero B weights, as after training; returns the trainable params."""
    params = add_lora(fam.denoiser, RANK, ALPHA, fam.lora_target_modules)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return params


def test_add_lora_init_equals_base():
    fam = family()
    xt, t, cond = inputs(fam)
    base = out(fam, xt, t, cond)
    params = add_lora(fam.denoiser, RANK, ALPHA, fam.lora_target_modules)
    names = [n for n, p in fam.denoiser.named_parameters() if p.requires_grad]
    assert len(params) == len(names) > 0 and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    assert torch.equal(out(fam, xt, t, cond), base)  # B = 0 at init


def test_reference_mode_gives_base_and_restores():
    fam = family()
    xt, t, cond = inputs(fam)
    base = out(fam, xt, t, cond)
    trained(fam)
    policy = out(fam, xt, t, cond)
    assert not torch.allclose(policy, base)
    with reference_mode(fam.denoiser):
        assert torch.equal(out(fam, xt, t, cond), base)
    assert torch.equal(out(fam, xt, t, cond), policy)
    with pytest.raises(KeyError), reference_mode(fam.denoiser):
        raise KeyError("inside")
    assert torch.equal(out(fam, xt, t, cond), policy)


def test_grads_flow_after_reference_mode():
    fam = family()
    xt, t, cond = inputs(fam)
    params = trained(fam)
    with torch.no_grad(), reference_mode(fam.denoiser):
        ref = fam.denoise(xt, t, cond)
    loss = (fam.denoise(xt, t, cond) - ref).pow(2).mean() + fam.denoise(xt, t, cond).mean()
    loss.backward()
    assert all(p.requires_grad and p.grad is not None for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_save_loads_in_plain_diffusers(name, tmp_path):
    fam = family(name)
    xt, t, cond = inputs(fam)
    trained(fam)
    policy = out(fam, xt, t, cond)
    save_lora(fam, tmp_path, metadata={"objective": "dpo", "beta": 5000})
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert read_metadata(tmp_path) == {"objective": "dpo", "beta": 5000}

    pipe = PIPES[name].from_pretrained(str(TINY / name))  # plain diffusers, as a user would
    pipe.load_lora_weights(str(tmp_path))
    (adapter,) = pipe.unet.peft_config
    assert (pipe.unet.peft_config[adapter].r, pipe.unet.peft_config[adapter].lora_alpha) == (RANK, ALPHA)
    fresh = type(fam)(pipe, pipe.vae.config, torch.float32)  # same wrapper around the plain pipe
    assert torch.equal(out(fresh, xt, t, cond), policy)
    kwargs = dict(prompt=["a photo of a cat"], num_inference_steps=2, guidance_scale=3.0)
    plain = pipe(**kwargs, generator=[torch.Generator().manual_seed(7)]).images[0]
    ours = fam.generate(kwargs["prompt"], [7], steps=2, guidance=3.0)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(ours))


def test_load_lora_scales(tmp_path):
    trainer = family()
    xt, t, cond = inputs(trainer)
    base = out(trainer, xt, t, cond)
    trained(trainer)
    policy = out(trainer, xt, t, cond)
    save_lora(trainer, tmp_path)

    fam = family()
    load_lora(fam, tmp_path, scale=0.0)
    assert torch.equal(out(fam, xt, t, cond), base)
    fam = family()
    load_lora(fam, tmp_path / "pytorch_lora_weights.safetensors", adapter_name="style")  # a file path works too
    assert torch.equal(out(fam, xt, t, cond), policy)
    with reference_mode(fam.denoiser):
        assert torch.equal(out(fam, xt, t, cond), base)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_loras_with_scales(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, folder in [(1, a), (2, b)]:
        trainer = family()
        trained(trainer, seed)
        save_lora(trainer, folder)
        if seed == 1:
            xt, t, cond = inputs(trainer)
            only_a = out(trainer, xt, t, cond)
            sd_a = lora_state_dict(trainer.denoiser)
        else:
            sd_b = lora_state_dict(trainer.denoiser)

    fam = family()
    names = load_lora_many(fam, [(a, 1.0), (b, 0.0)])
    assert names == ["lora_0", "lora_1"]
    assert torch.equal(out(fam, xt, t, cond), only_a)  # scale 0 adds exactly nothing

    fam = family()
    load_lora_many(fam, [(a, 1.0), (b, 0.5)])
    unfused = out(fam, xt, t, cond)
    assert not torch.allclose(unfused, only_a)

    fam = family()
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = fam.denoiser.get_submodule(key).weight.detach().clone()
    load_lora_many(fam, [(a, 1.0), (b, 0.5)], fuse=True)
    assert not getattr(fam.denoiser, "peft_config", None)  # adapters removed after fusing
    # fused W = W0 + sum_i scale_i * (alpha / r) * B_i A_i
    delta = sum(
        s * ALPHA / RANK * sd[f"{key}.lora.up.weight"] @ sd[f"{key}.lora.down.weight"]
        for s, sd in [(1.0, sd_a), (0.5, sd_b)]
    )
    torch.testing.assert_close(fam.denoiser.get_submodule(key).weight, w0 + delta)
    torch.testing.assert_close(out(fam, xt, t, cond), unfused, rtol=1e-4, atol=1e-5)


def test_lora_for_another_base_fails_naming_the_file(tmp_path):
    trainer = family("sdxl")
    trained(trainer)
    path = save_lora(trainer, tmp_path)
    fam = family("sd15")
    with pytest.raises(ValueError) as err:
        load_lora(fam, tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not getattr(fam.denoiser, "peft_config", None)  # nothing half-loaded
