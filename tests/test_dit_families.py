"""SD3 (MMDiT, rectified flow) and PixArt-Σ (DiT, T5, learned sigma) on the tiny real pipelines in assets/tiny:
detection, prompt encoding, denoise vs the diffusers modules, the flow x_t / target against the scheduler's own
`scale_noise`, every pair objective through the estimator, DPO through the CLI, LoRAs in plain diffusers / peft."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from diffusers import FlowMatchEulerDiscreteScheduler, PixArtSigmaPipeline, StableDiffusion3Pipeline
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from PIL import Image
from safetensors import safe_open

from diffalign.inversion import XT_SOURCES
from diffalign.likelihood import Schedule, denoising_errors, pair_noise, pair_timesteps
from diffalign.lora import add_lora, load_lora, load_lora_many, reference_mode, save_lora
from diffalign.models import load_family
from diffalign.models.pixart import PixArtFamily
from diffalign.models.sd3 import SD3Family
from diffalign.objectives import OBJECTIVES
from diffalign.sources import SOURCES
from diffalign.sources.base import ErrorInputs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny"
PROMPTS = ["a photo of a cat", "red dog"]
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def sd3():
    return load_family(str(TINY / "sd3"))


@pytest.fixture(scope="module")
def pixart():
    return load_family(str(TINY / "pixart"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", make_rows(8, seed=3))


def inputs(fam, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, fam.latent_channels, 8, 8, generator=g), torch.tensor([20, 600]), fam.encode_prompts(PROMPTS)


def out(fam, xt, t, cond):
    with torch.no_grad():
        return fam.denoise(xt, t, cond)


def perturb(fam, seed=1):
    """A LoRA with nonzero B, as after training."""
    add_lora(fam.denoiser, RANK, ALPHA, fam.lora_target_modules)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_auto_detection_and_attributes(sd3, pixart):
    assert isinstance(sd3, SD3Family) and isinstance(pixart, PixArtFamily)
    assert (sd3.name, sd3.prediction_type, pixart.name, pixart.prediction_type) == ("sd3", "flow", "pixart", "epsilon")
    assert sd3.lora_prefix == pixart.lora_prefix == "transformer"
    assert {"add_q_proj", "to_add_out", "to_q"} <= set(sd3.lora_target_modules)
    assert (sd3.resolution, sd3.latent_channels, pixart.resolution, pixart.latent_channels) == (64, 16, 64, 4)
    assert sd3.denoiser is sd3.pipe.transformer and pixart.denoiser is pixart.pipe.transformer
    assert type(sd3.scheduler) is FlowMatchEulerDiscreteScheduler and sd3.scheduler is not sd3.pipe.scheduler
    assert sd3.scheduler.config.shift == 3.0
    assert pixart.scheduler.config.beta_schedule == "linear" and pixart.learned_sigma  # out_channels 8 = 2 x 4


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_load_without_encoders_denoises_from_cached_cond(name, request):
    full = request.getfixturevalue(name)
    fam = load_family(str(TINY / name), load_encoders=False)  # training from a latent + text-embedding cache
    encoders = [k for k in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(fam.pipe, k)]
    assert all(getattr(fam.pipe, k) is None for k in encoders)
    assert (fam.resolution, fam.vae_scale_factor, fam.latent_channels) == (64, 8, full.latent_channels)
    xt, t, cond = inputs(full)
    assert torch.equal(out(fam, xt, t, cond), out(full, xt, t, cond))
    with pytest.raises(RuntimeError, match="load_encoders=False"):
        fam.generate(["cat"], [0], steps=1)


def test_sd3_encode_prompts_clip_and_t5_and_without_t5(sd3):
    cond = sd3.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + 256, 64) and cond["pooled_prompt_embeds"].shape == (2, 64)
    pipe = sd3.pipe
    with torch.no_grad():
        states, pooled = [], []
        for tokenizer, encoder in [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]:
            ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            enc = encoder(ids.input_ids, output_hidden_states=True)
            states.append(enc.hidden_states[-2])  # penultimate layer, as SD3
            pooled.append(enc.text_embeds)
        ids = pipe.tokenizer_3(PROMPTS, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
        t5 = pipe.text_encoder_3(ids.input_ids)[0]  # (2, 256, 64)
    clip = torch.cat(states, dim=-1)  # (2, 77, 32 + 32) = joint_attention_dim: no padding needed
    torch.testing.assert_close(cond["prompt_embeds"], torch.cat([clip, t5], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], torch.cat(pooled, dim=-1), rtol=0, atol=0)

    no_t5 = load_family(str(TINY / "sd3"), t5=False)
    assert no_t5.pipe.text_encoder_3 is None and no_t5.pipe.tokenizer_3 is None
    cond2 = no_t5.encode_prompts(PROMPTS)
    assert torch.equal(cond2["prompt_embeds"][:, :77], clip) and not cond2["prompt_embeds"][:, 77:].any()
    assert torch.equal(cond2["pooled_prompt_embeds"], cond["pooled_prompt_embeds"])
    assert no_t5.generate(["cat"], [0], steps=1)[0].size == (64, 64)


def test_pixart_encode_prompts_t5_with_mask(pixart):
    cond = pixart.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 300, 32) and cond["prompt_attention_mask"].shape == (2, 300)
    assert cond["prompt_attention_mask"].sum(1).tolist() == [6, 3]  # 5 / 2 word pieces + </s>
    ids = pixart.pipe.tokenizer(PROMPTS, padding="max_length", max_length=300, return_tensors="pt")
    with torch.no_grad():
        expected = pixart.pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
    torch.testing.assert_close(cond["prompt_embeds"], expected, rtol=0, atol=0)


def test_sd3_denoise_is_the_transformer_at_the_scheduler_timestep(sd3):
    xt, _, cond = inputs(sd3)
    t = torch.tensor([0, 499, 999])
    xt, cond = xt[[0, 1, 0]], {k: v[[0, 1, 0]] for k, v in cond.items()}
    # the pipeline's own timestep values (descending over 1..1000, shifted); integer t counts up from the clean end
    timesteps = FlowMatchEulerDiscreteScheduler.from_config(sd3.pipe.scheduler.config).timesteps.flip(0)[t]
    # shift 3: sigma = 3u / (1 + 2u), u = (t + 1) / 1000 -> u = 0.5 gives 0.75; t = 999 is pure noise
    torch.testing.assert_close(timesteps, torch.tensor([3 / 1.002, 750.0, 1000.0]), rtol=1e-6, atol=1e-4)
    with torch.no_grad():
        expected = sd3.denoiser(
            hidden_states=xt,
            timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
        ).sample
    assert torch.equal(out(sd3, xt, t, cond), expected)


def test_flow_xt_and_target_match_the_schedulers_scale_noise(sd3):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    t = torch.tensor([0, 250, 999])
    reference = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    expected = reference.scale_noise(x0, reference.timesteps.flip(0)[t], eps)  # sigma eps + (1 - sigma) x0
    used = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    used.set_timesteps(4)  # the estimator reads a fresh training table, whatever was done to the scheduler
    schedule = Schedule(used, "flow")
    assert torch.equal(schedule.add_noise(x0, eps, t), expected)
    assert torch.equal(schedule.target(x0, eps, t), eps - x0)
    assert schedule.sigma(torch.tensor([499])).item() == 0.75  # the shift matters: unshifted would be 0.499
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        Schedule(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "flow").sigma(t)


def test_pixart_denoise_keeps_the_eps_half(pixart):
    xt, t, cond = inputs(pixart)
    with torch.no_grad():
        full = pixart.denoiser(
            xt,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
    assert full.shape == (2, 8, 8, 8)
    assert torch.equal(out(pixart, xt, t, cond), full[:, :4])


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_every_objective_runs_through_the_estimator(name):
    fam = load_family(str(TINY / name))
    add_lora(fam.denoiser, RANK, ALPHA, fam.lora_target_modules)  # B = 0: policy == reference
    x0 = fam.encode_images(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)  # [w; l]
    cond = {k: torch.cat([v, v]) for k, v in fam.encode_prompts(PROMPTS).items()}  # (B, ...) -> (2B, ...)
    schedule, label = Schedule(fam.scheduler, fam.prediction_type), torch.ones(2)
    g = torch.Generator().manual_seed(1)
    t, eps = pair_timesteps(2, schedule.num_train_timesteps, g, distribution="logit_normal"), pair_noise(x0, g)
    for key, cls in OBJECTIVES.items():
        objective = cls()
        if SOURCES[cls.sources[0]].inputs_type is not ErrorInputs:  # trajectories, predictions, groups: own tests
            continue
        reference = (lambda: reference_mode(fam.denoiser)) if objective.needs_reference else None
        args = (fam.denoise, schedule, x0, cond, t, eps, reference, XT_SOURCES[objective.xt_source])
        if fam.prediction_type == "flow" and objective.xt_source != "noise":
            with pytest.raises(ValueError, match="DDPM-type"):  # DDIM / ReNoise inversion need a DDPM schedule
                denoising_errors(*args)
            continue
        errors = denoising_errors(*args)
        loss, _ = objective(**ErrorInputs(errors.err, errors.ref_err, label).for_objective(cls))  # by name
        assert loss.shape[0] in (2, 4) and torch.isfinite(loss).all(), key
        if key == "dpo":
            torch.testing.assert_close(loss, torch.full((2,), math.log(2)))


def plain_pipe(name):
    cls = {"sd3": StableDiffusion3Pipeline, "pixart": PixArtSigmaPipeline}[name]
    pipe = cls.from_pretrained(TINY / name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_in_plain(name, pipe, lora_dir):
    """Plain diffusers for SD3; for PixArt (no diffusers LoRA loader) plain peft with the file's adapter config."""
    if name == "sd3":
        pipe.load_lora_weights(lora_dir)
        return
    file = str(Path(lora_dir) / "pytorch_lora_weights.safetensors")
    with safe_open(file, framework="pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
        weights = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    config = LoraConfig(**{k.removeprefix("transformer."): v for k, v in packed.items()})
    inject_adapter_in_model(config, pipe.transformer)
    set_peft_model_state_dict(pipe.transformer, weights)


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_dpo_through_the_cli_then_plain_loading_and_generation(name, pairs_file, tmp_path):
    run = tmp_path / "run"
    args = [f"data.source={pairs_file}", f"train.output_dir={run}"]
    assert main(["train", str(REPO / f"configs/tiny/{name}_dpo.yaml"), *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)  # policy == reference at LoRA init
    assert rows[-1]["loss"] != rows[0]["loss"]

    pipe = plain_pipe(name)
    kw = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np")
    kw.update(dict(use_resolution_binning=False, clean_caption=False) if name == "pixart" else {})
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    load_in_plain(name, pipe, run / "lora")
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(base - tuned).max() > 1e-4  # the trained LoRA changes the outputs
    fam = load_family(str(TINY / name))  # diffalign's loader gives the same network, alpha (8 != rank 4) included
    load_lora(fam, run / "lora")
    xt, t, cond = inputs(fam)
    plain = type(fam)(pipe, pipe.vae.config, torch.float32)
    torch.testing.assert_close(out(fam, xt, t, cond), out(plain, xt, t, cond), rtol=0, atol=1e-6)

    images = {}
    for scale in (0.0, 1.0):
        gen = tmp_path / f"gen{scale}"
        common = [f"model.path={TINY / name}", "prompt=a photo of a cat", "steps=2", f"output_dir={gen}"]
        assert main(["generate", *common, f"loras=[{run / 'lora'}:{scale}]"]) == 0
        images[scale] = np.asarray(Image.open(gen / "00000.png"), dtype=float)
    assert np.abs(images[0.0] - images[1.0]).max() > 0


@pytest.mark.parametrize("name", ["sd3", "pixart"])
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_save_load_several_loras_scales_and_fuse(name, request, tmp_path):
    fam = request.getfixturevalue(name)
    xt, t, cond = inputs(fam)
    loras = []
    for seed in (1, 2):
        trainer = load_family(str(TINY / name))
        perturb(trainer, seed)
        loras.append(save_lora(trainer, tmp_path / str(seed)).parent)
        if seed == 1:
            only_a = out(trainer, xt, t, cond)
    with safe_open(str(loras[0] / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    fresh = load_family(str(TINY / name))
    load_lora_many(fresh, [(loras[0], 1.0), (loras[1], 0.0)])
    assert torch.equal(out(fresh, xt, t, cond), only_a)  # scale 0 adds nothing; alpha survived the file
    fresh = load_family(str(TINY / name))
    load_lora_many(fresh, [(loras[0], 1.0), (loras[1], 0.5)])
    unfused = out(fresh, xt, t, cond)
    assert not torch.allclose(unfused, only_a)
    fresh = load_family(str(TINY / name))
    load_lora_many(fresh, [(loras[0], 1.0), (loras[1], 0.5)], fuse=True)
    assert not getattr(fresh.denoiser, "peft_config", None)
    torch.testing.assert_close(out(fresh, xt, t, cond), unfused, rtol=1e-4, atol=1e-5)


def test_max_sequence_length_sets_the_t5_tokens_and_the_clip_families_refuse_it():
    """model.max_sequence_length: the T5 length of the prompt encoding (Flow-GRPO's SD3 recipe: 128), default the
    pipeline's own; a family without T5 refuses it in one line."""
    from diffalign.config import ModelConfig
    from diffalign.engine.common import load_model
    from diffalign.errors import DiffalignError

    sd3 = load_model(ModelConfig(path=str(TINY / "sd3")))
    default = sd3.encode_prompts(["a red circle"])["prompt_embeds"].shape[1]  # CLIP 77 + T5 256
    short = load_model(ModelConfig(path=str(TINY / "sd3"), max_sequence_length=16))
    assert (
        short.max_sequence_length == 16
        and default - 256 + 16 == short.encode_prompts(["a red circle"])["prompt_embeds"].shape[1]
    )
    with pytest.raises(DiffalignError, match="model.max_sequence_length: family 'sd' has no T5 encoder") as err:
        load_model(ModelConfig(path=str(TINY / "sd15"), max_sequence_length=16))
    assert "\n" not in str(err.value)
