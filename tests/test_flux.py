"""FLUX.1 on the tiny real FluxPipeline in assets/tiny/flux: detection, prompt encoding, packed denoise vs the
transformer called as the pipeline calls it, the resolution-dependent shift, sampling == the pipeline's, offline
objectives training through the estimator, DPO through the CLI, the LoRA in plain diffusers, the shipped config."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors import safe_open

from diffalign.likelihood import denoising_errors, pair_noise, pair_timesteps
from diffalign.lora import LoraError, add_lora, load_lora, reference_mode, save_lora
from diffalign.models import load_family
from diffalign.models.flux import FluxFamily
from diffalign.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny" / "flux"
PROMPTS = ["a photo of a cat", "red dog"]


@pytest.fixture(scope="module")
def flux():
    return load_family(str(TINY))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", make_rows(8, seed=3))


def plain_pipe():
    pipe = FluxPipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(fam, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([20, 600]), fam.encode_prompts(PROMPTS)


def test_detection_attributes_and_prompt_encoding(flux):
    assert isinstance(flux, FluxFamily) and flux.name == "flux" and flux.prediction_type == "flow"
    assert (flux.resolution, flux.latent_channels, flux.vae_scale_factor, flux.guidance_embeds) == (64, 16, 8, True)
    assert flux.lora_prefix == "transformer" and flux.denoiser is flux.pipe.transformer
    cond = flux.encode_prompts(PROMPTS)
    pipe = flux.pipe
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = pipe.text_encoder(ids.input_ids).pooler_output  # CLIP-L pooled
        ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        t5 = pipe.text_encoder_2(ids.input_ids)[0]  # T5 sequence
    assert cond["prompt_embeds"].shape == (2, 512, 64) and cond["pooled_prompt_embeds"].shape == (2, 32)
    torch.testing.assert_close(cond["prompt_embeds"], t5, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


@pytest.mark.parametrize("resolution", [64, 1024])
def test_training_sigma_is_the_pipelines_dynamically_shifted_sigma(flux, resolution):
    fam = load_family(str(TINY), load_encoders=False)
    fam.set_resolution(resolution)
    tokens = (resolution // 16) ** 2
    config = fam.pipe.scheduler.config
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(1.15 if resolution == 1024 else 0.5 + (tokens - 256) * 0.65 / 3840)
    t = torch.tensor([0, 249, 499, 999])
    u = (t + 1).double() / 1000  # the unshifted grid
    # the pipeline's exponential time shift at mu (FlowMatchEulerDiscreteScheduler.time_shift)
    expected = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    torch.testing.assert_close(fam.schedule.sigma(t).double(), expected, rtol=1e-6, atol=1e-6)
    assert config.use_dynamic_shifting and not fam.scheduler.config.use_dynamic_shifting


def test_denoise_is_the_transformer_on_packed_latents_as_the_pipeline_calls_it(flux):
    xt, t, cond = inputs(flux)
    sigma = flux.schedule.sigma(t)
    packed = xt.view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)  # 2x2 patches, row-major
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=1)  # (0, row, column)
    with torch.no_grad():
        out = flux.denoiser(
            hidden_states=packed,
            timestep=sigma,
            guidance=torch.full((2,), 1.0),
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(512, 3),
            img_ids=img_ids,
        ).sample
        ours = flux.denoise(xt, t, cond)
    expected = out.view(2, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 8, 8)
    assert torch.equal(ours, expected)
    assert torch.equal(flux.unpack(flux.pack(xt), 8, 8), xt)
    with pytest.raises(ValueError, match="set_resolution"):
        flux.denoise(torch.randn(1, 16, 16, 16), t[:1], {k: v[:1] for k, v in cond.items()})


def test_generate_equals_the_pipeline(flux):
    kw = dict(num_inference_steps=2, guidance_scale=3.5, height=64, width=64)
    expected = plain_pipe()(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw).images
    ours = flux.generate(PROMPTS, [3, 4], steps=2, guidance=3.5)
    for a, b in zip(ours, expected):
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    x0 = flux.sample_latents(PROMPTS[:1], [3], steps=2, guidance=3.5)
    assert x0.shape == (1, 16, 8, 8)


@pytest.mark.parametrize("name", ["dpo", "kto", "mapo", "sft"])
def test_offline_objectives_train_a_few_steps(name):
    fam = load_family(str(TINY))
    params = add_lora(fam.denoiser, 4, 8, fam.lora_target_modules)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x0 = fam.encode_images(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)  # [w; l]
    cond = {k: torch.cat([v, v]) for k, v in fam.encode_prompts(PROMPTS).items()}
    objective = OBJECTIVES[name]()
    reference = (lambda: reference_mode(fam.denoiser)) if objective.needs_reference else None
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        t, eps = pair_timesteps(2, 1000, g, distribution="logit_normal"), pair_noise(x0, g)
        errors = denoising_errors(fam.denoise, fam.schedule, x0, cond, t, eps, reference)
        loss, _ = objective(errors.err, errors.ref_err, torch.ones(2))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(loss.mean().item())
    assert all(math.isfinite(v) for v in losses)
    if name == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at LoRA init
    assert any(p.abs().sum() > 0 for n, p in fam.denoiser.named_parameters() if "lora_B" in n)  # it trained


def test_dpo_through_the_cli_then_flux_pipeline_load_lora_weights(pairs_file, tmp_path):
    run = tmp_path / "run"
    args = [f"data.source={pairs_file}", f"train.output_dir={run}"]
    assert main(["train", str(REPO / "configs/tiny/flux_dpo.yaml"), *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)
    pipe = plain_pipe()
    kw = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(run / "lora")
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(base - tuned).max() > 1e-4
    fam = load_family(str(TINY))  # diffalign's loader gives the same network (alpha 8 != rank 4 included)
    load_lora(fam, run / "lora")
    xt, t, cond = inputs(fam)
    plain = FluxFamily(pipe, pipe.vae.config, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fam.denoise(xt, t, cond), plain.denoise(xt, t, cond), rtol=0, atol=1e-6)


def test_shipped_flux_dpo_config_runs_one_step_on_the_tiny_pipeline(pairs_file, tmp_path):
    run = tmp_path / "run"
    overrides = [
        f"model.path={TINY}",
        "model.resolution=64",
        f"data.source={pairs_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={run}",
        "train.max_steps=1",
        "train.grad_accum=1",
        "train.validate_every=0",
        "train.checkpoint_every=0",
    ]
    assert main(["train", str(REPO / "configs/flux_dpo.yaml"), *overrides]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()  # bf16 base + checkpointing, as shipped


def trained_lora(tmp_path, targets=None, seed=1):
    """A saved FLUX LoRA (rank 4, alpha 8) with nonzero B, as after training."""
    fam = load_family(str(TINY))
    add_lora(fam.denoiser, 4, 8, targets or fam.lora_target_modules)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_lora(fam, tmp_path / "lora").parent


def outputs_with(lora):
    fam = load_family(str(TINY))
    load_lora(fam, lora)
    xt, t, cond = inputs(fam)
    with torch.no_grad():
        return fam.denoise(xt, t, cond)


def test_kohya_export_bfl_names_round_trip_and_direct_loading(tmp_path):
    lora = trained_lora(tmp_path)
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back"
    assert main(["export", f"src={lora}", f"out={kohya}", "format=kohya"]) == 0
    with safe_open(str(kohya), framework="pt") as f:
        keys = set(f.keys())
        qkv = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
        linear1 = f.get_tensor("lora_unet_single_blocks_0_linear1.lora_down.weight")
        alpha = f.get_tensor("lora_unet_single_blocks_0_linear1.alpha")
    assert {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_0_txt_attn_qkv.alpha",
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight",
        "lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight",
    } <= keys
    assert all(k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for k in keys)
    assert qkv.shape == (3 * 32, 3 * 4)  # block-diagonal up of the fused q, k, v (inner 32, rank 4 each)
    assert linear1.shape == (4 * 4, 32) and float(alpha) == 4 * 8  # q, k, v + zero proj_mlp; alpha / rank kept
    assert main(["export", f"src={kohya}", f"out={back}", "format=diffusers"]) == 0
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), framework="pt") as a:
        with safe_open(str(back / "pytorch_lora_weights.safetensors"), framework="pt") as b:
            assert set(a.keys()) == set(b.keys())  # the zero proj_mlp block is dropped again
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    expected = outputs_with(lora)
    assert torch.equal(outputs_with(back), expected)
    torch.testing.assert_close(outputs_with(kohya), expected, rtol=0, atol=1e-6)  # diffalign reads kohya directly


def test_kohya_file_reads_in_diffusers_own_flux_converter(tmp_path):
    """diffusers' kohya FLUX reader (what `load_lora_weights` uses for ComfyUI / kohya files) gives the same network.
    Double blocks only: that reader hard-codes FLUX.1's single-block widths (3072 / 12288) for linear1."""
    targets = [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "add_q_proj", "to_add_out")]
    lora = trained_lora(tmp_path, targets)
    kohya = tmp_path / "k.safetensors"
    assert main(["export", f"src={lora}", f"out={kohya}", "format=kohya"]) == 0
    pipe = plain_pipe()
    pipe.load_lora_weights(str(kohya))
    plain = FluxFamily(pipe, pipe.vae.config, torch.float32)
    xt, t, cond = inputs(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.denoise(xt, t, cond), outputs_with(lora), rtol=0, atol=1e-5)


def test_flux_lora_on_sdxl_and_sdxl_lora_on_flux_name_both(tmp_path):
    flux_lora = trained_lora(tmp_path / "f")
    sdxl = load_family(str(REPO / "assets/tiny/sdxl"))
    with pytest.raises(LoraError, match=r"a flux LoRA cannot load onto a sdxl base model"):
        load_lora(sdxl, flux_lora)
    add_lora(sdxl.denoiser, 4, 4, sdxl.lora_target_modules)
    sdxl_lora = save_lora(sdxl, tmp_path / "s").parent
    with pytest.raises(LoraError, match=r"a sd/sdxl LoRA cannot load onto a flux base model") as err:
        load_lora(load_family(str(TINY)), sdxl_lora)
    assert "\n" not in str(err.value)


def test_flow_sampler_at_noise_level_zero_equals_the_flux_pipeline(flux):
    """On-line sampling on FLUX: the flow SDE sampler at a = 0 is FluxPipeline's own loop (its sigma grid, the
    size's shift, guidance as the transformer's input, no true CFG: `sampling_cfg` gives 1)."""
    from diffalign.sampling import initial_noise
    from diffalign.sampling.flow_sde import FlowSDESampler

    seeds, steps = [1, 2], 4
    cfg = flux.sampling_cfg(3.5)
    assert cfg == 1.0 and flux.train_guidance == 3.5
    ours = FlowSDESampler.for_family(flux, steps, 0.0).sample(flux, PROMPTS, seeds, cfg, keep_trajectory=False)
    x1 = initial_noise(seeds, (16, 8, 8))
    packed = plain_pipe()(
        PROMPTS, num_inference_steps=steps, guidance_scale=3.5, height=64, width=64, latents=flux.pack(x1),
        output_type="latent",
    ).images  # fmt: skip
    theirs = flux.unpack(packed, 8, 8)
    assert theirs.abs().max() > 0.5  # a real sample
    torch.testing.assert_close(ours.x0, theirs, rtol=1e-5, atol=1e-5)
    flux.train_guidance = 1.0  # the module-scoped family's offline default, for the tests after this one


ONLINE_FLUX = {  # objective -> its overrides on top of a one-round tiny run
    "nft": [
        "objective.name=nft",
        "sampling.eta=0",
        "sampling.shared_noise=false",
    ],  # the old adapter samples by the ODE
    "dragon": [
        "objective.name=dpo",
        "pairing.split=best_worst",
        "sampling.eta=0.9",
    ],  # DRAGON's Diffusion-DPO surrogate
}


@pytest.mark.parametrize("objective", ["grpo", *ONLINE_FLUX])
def test_online_round_on_flux_through_the_cli(tmp_path, monkeypatch, objective):
    """`diffalign online` on the tiny FLUX pipeline (FLUX.1-dev style: guidance as an input, no true CFG): GRPO from
    configs/flux_grpo.yaml (SDE sampling with log-probs), NFT and DRAGON; a finite first round and the LoRA saved in
    FLUX's format. GRPO samples at 32 px, below the tiny's native 64: the round samples at the size the shift was
    set for (denoise refuses any other)."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    config = [str(REPO / "configs" / "flux_grpo.yaml")] if objective == "grpo" else ["lora.rank=4", "lora.alpha=4"]
    size = 32 if objective == "grpo" else 0
    args = ["online", *config, f"model.path={TINY}", f"model.resolution={size}", *ONLINE_FLUX.get(objective, [])]
    args += ["online.rounds=1", "sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=3"]
    args += ["sampling.sample_batch=4", "train.steps_per_round=1", "train.batch_size=2", "train.grad_accum=1"]
    args += [f"sampling.prompts={prompts}", "reward.scorer=toy_aesthetic", "reward.args={}", "reward.monitor=[]"]
    args += [
        "sampling.guidance=3.5",
        "train.tensorboard=false",
        "eval.prompts=",
        "guards.every=0",
        f"train.output_dir={out}",
    ]
    assert main(args) == 0
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train/loss"]) and row["skipped_steps"] == 0
    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("transformer.") for k in f.keys())
