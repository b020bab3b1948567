"""FLUX.2 on the tiny real pipeline folders in assets/tiny (flux2_klein: Klein base, true CFG;
flux2_klein_distilled: the same weights with is_distilled; flux2_dev: Flux2Pipeline, guidance input): detection,
prompt encoding, the patchified batch-norm latents, denoise vs the transformer called as the pipeline calls it, the
step-dependent shift, generation and the flow sampler at noise 0 == the pipeline, offline objectives, DPO through
the CLI with the LoRA in plain diffusers, GRPO / NFT rounds (base, distilled, dev)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from lora_factory import export_kohya, random_lora
from safetensors import safe_open

from diffalign.engine.common import check_target_modules
from diffalign.likelihood import denoising_errors, pair_noise, pair_timesteps
from diffalign.lora import add_lora, load_lora, lora_targets, reference_mode
from diffalign.models import load_family
from diffalign.models.flux2 import Flux2Family
from diffalign.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny" / "flux2_klein"
DISTILLED = REPO / "assets" / "tiny" / "flux2_klein_distilled"
DEV = REPO / "assets" / "tiny" / "flux2_dev"
PROMPTS = ["a photo of a cat", "red dog"]


@pytest.fixture(scope="module")
def klein():
    return load_family(str(TINY))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", make_rows(8, seed=3))


def plain_pipe(folder=TINY):
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(fam, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 4, 4, generator=g), torch.tensor([20, 600]), fam.encode_prompts(PROMPTS)


def test_detection_attributes_and_prompt_encoding(klein):
    assert isinstance(klein, Flux2Family) and klein.name == "flux2" and klein.prediction_type == "flow"
    assert (klein.resolution, klein.latent_channels, klein.vae_scale_factor) == (64, 16, 16)  # 4 VAE ch x 2x2
    assert (klein.klein, klein.distilled, klein.guidance_embeds, klein.default_steps) == (True, False, False, 50)
    assert klein.lora_writer is Flux2KleinPipeline and klein.denoiser is klein.pipe.transformer
    assert klein.shard_blocks == ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")  # FSDP2 units
    assert lora_targets(klein, "attention") == ["to_q", "to_k", "to_v", "to_out.0"] + [
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"
    ]  # fmt: skip
    check_target_modules(klein, lora_targets(klein, "attention+mlp"))  # every default target names a Linear
    distilled = load_family(str(DISTILLED), load_encoders=False)
    assert (distilled.distilled, distilled.default_steps, distilled.pipe.vae) == (True, 4, None)
    cond = klein.encode_prompts(PROMPTS)
    pipe = klein.pipe
    rows = []
    with torch.no_grad():
        for p in PROMPTS:  # Qwen3 chat template without thinking, padded to 512, hidden states 9, 18, 27 stacked
            text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            ids = pipe.tokenizer(text, padding="max_length", max_length=512, return_tensors="pt")
            hidden = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states
            rows.append(torch.cat([hidden[9], hidden[18], hidden[27]], dim=-1))
    assert cond["prompt_embeds"].shape == (2, 512, 48)
    torch.testing.assert_close(cond["prompt_embeds"], torch.cat(rows), rtol=0, atol=0)


def test_latents_are_patchified_and_batch_norm_normalised(klein):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = klein.encode_images(images)
    with torch.no_grad():
        theirs = klein.pipe._encode_vae_image(images, generator=None)  # the pipeline's reference-image latents
        z = klein.pipe.vae.encode(images).latent_dist.mode()  # (2, 4, 8, 8)
    torch.testing.assert_close(x0, theirs, rtol=0, atol=0)
    bn = klein.pipe.vae.bn
    patch = z[:, 1:2, 2:4, 6:8].reshape(2, 4)  # channel 1's 2x2 patch at x0 cell (1, 3) -> x0 channels 4..7
    mean, var = bn.running_mean[4:8], bn.running_var[4:8]
    torch.testing.assert_close(x0[:, 4:8, 1, 3], (patch - mean) / torch.sqrt(var + 1e-4), rtol=1e-5, atol=1e-6)
    assert bn.running_mean.abs().max() > 0.1  # the tiny VAE's statistics are not the identity
    torch.testing.assert_close(klein.raw_latents(x0), z, rtol=1e-5, atol=1e-5)
    assert klein.decode(x0).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("resolution", [64, 1024])
def test_training_sigma_is_the_pipelines_shift_at_the_variants_step_count(resolution):
    fam = load_family(str(TINY), load_encoders=False)
    fam.set_resolution(resolution)
    tokens = (resolution // 16) ** 2
    mu = compute_empirical_mu(tokens, 50)
    if resolution == 1024:  # 4096 tokens: between m_10 and m_200 of the pipeline's fit, at 50 steps
        assert math.exp(mu) == pytest.approx(7.56, abs=0.01)
        assert math.exp(compute_empirical_mu(tokens, 4)) == pytest.approx(9.88, abs=0.01)  # distilled: 4 steps
    t = torch.tensor([0, 249, 499, 999])
    u = (t + 1).double() / 1000  # the unshifted grid
    expected = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # FlowMatchEulerDiscreteScheduler's exponential shift
    torch.testing.assert_close(fam.schedule.sigma(t).double(), expected, rtol=1e-6, atol=1e-6)


def test_flow_scheduler_is_the_pipelines_grid(klein):
    pipe = plain_pipe()
    pipe(prompt=PROMPTS[0], num_inference_steps=3, height=64, width=64, guidance_scale=1.0, output_type="latent")
    ours = klein.flow_scheduler(3)
    torch.testing.assert_close(ours.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(ours.timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)


def test_denoise_is_the_transformer_on_packed_latents_as_the_pipeline_calls_it(klein):
    xt, t, cond = inputs(klein)
    sigma = klein.schedule.sigma(t)
    packed = xt.reshape(2, 16, 16).permute(0, 2, 1)  # (N, C, h, w) -> (N, h w, C), row-major
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack(
        [torch.zeros(16, dtype=torch.long), rows.flatten(), cols.flatten(), torch.zeros(16).long()], 1
    )
    txt_ids = torch.stack([torch.zeros(512).long()] * 3 + [torch.arange(512)], dim=1)  # (0, 0, 0, l)
    with torch.no_grad():
        out = klein.denoiser(
            hidden_states=packed,
            timestep=sigma,
            guidance=None,
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=txt_ids[None].expand(2, -1, -1),
            img_ids=img_ids[None].expand(2, -1, -1),
        ).sample
        ours = klein.denoise(xt, t, cond)
    assert torch.equal(ours, out.permute(0, 2, 1).reshape(2, 16, 4, 4))
    with pytest.raises(ValueError, match="set_resolution"):
        klein.denoise(torch.randn(1, 16, 8, 8), t[:1], {k: v[:1] for k, v in cond.items()})


@pytest.mark.parametrize("folder,guidance", [(TINY, 4.0), (DISTILLED, 4.0)])
def test_generate_equals_the_pipeline(folder, guidance):
    fam = load_family(str(folder))
    kw = dict(num_inference_steps=2, guidance_scale=guidance, height=64, width=64)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = plain_pipe(folder)(prompt=PROMPTS, generator=gens, **kw).images
    ours = fam.generate(PROMPTS, [3, 4], steps=2, guidance=guidance)
    for a, b in zip(ours, expected):
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("folder,guidance,cfg", [(TINY, 4.0, 4.0), (DISTILLED, 4.0, 1.0), (TINY, 1.0, 1.0)])
def test_flow_sampler_at_noise_level_zero_equals_the_klein_pipeline(folder, guidance, cfg):
    """The flow SDE sampler at a = 0 is Flux2KleinPipeline's loop: its sigma grid (empirical mu at this size and step
    count), true CFG with "" on the base model, none on the distilled one (`sampling_cfg`), the same initial noise."""
    from diffalign.sampling import initial_noise
    from diffalign.sampling.flow_sde import FlowSDESampler

    fam = load_family(str(folder))
    seeds, steps = [1, 2], 4
    assert fam.sampling_cfg(guidance) == cfg
    ours = FlowSDESampler.for_family(fam, steps, 0.0).sample(fam, PROMPTS, seeds, cfg, keep_trajectory=False)
    x1 = initial_noise(seeds, (16, 4, 4))
    raw = plain_pipe(folder)(
        prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
        latents=x1, output_type="latent",
    ).images  # fmt: skip
    assert raw.shape == (2, 4, 8, 8) and raw.abs().max() > 0.5  # the pipeline returns the VAE's latents
    torch.testing.assert_close(fam.raw_latents(ours.x0), raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dpo", "kto", "mapo", "sft"])
def test_offline_objectives_train_a_few_steps(klein, name):
    fam = load_family(str(TINY))
    params = add_lora(fam.denoiser, 4, 8, fam.lora_target_modules)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x0 = klein.encode_images(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    cond = {k: torch.cat([v, v]) for k, v in klein.encode_prompts(PROMPTS).items()}  # [w; l]
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


def test_smpo_inversion_is_refused_in_one_line(pairs_file, tmp_path):
    """SmPO's ReNoise inversion needs a DDPM schedule: on a flow family (as on SD3 and FLUX.1) the run stops at its
    first step with one line naming it."""
    args = ["train", str(REPO / "configs/tiny/flux2_klein_dpo.yaml"), f"data.source={pairs_file}"]
    args += [f"train.output_dir={tmp_path / 'run'}", "objective.name=smpo", "objective.hard_labels=true"]
    with pytest.raises(ValueError, match=r"inversion needs a DDPM-type schedule .* got 'flow'") as err:
        main(args)
    assert "\n" not in str(err.value)


def test_dpo_through_the_cli_then_klein_pipeline_load_lora_weights(pairs_file, tmp_path):
    run = tmp_path / "run"
    args = [f"data.source={pairs_file}", f"train.output_dir={run}"]
    assert main(["train", str(REPO / "configs/tiny/flux2_klein_dpo.yaml"), *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)
    pipe = plain_pipe()
    kw = dict(prompt=PROMPTS, num_inference_steps=2, height=64, width=64, guidance_scale=4.0)
    base = pipe(generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="np", **kw).images
    pipe.load_lora_weights(run / "lora")
    tuned = pipe(generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="np", **kw).images
    assert np.abs(base - tuned).max() > 1e-4
    fam = load_family(str(TINY))  # diffalign's loader gives the same network (alpha 8 != rank 4 included)
    load_lora(fam, run / "lora")
    xt, t, cond = inputs(fam)
    plain = Flux2Family(pipe, pipe.vae.config, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fam.denoise(xt, t, cond), plain.denoise(xt, t, cond), rtol=0, atol=1e-6)
    ours = fam.generate(PROMPTS, [5, 6], steps=2, guidance=4.0)  # diffalign's samples == diffusers' with the LoRA
    theirs = pipe(generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kw).images
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))


ONLINE = {  # objective -> its overrides on top of a one-round tiny run
    "grpo": ["objective.name=grpo", "sampling.eta=0.7"],
    "nft": ["objective.name=nft", "sampling.eta=0", "sampling.shared_noise=false"],  # the old adapter's ODE
}


@pytest.mark.parametrize("folder", [TINY, DISTILLED, DEV])
@pytest.mark.parametrize("objective", list(ONLINE))
def test_online_round_on_flux2_through_the_cli(tmp_path, monkeypatch, objective, folder):
    """`diffalign online` on the tiny Klein (base: CFG 4 with ""; distilled: 4 steps, no CFG) and the tiny FLUX.2-dev
    (guidance 4 as the transformer's input): a finite first round and the LoRA saved in FLUX.2's format."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    args = ["online", "lora.rank=4", "lora.alpha=4", f"model.path={folder}", "model.resolution=0", *ONLINE[objective]]
    args += ["online.rounds=1", "sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=4"]
    args += ["sampling.sample_batch=4", "train.steps_per_round=1", "train.batch_size=2", "train.grad_accum=1"]
    args += [f"sampling.prompts={prompts}", "reward.scorer=toy_aesthetic", "reward.args={}", "reward.monitor=[]"]
    args += [
        "sampling.guidance=4.0",
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


def test_flux2_dev_guidance_input_prompt_encoding_and_denoise():
    """FLUX.2-dev: Mistral-3 hidden states 10, 20, 30 of the system + user chat, guidance as the transformer's input
    (train_guidance while training; `sampling.guidance` sets it), no CFG pass."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    dev = load_family(str(DEV))
    assert (dev.klein, dev.distilled, dev.guidance_embeds, dev.default_steps) == (False, False, True, 50)
    assert dev.lora_writer is Flux2Pipeline and dev.train_guidance == 3.5  # diffusers' FLUX.2 script
    cond = dev.encode_prompts(PROMPTS)
    proc = dev.pipe.tokenizer
    with torch.no_grad():
        text = f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{PROMPTS[1]}[/INST]"
        ids = proc.tokenizer(text, padding="max_length", max_length=512, add_special_tokens=False, return_tensors="pt")
        hidden = dev.pipe.text_encoder(**ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cond["prompt_embeds"][1:], torch.cat([hidden[10], hidden[20], hidden[30]], -1))
    xt, t, _ = inputs(dev)
    with torch.no_grad():
        out = dev.denoiser(
            hidden_states=xt.reshape(2, 16, 16).permute(0, 2, 1),
            timestep=dev.schedule.sigma(t),
            guidance=torch.full((2,), 3.5),
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=Flux2Pipeline._prepare_text_ids(cond["prompt_embeds"]),
            img_ids=Flux2Pipeline._prepare_latent_ids(xt),
        ).sample
        assert torch.equal(dev.denoise(xt, t, cond), out.permute(0, 2, 1).reshape(2, 16, 4, 4))
    assert dev.sampling_cfg(2.5) == 1.0 and dev.train_guidance == 2.5


def test_flux2_dev_generate_and_sampler_equal_the_pipeline():
    from diffusers import Flux2Pipeline

    from diffalign.sampling import initial_noise
    from diffalign.sampling.flow_sde import FlowSDESampler

    dev = load_family(str(DEV))
    pipe = Flux2Pipeline.from_pretrained(DEV)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=2.5, height=64, width=64)
    expected = pipe(generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw).images
    for a, b in zip(dev.generate(PROMPTS, [3, 4], steps=3, guidance=2.5), expected):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    cfg = dev.sampling_cfg(2.5)
    ours = FlowSDESampler.for_family(dev, 3, 0.0).sample(dev, PROMPTS, [1, 2], cfg, keep_trajectory=False)
    x1 = initial_noise([1, 2], (16, 4, 4))
    packed = pipe(latents=x1, output_type="latent", **kw).images  # (N, h w, 4C) packed tokens
    assert packed.abs().max() > 0.5
    torch.testing.assert_close(ours.x0.reshape(2, 16, 16).permute(0, 2, 1), packed, rtol=1e-5, atol=1e-5)


def test_flux2_dev_lora_loads_in_flux2_pipeline(tmp_path):
    from diffusers import Flux2Pipeline

    from diffalign.lora import save_lora

    fam = load_family(str(DEV))
    random_lora(fam, fam.lora_target_modules)
    lora = save_lora(fam, tmp_path / "lora").parent
    pipe = Flux2Pipeline.from_pretrained(DEV)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    plain = Flux2Family(pipe, pipe.vae.config, torch.float32)
    xt, t, cond = inputs(fam)
    with torch.no_grad():
        torch.testing.assert_close(plain.denoise(xt, t, cond), fam.denoise(xt, t, cond), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "objective,extra",
    [
        ("d3po", ["pairing.split=all_pairs", "sampling.guidance=2.0"]),
        ("dpo", ["pairing.split=best_worst", "sampling.guidance=2.0"]),  # DRAGON with the Diffusion-DPO surrogate
        ("dro", ["sampling.guidance=1.0", "online.max_experts=8"]),
    ],
    ids=["d3po", "dragon", "dro"],
)
def test_the_other_online_methods_run_a_round_on_klein(tmp_path, monkeypatch, objective, extra):
    """D3PO, DRAGON and DRO on Klein base through the flow sampler (CFG 2 with "" where set): at LoRA init D3PO and
    DRAGON-DPO give ln 2, DRO the hinge's -m = 0.001 (tests/test_flow_sampling.py does the same on SD3)."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    args = ["online", f"model.path={TINY}", "lora.rank=4", "lora.alpha=4", f"objective.name={objective}"]
    args += ["sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=3", "sampling.eta=0.7"]
    args += ["train.steps_per_round=1", "train.batch_size=2", "reward.scorer=toy_aesthetic", "reward.monitor=[]"]
    args += [
        "online.rounds=1",
        "train.tensorboard=false",
        "eval.prompts=",
        "guards.every=0",
        f"sampling.prompts={prompts}",
    ]
    out = tmp_path / "run"
    assert main([*args, *extra, f"train.output_dir={out}"]) == 0
    row = json.loads((out / "rounds.jsonl").read_text())
    expected = {"d3po": math.log(2), "dpo": math.log(2), "dro": 0.001}[objective]
    assert math.isclose(row["train/loss"], expected, rel_tol=1e-4) and row["skipped_steps"] == 0


@pytest.mark.slow  # 16 s on a loaded box
def test_dpo_on_an_int8_klein_base(pairs_file, tmp_path):
    """model.quantize=int8 (torchao, CPU): the frozen Klein transformer holds int8 weights, DPO starts at ln 2 against
    the same quantized network with the adapters off, and the fp32 LoRA changes the unquantized base."""
    pytest.importorskip("torchao", reason="the int8 backend is the optional extra diffalign[quantize]")
    run = tmp_path / "run"
    args = [f"data.source={pairs_file}", f"train.output_dir={run}", "model.quantize=int8", "model.dtype=bfloat16"]
    assert main(["train", str(REPO / "configs/tiny/flux2_klein_dpo.yaml"), *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6) and all(math.isfinite(r["loss"]) for r in rows)
    fam = load_family(str(TINY), dtype=torch.bfloat16, quantize="int8")
    assert type(fam.denoiser.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    plain = load_family(str(TINY))
    xt, t, cond = inputs(plain)
    with torch.no_grad():
        base = plain.denoise(xt, t, cond)
        load_lora(plain, run / "lora")
        assert (plain.denoise(xt, t, cond) - base).abs().max() > 1e-6


def test_a_flux2_lora_without_diffalign_metadata_is_told_from_flux1(tmp_path):
    """A FLUX.2 LoRA as diffusers' own scripts write it (no diffalign family record) loads onto flux2 and is refused
    in one line on FLUX.1, whose single blocks share the `single_transformer_blocks` prefix."""
    from safetensors.torch import save_file

    from diffalign.lora import LoraError, lora_family, save_lora

    fam = load_family(str(TINY))
    add_lora(fam.denoiser, 4, 8, fam.lora_target_modules)
    file = save_lora(fam, tmp_path / "ours")
    with safe_open(str(file), framework="pt") as f:
        bare = tmp_path / "bare" / "pytorch_lora_weights.safetensors"
        bare.parent.mkdir()
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(bare))  # no metadata
    assert lora_family(bare) == lora_family(file) == "flux2"
    load_lora(load_family(str(TINY)), bare.parent)
    with pytest.raises(LoraError, match="a flux2 LoRA cannot load onto a flux base model"):
        load_lora(load_family(str(REPO / "assets" / "tiny" / "flux")), bare.parent)


def test_comfyui_export_reads_back_in_diffusers_flux2_loader(tmp_path):
    """`diffalign export format=kohya` on a FLUX.2 LoRA writes ComfyUI's diffusion_model.<BFL name> layout (fused
    qkv as stacked A / block-diagonal B, alpha / rank folded into B); diffusers' own FLUX.2 reader loads it to the
    same network, attention, feed-forwards and single blocks included."""

    fam = load_family(str(TINY))
    targets = fam.lora_target_modules + ["single_transformer_blocks.0.attn.to_out"]
    random_lora(fam, targets)  # alpha 8 / rank 4: scale 2
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    lora, comfy, keys, (a, b) = export_kohya(fam, tmp_path, f"{qkv}.lora_A.weight", f"{qkv}.lora_B.weight")
    assert all(k.startswith("diffusion_model.") for k in keys) and not any("alpha" in k for k in keys)
    assert {"diffusion_model.single_blocks.0.linear1.lora_A.weight", "diffusion_model.single_blocks.0.linear2.lora_B.weight",
            "diffusion_model.double_blocks.0.txt_mlp.2.lora_A.weight"} <= keys  # fmt: skip
    assert a.shape == (12, 32) and b.shape == (96, 12) and torch.count_nonzero(b[:32, 4:]) == 0  # block-diagonal
    pipe = plain_pipe()
    pipe.load_lora_weights(str(comfy))
    plain = Flux2Family(pipe, pipe.vae.config, torch.float32)
    xt, t, cond = inputs(fam)
    with torch.no_grad():
        torch.testing.assert_close(plain.denoise(xt, t, cond), fam.denoise(xt, t, cond), rtol=0, atol=1e-5)
