"""Z-Image on the tiny real ZImagePipeline in assets/tiny/zimage: detection, the chat-templated Qwen3 prompt encoding
(padded + mask), denoise vs the transformer called as the pipeline calls it (lists, frame axis, 1 - sigma, negated
output), the static shift, generation and the flow sampler at noise 0 == the pipeline (with and without CFG), offline
objectives through the estimator, DPO through the CLI with the LoRA in plain diffusers, GRPO / NFT rounds."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from diffusers import ZImagePipeline
from lora_factory import assert_reads_back, export_kohya, random_lora
from safetensors import safe_open

from diffalign.inversion import XT_SOURCES
from diffalign.likelihood import denoising_errors, pair_noise, pair_timesteps
from diffalign.lora import add_lora, load_lora, reference_mode
from diffalign.models import load_family
from diffalign.models.zimage import ZImageFamily
from diffalign.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny" / "zimage"
PROMPTS = ("a photo of a cat", "red dog")  # a tuple: ZImagePipeline writes the chat template into a list it gets


@pytest.fixture(scope="module")
def zimage():
    return load_family(str(TINY))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", make_rows(8, seed=3))


def plain_pipe():
    pipe = ZImagePipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(fam, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([20, 600]), fam.encode_prompts(PROMPTS)


def test_detection_attributes_and_prompt_encoding(zimage):
    assert isinstance(zimage, ZImageFamily) and zimage.name == "zimage" and zimage.prediction_type == "flow"
    assert (zimage.resolution, zimage.latent_channels, zimage.vae_scale_factor) == (64, 16, 8)
    assert zimage.lora_prefix == "transformer" and zimage.denoiser is zimage.pipe.transformer
    assert zimage.shard_blocks == ("ZImageTransformerBlock",)
    cond = zimage.encode_prompts(PROMPTS)
    pipe = zimage.pipe
    with torch.no_grad():  # the chat template with thinking on, Qwen3's last-but-one hidden state, no padding
        text = [
            pipe.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in PROMPTS
        ]
        assert text[1] == "<|im_start|>user\nred dog<|im_end|>\n<|im_start|>assistant\n"
        ids = pipe.tokenizer(text, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        mask = ids.attention_mask.bool()
        hidden = pipe.text_encoder(ids.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    assert cond["prompt_embeds"].shape == (2, 512, 16) and cond["prompt_mask"].dtype == torch.bool
    assert torch.equal(cond["prompt_mask"], mask) and cond["prompt_mask"].sum(1).tolist() == mask.sum(1).tolist()
    for i in range(2):
        torch.testing.assert_close(cond["prompt_embeds"][i][mask[i]], hidden[i][mask[i]], rtol=0, atol=0)
        assert not cond["prompt_embeds"][i][~mask[i]].any()  # zero padding


def test_training_sigma_is_the_static_shift_3(zimage):
    fam = load_family(str(TINY), load_encoders=False)
    assert fam.pipe.vae is None and fam.pipe.text_encoder is None
    t = torch.tensor([0, 249, 499, 999])
    u = (t + 1).double() / 1000
    torch.testing.assert_close(fam.schedule.sigma(t).double(), 3 * u / (1 + 2 * u), rtol=1e-6, atol=1e-6)
    fam.set_resolution(1024)  # static shift: the size does not matter
    torch.testing.assert_close(fam.schedule.sigma(t).double(), 3 * u / (1 + 2 * u), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="resolution 520 must be a multiple of 16"):
        fam.set_resolution(520)


def test_denoise_is_the_transformer_called_as_the_pipeline_calls_it(zimage):
    xt, t, cond = inputs(zimage)
    sigma = zimage.schedule.sigma(t)
    mask = cond["prompt_mask"]
    with torch.no_grad():
        out = zimage.denoiser(
            [xt[0, :, None], xt[1, :, None]],  # (16, 1, 8, 8) each: a frame axis of one
            (1000 - sigma * 1000) / 1000,  # the pipeline's (1000 - t) / 1000 of its timestep t = sigma * 1000
            [cond["prompt_embeds"][i][mask[i]] for i in range(2)],
            return_dict=False,
        )[0]
        ours = zimage.denoise(xt, t, cond)
    expected = -torch.stack(out).squeeze(2)  # the pipeline's noise_pred = -output
    assert torch.equal(ours, expected)
    assert ours.shape == (2, 16, 8, 8)


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_generate_equals_the_pipeline(zimage, guidance):
    kw = dict(num_inference_steps=2, guidance_scale=guidance, height=64, width=64)
    expected = plain_pipe()(list(PROMPTS), generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw).images
    ours = zimage.generate(PROMPTS, [3, 4], steps=2, guidance=guidance)
    for a, b in zip(ours, expected):
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_flow_sampler_at_noise_level_zero_equals_the_zimage_pipeline(zimage, guidance):
    """On-line sampling on Z-Image: the flow SDE sampler at a = 0 is ZImagePipeline's own loop (its sigma grid and
    shift; guidance g is CFG at 1 + g on the "" prompt, none at g = 0 as Z-Image-Turbo samples)."""
    from diffalign.sampling import initial_noise
    from diffalign.sampling.flow_sde import FlowSDESampler

    seeds, steps = [1, 2], 4
    cfg = zimage.sampling_cfg(guidance)
    assert cfg == 1.0 + guidance
    ours = FlowSDESampler.for_family(zimage, steps, 0.0).sample(zimage, PROMPTS, seeds, cfg, keep_trajectory=False)
    theirs = plain_pipe()(
        list(PROMPTS), num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
        latents=initial_noise(seeds, (16, 8, 8)), output_type="latent",
    ).images  # fmt: skip
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


def test_smpo_inversion_refuses_the_flow_schedule_in_one_line(zimage):
    """SmPO's x_t comes from DDIM (ReNoise) inversion, which needs a DDPM-type schedule: Z-Image is flow-matching."""
    xt, t, cond = inputs(zimage)
    with pytest.raises(ValueError, match="inversion needs a DDPM-type schedule") as err:
        denoising_errors(zimage.denoise, zimage.schedule, xt, cond, t, torch.randn_like(xt), None,
                         XT_SOURCES[OBJECTIVES["smpo"]().xt_source])  # fmt: skip
    assert "\n" not in str(err.value)


def test_dpo_through_the_cli_then_zimage_pipeline_load_lora_weights(pairs_file, tmp_path):
    run = tmp_path / "run"
    args = [f"data.source={pairs_file}", f"train.output_dir={run}"]
    assert main(["train", str(REPO / "configs/tiny/zimage_dpo.yaml"), *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)
    pipe = plain_pipe()
    kw = dict(
        prompt="a photo of a cat", num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="np"
    )
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(run / "lora")
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(base - tuned).max() > 1e-4
    fam = load_family(str(TINY))  # diffalign's loader gives the same network (alpha 8 != rank 4 included) ...
    load_lora(fam, run / "lora")
    xt, t, cond = inputs(fam)
    plain = ZImageFamily(pipe, pipe.vae.config, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fam.denoise(xt, t, cond), plain.denoise(xt, t, cond), rtol=0, atol=1e-6)
    # ... and the same images as diffalign's own sampling
    ours = fam.generate(["a photo of a cat"], [0], steps=2, guidance=3.0)[0]
    theirs = pipe(generator=torch.Generator().manual_seed(0), **{**kw, "output_type": "pil"}).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_comfyui_export_reads_back_in_zimage_pipeline_as_the_diffusers_lora(tmp_path):
    """`diffalign export format=kohya` on a Z-Image LoRA writes diffusers' names under ComfyUI's `diffusion_model.`
    with lora_A / lora_B and alpha (diffalign.lora_comfy); ZImagePipeline.load_lora_weights reads that file into the
    same network as the diffusers-format LoRA: main layers and both refiners, modulation, embedders, final layer."""

    fam = load_family(str(TINY))
    extra = [
        "noise_refiner.0.adaLN_modulation.0",
        "layers.1.adaLN_modulation.0",
        "all_x_embedder.2-1",
        "cap_embedder.1",
        "t_embedder.mlp.2",
        "all_final_layer.2-1.adaLN_modulation.1",
    ]
    random_lora(fam, fam.lora_target_modules + extra)  # alpha 8 / rank 4: scale 2
    lora, comfy, keys, (alpha,) = export_kohya(
        fam, tmp_path, "diffusion_model.context_refiner.0.feed_forward.w3.alpha"
    )
    assert {
        "diffusion_model.layers.0.attention.to_q.lora_A.weight",
        "diffusion_model.layers.1.attention.to_out.0.lora_B.weight",
        "diffusion_model.noise_refiner.0.adaLN_modulation.0.alpha",
        "diffusion_model.all_x_embedder.2-1.lora_A.weight",
        "diffusion_model.all_final_layer.2-1.adaLN_modulation.1.lora_B.weight",
    } <= keys and float(alpha) == 8.0
    assert len(keys) == 3 * (4 * 7 + 2 + 4)  # (A, B, alpha) x (4 blocks x 7 + 2 modulations + 4 outside the blocks)
    assert_reads_back(plain_pipe(), ZImageFamily, fam, lora, comfy, inputs(fam))


def test_a_zimage_lora_on_a_module_comfyui_cannot_name_is_refused():
    """Z-Image-Omni's SigLIP embedder has no name in ComfyUI's Z-Image map: one line naming the module."""
    from diffalign.lora_comfy import ComfyExportError, to_comfy

    a, b = torch.zeros(4, 32), torch.zeros(32, 4)
    weights = {"siglip_embedder.1.lora_A.weight": a, "siglip_embedder.1.lora_B.weight": b}
    with pytest.raises(ComfyExportError, match="Z-Image LoRA module 'siglip_embedder.1' has no ComfyUI name"):
        to_comfy("zimage", weights, {"siglip_embedder.1": 8.0})


ONLINE = {  # objective -> its overrides on top of a one-round tiny run
    "grpo": [str(REPO / "configs" / "zimage_turbo_grpo.yaml")],
    "nft": [str(REPO / "configs" / "zimage_turbo_nft.yaml")],
}


@pytest.mark.parametrize("objective", list(ONLINE))
def test_online_round_on_zimage_turbo_through_the_cli(tmp_path, monkeypatch, objective):
    """`diffalign online` on the tiny Z-Image with the Turbo recipes (no CFG, few steps): GRPO (SDE sampling with
    log-probs) and NFT; a finite first round and the LoRA saved in Z-Image's format. NFT (objective.timesteps:
    sampler) trains at t drawn from the round's own 6-step grid only."""
    from diffalign.sources import nft

    seen = {"t": [], "grid": None}
    if objective == "nft":
        x0_scale = nft.x0_scale

        def recorded(schedule, t):
            seen["t"] += t.tolist()
            return x0_scale(schedule, t)

        inputs = nft.NFT.inputs

        def with_grid(self, ctx, batch, device):
            seen["grid"] = batch["round"].grid.tolist()
            return inputs(self, ctx, batch, device)

        monkeypatch.setattr(nft, "x0_scale", recorded)
        monkeypatch.setattr(nft.NFT, "inputs", with_grid)
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    args = ["online", *ONLINE[objective], f"model.path={TINY}", "model.resolution=0"]
    args += ["online.rounds=1", "sampling.prompts_per_round=2", "sampling.images_per_prompt=2"]  # own steps (6)
    args += ["sampling.sample_batch=4", "train.steps_per_round=1", "train.batch_size=2", "train.grad_accum=1"]
    args += [f"sampling.prompts={prompts}", "reward.scorer=toy_aesthetic", "reward.args={}", "reward.monitor=[]"]
    args += ["train.tensorboard=false", "eval.prompts=", "guards.every=0", f"train.output_dir={out}"]
    assert main(args) == 0
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train/loss"]) and row["skipped_steps"] == 0
    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("transformer.layers.") for k in f.keys())
    if objective == "nft":
        assert len(seen["grid"]) == 6 and len(seen["t"]) == 2  # 6 sampling steps; a batch of 2 rows
        assert all(t in seen["grid"] for t in seen["t"])


def test_int8_base_under_the_lora_and_adapters_off_is_the_quantized_base():
    pytest.importorskip("torchao", reason="the int8 backend is the optional extra diffalign[quantize]")
    fam = load_family(str(TINY), dtype=torch.bfloat16, quantize="int8")
    assert type(fam.denoiser.layers[0].attention.to_q.weight).__name__ == "Int8Tensor"
    xt, t, cond = inputs(fam)
    with torch.no_grad():
        base = fam.denoise(xt, t, cond)
    params = add_lora(fam.denoiser, 4, 8, fam.lora_target_modules)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        with reference_mode(fam.denoiser):
            assert torch.equal(fam.denoise(xt, t, cond), base)
    fam.denoise(xt, t, cond).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.shape[0] == 4)  # lora_A


def test_memory_accounting_of_zimage_at_its_real_size():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import memory

    z = memory.main(["--families", "zimage"])["zimage"]
    assert 6.1e9 < z["params"] < 6.2e9  # Z-Image / Z-Image-Turbo: "6 B"
    rows = z["rows"]
    assert rows["bf16+ckpt"]["activations_gb"] < rows["bf16"]["activations_gb"] < rows["fp32"]["activations_gb"]
    assert rows["nf4+ckpt"]["total_gb"] < rows["int8+ckpt"]["total_gb"] < rows["bf16+ckpt"]["total_gb"] < 80


ONLINE_BASE = {  # on-line methods with CFG on (Z-Image base style: guidance 3 = CFG scale 4 in sampling and training)
    "d3po": ["objective.name=d3po", "sampling.eta=0.7"],
    "dragon": ["objective.name=dpo", "pairing.split=best_worst", "sampling.eta=0.9"],
}


@pytest.mark.parametrize("objective", list(ONLINE_BASE))
def test_online_round_with_cfg_on_zimage_through_the_cli(tmp_path, monkeypatch, objective):
    """D3PO and DRAGON rounds with true CFG (the "" prompt's branch in sampling and in the training forward)."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    args = [
        "online",
        "lora.rank=4",
        "lora.alpha=4",
        f"model.path={TINY}",
        "model.resolution=0",
        *ONLINE_BASE[objective],
    ]
    args += ["online.rounds=1", "sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=3"]
    args += ["sampling.sample_batch=4", "train.steps_per_round=1", "train.batch_size=2", "train.grad_accum=1"]
    args += [f"sampling.prompts={prompts}", "reward.scorer=toy_aesthetic", "reward.args={}", "reward.monitor=[]"]
    args += [
        "sampling.guidance=3.0",
        "train.tensorboard=false",
        "eval.prompts=",
        "guards.every=0",
        f"train.output_dir={out}",
    ]
    assert main(args) == 0
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train/loss"]) and row["skipped_steps"] == 0


def test_dpo_from_the_latent_cache_without_vae_and_qwen3_equals_the_first_run(pairs_file, tmp_path, capsys):
    """The cache holds the padded Qwen3 embeddings with their bool mask; a run from it loads no encoder and sees the
    same numbers as the run that built it."""
    runs = []
    for name in ("a", "b"):
        args = [
            f"data.source={pairs_file}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={tmp_path / name}",
        ]
        assert main(["train", str(REPO / "configs/tiny/zimage_dpo.yaml"), *args, "train.max_steps=2"]) == 0
        runs.append(
            [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        )
    assert runs[0] == runs[1] and len(runs[0]) == 2
    assert "VAE and text encoders not loaded" in capsys.readouterr().out  # the second run
    with safe_open(str(next((tmp_path / "cache").glob("text-*.safetensors"))), "pt") as f:
        masks = [f.get_tensor(k) for k in f.keys() if k.endswith("prompt_mask")]
    assert masks and all(m.dtype == torch.bool for m in masks)
