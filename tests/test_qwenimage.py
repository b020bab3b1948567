"""Qwen-Image on the tiny real QwenImagePipeline in assets/tiny/qwenimage: detection, the template prompt encoding
(34-token drop, padding and its mask), packed denoise vs the transformer called as the pipeline calls it, the
per-channel VAE normalisation, the resolution-dependent shift and terminal stretch, true CFG with the norm rescale,
sampling == the pipeline's, offline objectives through the estimator, DPO through the CLI and its LoRA in plain
diffusers, GRPO and NFT rounds through the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps
from lora_factory import assert_reads_back, export_kohya, random_lora
from safetensors import safe_open

from diffalign.inversion import XT_SOURCES
from diffalign.likelihood import denoising_errors, pair_noise, pair_timesteps
from diffalign.lora import add_lora, load_lora, reference_mode
from diffalign.models import load_family
from diffalign.models.qwenimage import QwenImageFamily
from diffalign.objectives import OBJECTIVES
from diffalign.sampling import initial_noise
from diffalign.sampling.flow_sde import FlowSDESampler, sample_flow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny" / "qwenimage"
PROMPTS = ["a photo of a cat", "red dog"]


@pytest.fixture(scope="module")
def qwen():
    return load_family(str(TINY))


def plain_pipe():
    pipe = QwenImagePipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(fam, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([20, 600]), fam.encode_prompts(PROMPTS)


def test_detection_attributes_and_template_prompt_encoding(qwen):
    assert isinstance(qwen, QwenImageFamily) and qwen.name == "qwenimage" and qwen.prediction_type == "flow"
    assert (qwen.resolution, qwen.latent_channels, qwen.vae_scale_factor) == (64, 16, 8)
    assert qwen.lora_prefix == "transformer" and qwen.denoiser is qwen.pipe.transformer
    pipe, drop = qwen.pipe, qwen.pipe.prompt_template_encode_start_idx
    system = pipe.prompt_template_encode.split("{}")[0]
    assert drop == 34 and len(pipe.tokenizer(system).input_ids) == drop  # the drop removes exactly the system turn
    cond = qwen.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 512, 32) and cond["prompt_embeds_mask"].dtype == torch.long
    for i, prompt in enumerate(PROMPTS):  # each prompt alone, by hand: template, Qwen2.5-VL, last layer, minus 34
        ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt), return_tensors="pt").input_ids
        with torch.no_grad():
            states = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, drop:]
        n = len(states)
        assert int(cond["prompt_embeds_mask"][i].sum()) == n and bool(cond["prompt_embeds_mask"][i, :n].all())
        torch.testing.assert_close(cond["prompt_embeds"][i, :n], states, rtol=0, atol=1e-5)
        assert not cond["prompt_embeds"][i, n:].any()  # zero padding, mask 0


@pytest.mark.parametrize("resolution", [64, 1024])
def test_training_sigma_is_the_static_shift_of_the_pipelines_mu(resolution):
    fam = load_family(str(TINY), load_encoders=False)
    fam.set_resolution(resolution)
    tokens = (resolution // 16) ** 2
    mu = 0.5 + (tokens - 256) * (0.9 - 0.5) / (8192 - 256)  # Qwen-Image's calculate_shift line
    assert fam.mu == pytest.approx(mu) and (resolution != 1024 or round(math.exp(mu), 2) == 2.0)
    t = torch.tensor([0, 249, 499, 999])
    u = (t + 1).double() / 1000  # the unshifted grid
    expected = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # the exponential time shift at mu
    torch.testing.assert_close(fam.schedule.sigma(t).double(), expected, rtol=1e-6, atol=1e-6)


def test_flow_scheduler_is_the_pipelines_grid_with_its_terminal_stretch(qwen):
    steps = 4
    pipe = plain_pipe()
    tokens = (64 // 16) ** 2
    timesteps, _ = retrieve_timesteps(
        pipe.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=qwen.mu
    )  # as QwenImagePipeline.__call__ at 64 px: 16 tokens
    assert qwen.train_tokens == tokens
    ours = qwen.flow_scheduler(steps)
    assert torch.equal(ours.timesteps, timesteps) and torch.equal(ours.sigmas, pipe.scheduler.sigmas)
    assert ours.sigmas[-2].item() == pytest.approx(0.02)  # shift_terminal: the last sigma before 0


def test_denoise_is_the_transformer_on_packed_latents_as_the_pipeline_calls_it(qwen):
    xt, t, cond = inputs(qwen)
    embeds, mask = qwen.pipe.encode_prompt(PROMPTS, max_sequence_length=512)  # the pipeline: padded to the longest
    assert mask is not None and embeds.shape[1] == int(cond["prompt_embeds_mask"].sum(1).max())
    packed = xt.view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)  # 2x2 patches, row-major
    with torch.no_grad():
        out = qwen.denoiser(
            hidden_states=packed,
            timestep=qwen.schedule.sigma(t),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 4, 4)]] * 2,
        ).sample
        ours = qwen.denoise(xt, t, cond)
        alone = qwen.denoise(xt[1:], t[1:], {k: v[1:] for k, v in cond.items()})  # the shorter prompt, unpadded
    expected = out.view(2, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 8, 8)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, ours[1:], rtol=0, atol=1e-5)  # the batch's padding is masked out
    assert torch.equal(qwen.unpack(qwen.pack(xt), 8, 8), xt)
    with pytest.raises(ValueError, match="set_resolution"):
        qwen.denoise(torch.randn(1, 16, 16, 16), t[:1], {k: v[:1] for k, v in cond.items()})


def test_x0_is_the_one_frame_vae_latent_normalised_per_channel(qwen):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = qwen.pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert not torch.allclose(std, torch.ones_like(std))  # Qwen-Image's statistics, not identity
    with torch.no_grad():
        z = vae.encode(images[:, :, None]).latent_dist.mode()  # (2, 16, 1, 8, 8)
        x0 = qwen.encode_images(images)
        decoded = vae.decode(x0[:, :, None] * std + mean).sample[:, :, 0]
    assert x0.shape == (2, 16, 8, 8)
    torch.testing.assert_close(x0, ((z - mean) / std)[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qwen.decode(x0), decoded.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_true_cfg_rescales_each_token_to_the_conditional_norm(qwen):
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    ours = qwen.cfg(cond, uncond, 4.0)
    comb = qwen.pack(uncond + 4.0 * (cond - uncond))  # the pipeline's l.668-672 on packed tokens
    expected = comb * (qwen.pack(cond).norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(ours, qwen.unpack(expected, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(qwen.pack(ours).norm(dim=-1), qwen.pack(cond).norm(dim=-1))  # per 64-channel token


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_generate_equals_the_pipeline(qwen, guidance):
    kw = dict(num_inference_steps=2, true_cfg_scale=guidance, height=64, width=64)
    negative = [""] * 2 if guidance > 1 else None
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = plain_pipe()(PROMPTS, negative_prompt=negative, generator=generators, **kw).images
    ours = qwen.generate(PROMPTS, [3, 4], steps=2, guidance=guidance)
    for a, b in zip(ours, expected):
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_flow_sampler_at_noise_level_zero_equals_the_qwenimage_pipeline(qwen, guidance):
    """On-line sampling on Qwen-Image: the flow SDE sampler at a = 0 is QwenImagePipeline's own loop (its sigma grid
    with the size's shift and the terminal stretch, true CFG with the norm rescale and negative prompt "")."""
    seeds, steps = [1, 2], 4
    cfg = qwen.sampling_cfg(guidance)
    assert cfg == guidance  # true CFG: the scale is the sampler's
    ours = FlowSDESampler.for_family(qwen, steps, 0.0).sample(qwen, PROMPTS, seeds, cfg, keep_trajectory=False)
    x1 = initial_noise(seeds, (16, 8, 8))
    packed = plain_pipe()(
        PROMPTS, negative_prompt=[""] * 2 if guidance > 1 else None, true_cfg_scale=guidance, num_inference_steps=steps,
        height=64, width=64, latents=qwen.pack(x1), output_type="latent",
    ).images  # fmt: skip
    theirs = qwen.unpack(packed, 8, 8)
    assert theirs.abs().max() > 0.5  # a real sample
    torch.testing.assert_close(ours.x0, theirs, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("name", ["smpo", "inpo"])
def test_inversion_objectives_refuse_the_flow_schedule(qwen, name):
    """SmPO's ReNoise and InPO's DDIM inversion need a DDPM-type schedule: a one-line refusal on Qwen-Image."""
    xt, t, cond = inputs(qwen)
    source = XT_SOURCES[OBJECTIVES[name].xt_source]
    with pytest.raises(ValueError, match="DDPM-type") as err:
        denoising_errors(qwen.denoise, qwen.schedule, xt, cond, t, torch.randn_like(xt), None, source)
    assert "\n" not in str(err.value)


def test_dpo_through_the_cli_then_qwenimage_pipeline_load_lora_weights(tmp_path):
    """configs/tiny/qwenimage_dpo.yaml trains through `diffalign train`; QwenImagePipeline.load_lora_weights reads the
    LoRA and samples what diffalign's own sampler samples with it (true CFG 4, same noise)."""
    pairs = write_parquet(tmp_path / "pairs.parquet", make_rows(8, seed=3))
    run = tmp_path / "run"
    assert (
        main(
            ["train", str(REPO / "configs/tiny/qwenimage_dpo.yaml"), f"data.source={pairs}", f"train.output_dir={run}"]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)
    pipe = plain_pipe()
    x1 = initial_noise([5], (16, 8, 8))
    kw = dict(prompt=PROMPTS[:1], negative_prompt=[""], true_cfg_scale=4.0, num_inference_steps=3, height=64, width=64)
    base = pipe(latents=QwenImagePipeline._pack_latents(x1, 1, 16, 8, 8), output_type="latent", **kw).images
    pipe.load_lora_weights(run / "lora")
    tuned = pipe(latents=QwenImagePipeline._pack_latents(x1, 1, 16, 8, 8), output_type="latent", **kw).images
    assert (base - tuned).abs().max() > 1e-4
    fam = load_family(str(TINY))
    load_lora(fam, run / "lora")
    ours = sample_flow(fam, PROMPTS[:1], [5], steps=3, guidance=4.0)
    torch.testing.assert_close(ours, fam.unpack(tuned, 8, 8), rtol=1e-5, atol=1e-5)


def test_comfyui_export_reads_back_in_qwenimage_pipeline_as_the_diffusers_lora(tmp_path):
    """`diffalign export format=kohya` on a Qwen-Image LoRA writes diffusers' names under ComfyUI's `diffusion_model.`
    with lora_A / lora_B and alpha (diffalign.lora_comfy); QwenImagePipeline.load_lora_weights reads that file into
    the same network as the diffusers-format LoRA: attention, MLPs, modulation and the output projection."""
    fam = load_family(str(TINY))
    random_lora(fam, fam.lora_target_modules + ["img_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "proj_out"])
    lora, comfy, keys, (alpha,) = export_kohya(
        fam, tmp_path, "diffusion_model.transformer_blocks.1.attn.to_add_out.alpha"
    )
    assert {
        "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",
        "diffusion_model.transformer_blocks.0.attn.add_v_proj.lora_B.weight",
        "diffusion_model.transformer_blocks.1.img_mlp.net.0.proj.lora_A.weight",
        "diffusion_model.transformer_blocks.1.img_mod.1.alpha",
        "diffusion_model.proj_out.lora_B.weight",
    } <= keys and float(alpha) == 8.0
    assert len(keys) == 3 * (2 * 11 + 1)  # (A, B, alpha) x (2 blocks x 11 modules + proj_out)
    assert_reads_back(plain_pipe(), QwenImageFamily, fam, lora, comfy, inputs(fam))


SMALL_LORA = ["lora.rank=4", "lora.alpha=4"]  # the family's default targets
ONLINE = {  # objective -> (shipped recipe or none, overrides on top of a one-round tiny run, loss at LoRA init)
    "grpo": ("qwenimage_grpo.yaml", ["sampling.sde_window_range=[0,2]", "model.resolution=32"], None),  # not native
    "nft": ("qwenimage_nft.yaml", [], None),
    "dragon": ("", [*SMALL_LORA, "objective.name=dpo", "pairing.split=best_worst", "sampling.eta=0.9"], math.log(2)),
    "d3po": ("", [*SMALL_LORA, "objective.name=d3po", "pairing.split=all_pairs"], math.log(2)),  # shared x_T
    "dro": ("", [*SMALL_LORA, "objective.name=dro", "sampling.guidance=1.0", "online.max_experts=8"], 0.001),
}


@pytest.mark.parametrize("objective", ONLINE)
def test_online_round_on_qwenimage_through_the_cli(tmp_path, monkeypatch, objective):
    """`diffalign online` on the tiny Qwen-Image: the shipped GRPO (SDE window, log-probs, true CFG 4, at a size other
    than the native one) and NFT (ODE rounds, old adapter) recipes, DRAGON's DPO surrogate, D3PO and DRO (toy
    experts): a finite first round, the loss the policy == reference start gives (D3PO / DRAGON ln 2, DRO's hinge
    -m = 0.001 with a zero policy error), and the LoRA saved in Qwen-Image's format."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    recipe, overrides, at_init = ONLINE[objective]
    args = ["online", *([str(REPO / "configs" / recipe)] if recipe else []), f"model.path={TINY}"]
    args += ["model.resolution=0", "sampling.guidance=4.0", *overrides, "online.rounds=1", "sampling.steps=3"]
    args += ["sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.sample_batch=4"]
    args += ["train.steps_per_round=1", "train.batch_size=2", "train.grad_accum=1", f"sampling.prompts={prompts}"]
    args += ["reward.scorer=toy_aesthetic", "reward.args={}", "reward.monitor=[]", "train.tensorboard=false"]
    assert main([*args, "eval.prompts=", "guards.every=0", f"train.output_dir={out}"]) == 0
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train/loss"]) and row["skipped_steps"] == 0
    if at_init is not None:
        assert math.isclose(row["train/loss"], at_init, rel_tol=1e-4)
    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
        assert any(".img_mlp.net.0.proj." in k for k in keys) == bool(recipe)  # the recipes' MLP targets


def test_int8_quantized_base_trains_a_lora_and_adapters_off_is_the_quantized_base():
    pytest.importorskip("torchao", reason="the int8 backend is the optional extra diffalign[quantize]")
    fam = load_family(str(TINY), dtype=torch.bfloat16, quantize="int8")
    assert type(fam.denoiser.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    xt, t, cond = inputs(fam)
    with torch.no_grad():
        base = fam.denoise(xt, t, cond)
    add_lora(fam.denoiser, 4, 8, fam.lora_target_modules)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        with reference_mode(fam.denoiser):
            assert torch.equal(fam.denoise(xt, t, cond), base)
    fam.denoise(xt, t, cond).float().pow(2).mean().backward()
    last = len(fam.denoiser.transformer_blocks) - 1  # its text queries and text output feed nothing downstream
    unused = (f"transformer_blocks.{last}.attn.add_q_proj", f"transformer_blocks.{last}.attn.to_add_out")
    grads = {n: p.grad for n, p in fam.denoiser.named_parameters() if "lora_A" in n and not n.startswith(unused)}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_memory_accounting_builds_the_published_20b_transformer():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import memory

    with torch.device("meta"):
        model = memory.QwenImageTransformer2DModel(**memory.QWEN_IMAGE)
    assert 20.3e9 < sum(p.numel() for p in model.parameters()) < 20.5e9  # Qwen-Image: "20B MMDiT"
