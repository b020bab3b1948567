"""Model families on the tiny real pipelines in assets/tiny (made by assets/make_tiny_pipelines.py)."""

import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffalign.errors import DiffalignError
from diffalign.models import load_family
from diffalign.models.sd import SDFamily
from diffalign.models.sdxl import SDXLFamily

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny"
PROMPTS = ["a photo of a cat", "red dog"]


@pytest.fixture(scope="module")
def sd15():
    return load_family(str(TINY / "sd15"))


@pytest.fixture(scope="module")
def sdxl():
    return load_family(str(TINY / "sdxl"))


def latents_and_t(n=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, h, w, generator=g), torch.tensor([10, 700][:n])


def test_auto_detection_and_attributes(sd15, sdxl):
    assert isinstance(sd15, SDFamily) and isinstance(sdxl, SDXLFamily)
    for family, name in [(sd15, "sd"), (sdxl, "sdxl")]:
        assert family.name == name
        assert family.prediction_type == "epsilon"
        assert (family.resolution, family.vae_scale_factor, family.latent_channels) == (64, 8, 4)  # 8 px * 8
        assert family.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"] and family.lora_prefix == "unet"
        assert family.denoiser is family.pipe.unet
        # the training schedule is DDPM with the folder's betas, whatever the folder's inference scheduler is
        assert type(family.scheduler) is DDPMScheduler
        assert family.scheduler.config.beta_schedule == "scaled_linear"
        assert family.scheduler.config.steps_offset == 1
    assert len(sd15.pipe.tokenizer) > 2  # a tokenizer built offline without its vocabulary has only 2 ids


def test_v_prediction_family():
    family = load_family(str(TINY / "sd15_v"))
    assert family.prediction_type == "v_prediction"
    assert family.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name, encoders", [("sd15", ["text_encoder"]), ("sdxl", ["text_encoder", "text_encoder_2"])])
def test_load_without_encoders(name, encoders, request):
    full = request.getfixturevalue(name)
    family = load_family(str(TINY / name), load_encoders=False)
    assert family.pipe.vae is None
    assert all(getattr(family.pipe, e) is None for e in encoders)
    assert (family.resolution, family.vae_scale_factor) == (64, 8)
    xt, t = latents_and_t()
    cond = full.encode_prompts(PROMPTS)  # as a cache would hold it
    assert torch.equal(family.denoise(xt, t, cond), full.denoise(xt, t, cond))
    with pytest.raises(RuntimeError, match="load_encoders=False"):
        family.generate(["cat"], [0], steps=1)


def test_sd_encode_prompts(sd15):
    cond = sd15.encode_prompts(PROMPTS)
    assert list(cond) == ["prompt_embeds"] and cond["prompt_embeds"].shape == (2, 77, 32)


def test_sdxl_encode_prompts_concatenates_penultimate_states(sdxl):
    cond = sdxl.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77, 64)  # 32 + 32 from the two encoders
    assert cond["pooled_prompt_embeds"].shape == (2, 32)
    pipe = sdxl.pipe
    with torch.no_grad():
        states = []
        for tokenizer, encoder in [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]:
            ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
        pooled = out.text_embeds  # encoder 2's projection
    torch.testing.assert_close(cond["prompt_embeds"], torch.cat(states, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


def test_sdxl_denoise_equals_unet_with_pipeline_time_ids(sdxl):
    xt, t = latents_and_t(h=8, w=6)  # target size 64 x 48 px
    cond = sdxl.encode_prompts(PROMPTS)
    cond["size_info"] = torch.tensor([[512, 384, 16, 8], [64, 48, 0, 0]])
    pipe = sdxl.pipe
    time_ids = torch.cat(
        [
            pipe._get_add_time_ids((h, w), (top, left), (64, 48), torch.float32, 32)
            for h, w, top, left in cond["size_info"].tolist()
        ]
    )  # (2, 6)
    with torch.no_grad():
        expected = pipe.unet(
            xt,
            t,
            encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids},
        ).sample
        got = sdxl.denoise(xt, t, cond)
        # without size_info: original size = target size, crop (0, 0), as at generation time
        del cond["size_info"]
        default = sdxl.denoise(xt, t, cond)
        cond["size_info"] = torch.tensor([[64, 48, 0, 0]] * 2)
        explicit = sdxl.denoise(xt, t, cond)
    assert torch.equal(got, expected)
    assert torch.equal(default, explicit)
    assert not torch.equal(got[0], explicit[0])  # the size conditioning matters


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_encode_decode_shapes(name, request):
    family = request.getfixturevalue(name)
    images = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = family.encode_images(images, batch_size=2)
    assert x0.shape == (3, 4, 8, 6) and x0.dtype == torch.float32
    with torch.no_grad():
        mean = family.pipe.vae.encode(images).latent_dist.mean * family.pipe.vae.config.scaling_factor
    torch.testing.assert_close(x0, mean)
    decoded = family.decode(x0)
    assert decoded.shape == (3, 3, 64, 48) and decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_generate_deterministic_per_seed(name, request):
    family = request.getfixturevalue(name)
    images = family.generate(PROMPTS, [1, 2], steps=2, guidance=3.0, height=48, width=64)
    assert [im.size for im in images] == [(64, 48)] * 2
    repeat = family.generate(PROMPTS, [1, 2], steps=2, guidance=3.0, height=48, width=64)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, repeat))
    # alone, the same seed gives the same image (up to batch-size-dependent float rounding on CPU)
    alone = family.generate(PROMPTS[:1], [1], steps=2, guidance=3.0, height=48, width=64)
    diff = np.abs(np.asarray(images[0], dtype=int) - np.asarray(alone[0], dtype=int))
    assert diff.max() <= 1
    other = family.generate(PROMPTS[:1], [3], steps=2, guidance=3.0, height=48, width=64)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))
    assert family.generate(["dog"], [0], steps=1)[0].size == (64, 64)  # native resolution by default


def test_missing_component_one_line_error(tmp_path):
    folder = tmp_path / "sd15"
    shutil.copytree(TINY / "sd15", folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError) as err:
        load_family(str(folder))
    assert "text_encoder" in str(err.value) and str(folder) in str(err.value) and "\n" not in str(err.value)
    assert load_family(str(folder), load_encoders=False).pipe.text_encoder is None  # not needed without encoders
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError) as err:
        load_family(str(folder), load_encoders=False)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("load", [load_family, SDXLFamily.load])
def test_offline_hub_id_fails_fast(load):
    start = time.perf_counter()
    with pytest.raises(OSError) as err:  # FileNotFoundError from detection is an OSError too
        load("diffalign-test/no-such-model")
    assert "diffalign-test/no-such-model" in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 10


def test_low_precision_keeps_vae_fp32():
    family = load_family(str(TINY / "sd15"), dtype=torch.bfloat16)
    assert family.pipe.unet.dtype == torch.bfloat16 and family.pipe.vae.dtype == torch.float32
    x0 = family.encode_images(torch.zeros(1, 3, 64, 64))
    assert x0.dtype == torch.float32
    cond = family.encode_prompts(["cat"])
    assert family.denoise(x0, torch.tensor([5]), cond).dtype == torch.bfloat16
    assert family.generate(["cat"], [0], steps=1)[0].size == (64, 64)


def test_gradient_checkpointing_and_attention_backends(sd15):
    xt, t = latents_and_t()
    cond = sd15.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = sd15.denoise(xt, t, cond)
    sd15.use_attention("sdpa")
    sd15.enable_gradient_checkpointing()
    try:
        with torch.no_grad():
            assert torch.equal(sd15.denoise(xt, t, cond), before)
        with pytest.raises(DiffalignError, match="xformers"):
            sd15.use_attention("xformers")  # needs the package and a CUDA device: one line naming what is missing
        with pytest.raises(ValueError, match="unknown attention backend"):
            sd15.use_attention("flash")
    finally:
        sd15.denoiser.disable_gradient_checkpointing()


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_train_xformers_without_the_package_is_a_one_line_error(tmp_path, capsys):
    from diffalign.pipelines.cli import main

    args = ["train", str(REPO / "configs/tiny/sd15_dpo.yaml"), f"model.path={TINY / 'sd15'}", "train.xformers=true"]
    assert main([*args, "train.max_steps=1", f"train.output_dir={tmp_path / 'run'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # progress bars aside
    assert len(errors) == 1 and "xformers package" in errors[0] and "xformers=false" in errors[0]


def test_families_share_one_base():
    """The methods that were copied in five files live once, in Family; the toy (pixel space) overrides its own."""
    from diffalign.models import FAMILIES
    from diffalign.models.base import Family

    shared = ("to", "enable_gradient_checkpointing", "use_attention", "encode_images", "decode")
    for name, cls in FAMILIES.items():
        assert issubclass(cls, Family)
        own = {m for m in shared if m in vars(cls)}
        # Qwen-Image: a 3-D VAE with per-channel statistics; FLUX.2: 2x2-patchified, batch-norm-normalised latents
        # Wan: AutoencoderKLWan's video latents with per-channel latents_mean / latents_std
        vae = {"encode_images", "decode"} if name in ("qwenimage", "flux2", "wan") else set()
        assert own == ({"to", "encode_images", "decode"} if name == "toy" else vae), name


def test_separate_vae_path_loads_in_model_dtype():
    family = load_family(str(TINY / "sd15"), dtype=torch.bfloat16, vae_path=str(TINY / "sdxl" / "vae"))
    assert family.pipe.vae.dtype == torch.bfloat16  # e.g. the fp16-fix SDXL VAE runs in the model dtype
    assert family.encode_images(torch.zeros(1, 3, 64, 64)).dtype == torch.float32
