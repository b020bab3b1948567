"""Wan 2.1 / 2.2 text-to-video on the tiny real WanPipeline folders (assets/tiny/wan, assets/tiny/wan22): detection,
prompt encoding, 5-D denoise vs the transformer called as the pipeline calls it (and the A14B expert switch), the
training shift, generate and the flow sampler at noise 0 == WanPipeline, offline objectives, DPO through the CLI
with the LoRA in WanPipeline.load_lora_weights, GRPO (frame-averaged reward) and NFT rounds through the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from lora_factory import export_kohya, random_lora
from safetensors import safe_open

from diffalign.errors import DiffalignError
from diffalign.likelihood import denoising_errors, pair_noise, pair_timesteps
from diffalign.lora import add_lora, load_lora, reference_mode
from diffalign.models import load_family
from diffalign.models.wan import WanFamily
from diffalign.objectives import OBJECTIVES
from diffalign.sampling import initial_noise
from diffalign.sampling.flow_sde import FlowSDESampler

REPO = Path(__file__).resolve().parents[1]
TINY, TINY22 = REPO / "assets" / "tiny" / "wan", REPO / "assets" / "tiny" / "wan22"
PROMPTS = ["a photo of a cat", "red dog"]
FRAMES, PX = 5, 16  # 5 frames -> 2 latent frames, 16 px -> 2 x 2 latents


def tiny(path=TINY):
    fam = load_family(str(path))
    fam.num_frames = FRAMES
    fam.set_resolution(PX)
    return fam


@pytest.fixture(scope="module")
def wan():
    return tiny()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", make_rows(8, seed=3))


def euler_pipe(path=TINY):
    """WanPipeline with FlowMatchEulerDiscreteScheduler at the folder's shift: the pipeline the flow sampler is."""
    pipe = WanPipeline.from_pretrained(path)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(fam, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 2, 2, 2, generator=g), torch.tensor([20, 990]), fam.encode_prompts(PROMPTS)


def test_detection_attributes_and_prompt_encoding(wan):
    assert isinstance(wan, WanFamily) and wan.name == "wan" and wan.prediction_type == "flow"
    assert (wan.latent_channels, wan.vae_scale_factor, wan.temporal_factor) == (16, 8, 4)
    assert wan.denoiser is wan.pipe.transformer and not wan.experts and wan.boundary is None
    assert wan.latent_shape() == (16, 2, 2, 2) and wan.latent_shape(32, 48) == (16, 2, 4, 6)
    assert wan.scheduler.config.shift == 3.0 == wan.pipe.scheduler.config.flow_shift  # the folder's UniPC shift
    cond = wan.encode_prompts(PROMPTS)
    pipe = wan.pipe
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        states = pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state
    expected = states * ids.attention_mask[..., None]  # padding positions zeroed, as _get_t5_prompt_embeds
    assert cond["prompt_embeds"].shape == (2, 512, 32)
    torch.testing.assert_close(cond["prompt_embeds"], expected, rtol=0, atol=0)


def test_training_sigma_is_the_folders_flow_shift(wan):
    t = torch.tensor([0, 249, 499, 999])
    u = (t + 1).double() / 1000
    expected = 3.0 * u / (1 + 2.0 * u)  # shift s: s u / (1 + (s - 1) u)
    torch.testing.assert_close(wan.schedule.sigma(t).double(), expected, rtol=1e-6, atol=1e-6)


def test_denoise_is_the_transformer_on_video_latents_as_the_pipeline_calls_it(wan):
    xt, t, cond = inputs(wan)
    with torch.no_grad():
        out = wan.denoiser(
            hidden_states=xt, timestep=wan.schedule.sigma(t) * 1000, encoder_hidden_states=cond["prompt_embeds"]
        ).sample
        ours = wan.denoise(xt, t, cond)
    assert ours.shape == (2, 16, 2, 2, 2) and torch.equal(ours, out)


def test_the_a14b_experts_switch_at_the_boundary_row_by_row():
    fam = tiny(TINY22)
    assert fam.experts and fam.boundary == 875.0
    xt, t, cond = inputs(fam)
    timestep = fam.schedule.sigma(t) * 1000
    assert timestep[0] < 875 <= timestep[1]  # one low-noise row, one high-noise row
    with torch.no_grad():
        ours = fam.denoise(xt, t, cond)
        low = fam.pipe.transformer_2(xt[:1], timestep[:1], cond["prompt_embeds"][:1]).sample
        high = fam.pipe.transformer(xt[1:], timestep[1:], cond["prompt_embeds"][1:]).sample
    assert torch.equal(ours[:1], low) and torch.equal(ours[1:], high) and not torch.equal(low, high)
    with pytest.raises(DiffalignError, match="set model.expert=high or low"):
        fam.check_trainable()


@pytest.mark.parametrize("path", [TINY, TINY22])
def test_flow_sampler_at_noise_level_zero_equals_the_wan_pipeline(path):
    """The flow SDE sampler at a = 0 with CFG 5 ("" as the negative prompt) is WanPipeline's loop with the Euler
    scheduler at the folder's shift; on wan22 both experts take their steps."""
    fam = tiny(path)
    seeds, steps = [1, 2], 4
    ours = FlowSDESampler.for_family(fam, steps, 0.0).sample(fam, PROMPTS, seeds, 5.0, keep_trajectory=False)
    x1 = initial_noise(seeds, fam.latent_shape())
    theirs = euler_pipe(path)(
        PROMPTS, num_inference_steps=steps, guidance_scale=5.0, height=PX, width=PX, num_frames=FRAMES, latents=x1,
        output_type="latent",
    ).frames  # fmt: skip
    assert theirs.shape == (2, 16, 2, 2, 2) and theirs.abs().max() > 0.5
    torch.testing.assert_close(ours.x0, theirs, rtol=1e-5, atol=1e-5)


def test_generate_equals_the_pipeline_and_encode_decode_are_inverse_shapes(wan):
    pipe = WanPipeline.from_pretrained(TINY)  # its own UniPC scheduler
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=PX, width=PX, num_frames=FRAMES)
    expected = pipe(PROMPTS, generator=gens, output_type="pt", **kw).frames  # (N, F, 3, H, W) in [0, 1]
    ours = wan.generate(PROMPTS, [3, 4], steps=2)  # (N, 3, F, H, W) in [0, 1]
    assert ours.shape == (2, 3, FRAMES, PX, PX)
    torch.testing.assert_close(ours.transpose(1, 2), expected, rtol=0, atol=1e-5)
    x0 = wan.encode_images(torch.rand(3, 3, PX, PX) * 2 - 1)  # images: one-frame videos
    assert x0.shape == (3, 16, 1, 2, 2) and wan.decode(x0).shape == (3, 3, 1, PX, PX)


@pytest.mark.parametrize("name", ["dpo", "kto", "mapo", "sft"])
def test_offline_objectives_train_a_few_steps(name):
    fam = tiny()
    params = add_lora(fam.denoiser, 4, 8, fam.lora_target_modules)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x0 = fam.encode_images(torch.rand(4, 3, PX, PX, generator=torch.Generator().manual_seed(0)) * 2 - 1)  # [w; l]
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
    assert any(p.abs().sum() > 0 for n, p in fam.denoiser.named_parameters() if "lora_B" in n)


def test_dpo_through_the_cli_then_wan_pipeline_load_lora_weights_reproduces_our_samples(pairs_file, tmp_path):
    run = tmp_path / "run"
    args = [f"data.source={pairs_file}", f"train.output_dir={run}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", str(REPO / "configs/tiny/wan_dpo.yaml"), *args]) == 0  # 5-D latents through the cache
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)
    fam = tiny()
    load_lora(fam, run / "lora")
    seeds = [1, 2]
    ours = FlowSDESampler.for_family(fam, 3, 0.0).sample(fam, PROMPTS, seeds, 5.0, keep_trajectory=False).x0
    pipe = euler_pipe()
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=PX, width=PX, num_frames=FRAMES, output_type="latent")
    base = pipe(PROMPTS, latents=initial_noise(seeds, fam.latent_shape()), **kw).frames
    pipe.load_lora_weights(run / "lora")
    tuned = pipe(PROMPTS, latents=initial_noise(seeds, fam.latent_shape()), **kw).frames
    assert (base - tuned).abs().max() > 1e-4  # the LoRA changed the samples
    torch.testing.assert_close(ours, tuned, rtol=1e-5, atol=1e-5)


def test_dro_on_wan_trains_on_one_frame_videos_and_refuses_longer_ones(tmp_path, monkeypatch, capsys):
    """DRO's experts are preference-data images: on Wan they are one-frame videos (as Wan trains on images), so a
    round with model.num_frames=1 runs, its negatives one-frame videos too (at init the hinge is -m, as on images);
    5-frame negatives are refused in one line that names the fix."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    experts = write_parquet(tmp_path / "prefs.parquet", make_rows(4))
    args = ["online", f"model.path={TINY}", f"model.resolution={PX}", "model.dtype=float32", "eval.prompts=",
            "objective.name=dro", "sampling.guidance=1.0", f"online.experts={experts}", "online.rounds=1",
            "sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=3", "train.batch_size=2",
            "train.steps_per_round=1", "train.mixed_precision=no", "reward.scorer=toy_aesthetic", "reward.monitor=[]",
            "train.tensorboard=false", "guards.every=0", f"sampling.prompts={prompts}"]  # fmt: skip
    assert main([*args, f"model.num_frames={FRAMES}", f"train.output_dir={tmp_path / 'five'}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "experts are images" in lines[0] and "model.num_frames=1" in lines[0]
    out = tmp_path / "one"
    assert main([*args, "model.num_frames=1", f"train.output_dir={out}"]) == 0
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isclose(row["train/loss"], 0.001, rel_tol=1e-3) and row["skipped_steps"] == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_two_expert_lora_needs_model_expert_and_each_expert_trains_its_own_timesteps(pairs_file, tmp_path, capsys):
    """Wan 2.2 A14B: without model.expert a LoRA is refused in one line naming the key. With model.expert=low the
    LoRA goes on transformer_2 and every training draw is below the boundary (the high expert's draws would train
    nothing); the file records the expert, WanPipeline loads it with load_into_transformer_2=True and reproduces
    diffalign's samples, and `transformer` is untouched."""
    from diffalign.engine import step
    from diffalign.lora import lora_expert

    args = [f"data.source={pairs_file}", f"model.path={TINY22}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", str(REPO / "configs/tiny/wan_dpo.yaml"), *args, f"train.output_dir={tmp_path / 'x'}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "two-expert folder" in lines[0] and "model.expert=high or low" in lines[0]

    fam = tiny(TINY22)
    spans = {}
    for expert in ("high", "low"):
        fam.choose_expert(expert)
        spans[expert] = fam.expert_timesteps()
        t = torch.arange(*spans[expert])
        above = fam.schedule.model_timestep(t) >= fam.boundary
        assert bool(above.all()) if expert == "high" else not bool(above.any())
    assert spans["low"][1] == spans["high"][0] and spans["low"][0] == 0 and spans["high"][1] == 1000

    drawn = []
    draw = step.draw_t_and_eps

    def recorded(*a, **kw):
        t, eps = draw(*a, **kw)
        drawn.extend(t.tolist())
        return t, eps

    step.draw_t_and_eps = recorded
    try:
        run = tmp_path / "low"
        assert main(["train", str(REPO / "configs/tiny/wan_dpo.yaml"), *args, "model.expert=low",
                     f"train.output_dir={run}"]) == 0  # fmt: skip
    finally:
        step.draw_t_and_eps = draw
    assert drawn and all(spans["low"][0] <= t < spans["low"][1] for t in drawn)
    file = run / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_expert(file) == "low"

    ours = tiny(TINY22)
    load_lora(ours, run / "lora")  # into transformer_2, as the file says
    assert not any("lora" in n for n, _ in ours.pipe.transformer.named_parameters())
    seeds = [1, 2]
    sample = FlowSDESampler.for_family(ours, 4, 0.0).sample(ours, PROMPTS, seeds, 5.0, keep_trajectory=False).x0
    pipe = euler_pipe(TINY22)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=PX, width=PX, num_frames=FRAMES, output_type="latent")
    base = pipe(PROMPTS, latents=initial_noise(seeds, ours.latent_shape()), **kw).frames
    pipe.load_lora_weights(run / "lora", load_into_transformer_2=True)
    tuned = pipe(PROMPTS, latents=initial_noise(seeds, ours.latent_shape()), **kw).frames
    assert (base - tuned).abs().max() > 1e-4  # the low-noise LoRA changed the samples
    torch.testing.assert_close(sample, tuned, rtol=1e-5, atol=1e-5)


ONLINE = {  # objective -> its overrides on top of a one-round tiny run
    "grpo": [],  # configs/wan_grpo.yaml as shipped: SDE window of one step, frame-mean reward
    "nft": ["objective.name=nft", "sampling.eta=0", "sampling.shared_noise=false", "sampling.guidance=5.0"],
    "d3po": ["objective.name=d3po", "pairing.split=all_pairs", "sampling.eta=0.7", "sampling.guidance=2.0"],
    "dragon": ["objective.name=dpo", "pairing.split=best_worst", "sampling.eta=0.7", "sampling.guidance=2.0"],
}


@pytest.mark.parametrize("objective", list(ONLINE))
def test_online_round_on_wan_through_the_cli_with_a_frame_averaged_reward(tmp_path, monkeypatch, objective):
    """`diffalign online` on the tiny Wan: 5-frame videos sampled by the flow SDE sampler (GRPO, D3PO: log-probs on
    5-D latents; DRAGON) or the ODE under the old adapter (NFT), each frame scored by toy_aesthetic and averaged."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    config = [str(REPO / "configs" / "wan_grpo.yaml")] if objective == "grpo" else []
    args = ["online", *config, f"model.path={TINY}", f"model.resolution={PX}", f"model.num_frames={FRAMES}"]
    args += ["model.dtype=float32", "train.mixed_precision=no", *ONLINE[objective]]
    args += ["online.rounds=1", "sampling.prompts_per_round=2", "sampling.images_per_prompt=2", "sampling.steps=4"]
    args += ["sampling.sample_batch=4", "train.steps_per_round=1", "train.batch_size=2", "train.grad_accum=1"]
    args += [f"sampling.prompts={prompts}", "reward.scorer=toy_aesthetic", "reward.args={}", "reward.monitor=[]"]
    args += ["train.tensorboard=false", "eval.prompts=", "guards.every=0", f"train.output_dir={out}"]
    assert main(args) == 0
    row = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train/loss"]) and row["skipped_steps"] == 0
    if objective in ("d3po", "dragon"):  # policy == reference at LoRA init
        assert math.isclose(row["train/loss"], math.log(2), rel_tol=1e-4)
    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("transformer.") and "ffn.net.2" in k for k in f.keys())


def test_comfyui_export_loads_in_wan_pipeline_as_the_same_network(tmp_path):
    """`diffalign export format=kohya` on a Wan LoRA writes the original / ComfyUI names with lora_A / lora_B and
    alpha; WanPipeline.load_lora_weights reads that file into the same network as diffalign's own LoRA."""
    fam = tiny()
    random_lora(fam, fam.lora_target_modules)
    _, comfy, keys, (alpha,) = export_kohya(fam, tmp_path, "diffusion_model.blocks.1.cross_attn.o.alpha")
    assert {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
        "diffusion_model.blocks.0.cross_attn.v.lora_B.weight",
        "diffusion_model.blocks.1.ffn.0.lora_A.weight",
        "diffusion_model.blocks.1.ffn.2.alpha",
    } <= keys and float(alpha) == 8.0
    assert len(keys) == 2 * 10 * 3  # 2 blocks x 10 modules x (A, B, alpha)
    pipe = WanPipeline.from_pretrained(TINY)
    pipe.load_lora_weights(str(comfy))
    plain = WanFamily(pipe, dict(pipe.vae.config), torch.float32)
    xt, t, cond = inputs(fam)
    with torch.no_grad():
        torch.testing.assert_close(plain.denoise(xt, t, cond), fam.denoise(xt, t, cond), rtol=0, atol=1e-5)


def test_guards_watch_frame_consistency_and_frame_averaged_scores_on_wan(pairs_file, tmp_path, monkeypatch):
    """Guards inside `diffalign train` on the tiny Wan: the held-out videos (5 frames) are measured by the
    frame_consistency monitor and a frame-averaged scorer monitor at step 0 (the base) and after each step."""
    monkeypatch.chdir(REPO)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    out = tmp_path / "run"
    monitors = "guards.monitors={flicker: {kind: frame_consistency, rule: max_rise, limit: 100}, sat: {kind: saturation, limit: 1}}"
    args = [
        "train",
        str(REPO / "configs/tiny/wan_dpo.yaml"),
        f"data.source={pairs_file}",
        f"model.num_frames={FRAMES}",
    ]
    args += ["guards.every=1", f"guards.prompts={prompts}", "guards.images_per_prompt=2", "guards.steps=2", monitors]
    assert main([*args, f"train.output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "guards.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["passed"] for r in rows)
    assert all(r["flicker"] > 0 and 0 <= r["sat"] <= 1 and math.isfinite(r["reward"]) for r in rows)
