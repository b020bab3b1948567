"""Images/s of diffalign's sampler vs the plain diffusers pipeline, same model, settings, seeds and scheduler.

    python benchmarks/sampling.py                      # tiny SD1.5, SDXL, SD3 (+ the toy model if assets/toy_model)
    python benchmarks/sampling.py --models sd3 --images 8 --steps 10

Rows per model (run interleaved, median over --rounds after one warm-up round; prompts -> PIL images each):
  diffusers pipeline   `pipe(prompt=..., generator=[one per seed], output_type="pil")` with the inference scheduler
                       set to the one diffalign's sampler builds (DDIM from the family's training scheduler config)
  diffalign sample()   `diffalign.sampling.sample(family, ...)` -> `family.decode` -> the pipeline's postprocess
  family.generate      what `diffalign generate` calls (SD/SDXL: the pipeline to latents + `family.decode`)
Flow models (SD3) run the pipeline with its own FlowMatchEulerDiscreteScheduler against diffalign's flow sampler
(diffalign.sampling.flow_sde) at noise level 0 (the same Euler steps: max |diff| should be 0) and at 0.7 with every step's
latent and log-prob kept (what an on-line GRPO round samples with).
The toy model (pixel space) has no diffusers pipeline class; its baseline row is a plain loop over the same
diffusers components (tokenizer, text encoder, UNet, DDIMScheduler) with no diffalign code in it.
Ratio = diffalign images/s / baseline images/s (target >= 0.9). "max |diff|" compares the uint8 images of a row
with the baseline's (0 = the same images; the SDXL pipeline is set to encode the empty negative prompt as
sample() does, not to use its default zero embeddings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_io import machine, write_results  # noqa: E402

from diffalign.models import load_family  # noqa: E402
from diffalign.models.toy import add_coords, to_pil  # noqa: E402
from diffalign.paths import TOY_MODEL  # noqa: E402
from diffalign.sampling import initial_noise, sample  # noqa: E402
from diffalign.sampling.flow_sde import FlowSDESampler  # noqa: E402

MODELS = {
    "sd15": REPO / "assets/tiny/sd15",
    "sdxl": REPO / "assets/tiny/sdxl",
    "sd3": REPO / "assets/tiny/sd3",
    "toy": TOY_MODEL,
}
PROMPTS = ["a photo of a red cat", "a blue square at the left", "a painting of a dog", "a green circle"]
TARGET = 0.9


def ddim(family) -> DDIMScheduler:
    """The inference scheduler diffalign.sampling.sample builds by default."""
    return DDIMScheduler.from_config(family.scheduler.config)


@torch.no_grad()
def plain_loop(family, prompts, seeds, steps, guidance, height, width):
    """The toy baseline: diffusers components only (what a pipeline's __call__ does), images in [-1, 1].

    The one piece of diffalign in it is `add_coords`, part of the toy model's input definition (two coordinate
    channels appended to x_t)."""
    tok, enc, unet = family.tokenizer, family.text_encoder, family.denoiser

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return enc(ids.input_ids.to(enc.device)).last_hidden_state

    embeds = torch.cat([embed([""] * len(prompts)), embed(list(prompts))])  # (2N, 77, D): [uncond; cond]
    scheduler = ddim(family)
    scheduler.set_timesteps(steps)
    shape = (unet.config.out_channels, height, width)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    for t in scheduler.timesteps:
        pred = unet(add_coords(torch.cat([x, x])), t, encoder_hidden_states=embeds).sample  # + 2 coordinate channels
        uncond, cond = pred.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x.clamp(-1, 1)


def toy_rows(family, steps: int, guidance: float, size: int) -> dict:
    kw = dict(steps=steps, guidance=guidance, height=size, width=size)
    return {
        "plain diffusers loop": lambda p, s: to_pil(plain_loop(family, p, s, **kw)),
        "diffalign sample()": lambda p, s: to_pil(family.decode(sample(family, p, s, **kw))),
    }


def flow_rows(family, steps: int, guidance: float, size: int) -> dict:
    """SD3: the pipeline (its own flow-matching Euler scheduler) vs the flow sampler, ODE and SDE with log-probs."""
    pipe = family.pipe
    ode = FlowSDESampler.for_family(family, steps, 0.0)
    sde = FlowSDESampler.for_family(family, steps, 0.7)
    h = size // family.vae_scale_factor

    def pipeline(p, s):
        x1 = initial_noise(s, (family.latent_channels, h, h))  # the pipeline's generators draw other numbers
        return pipe(
            prompt=p, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, latents=x1
        ).images

    def ours(sampler, **kw):
        def run(p, s):
            x0 = sampler.sample(family, p, s, guidance, height=size, width=size, **kw).x0
            return pipe.image_processor.postprocess(family.decode(x0.to(family.denoiser.device)), output_type="pil")

        return run

    return {
        "diffusers pipeline": pipeline,
        "diffalign sample()": ours(ode, keep_trajectory=False),
        "flow SDE + log-probs": ours(sde),
    }


def rows_for(name: str, family, steps: int, guidance: float, size: int) -> dict:
    """name -> callable(prompts, seeds) -> list of PIL images."""
    kw = dict(steps=steps, guidance=guidance, height=size, width=size)
    if name in SPECIAL_ROWS:
        return SPECIAL_ROWS[name](family, steps, guidance, size)
    pipe = family.pipe
    pipe.scheduler = ddim(family)  # the pipeline and family.generate then run the sampler's scheduler
    if family.name == "sdxl":  # encode the empty negative prompt as sample() does, instead of zero embeddings
        pipe.register_to_config(force_zeros_for_empty_prompt=False)

    def pipeline(p, s):
        generators = [torch.Generator().manual_seed(seed) for seed in s]
        return pipe(
            prompt=p, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=generators
        ).images

    def ours(p, s):
        return pipe.image_processor.postprocess(family.decode(sample(family, p, s, **kw)), output_type="pil")

    return {
        "diffusers pipeline": pipeline,
        "diffalign sample()": ours,
        "family.generate": lambda p, s: family.generate(p, s, **kw),
    }


SPECIAL_ROWS = {"toy": toy_rows, "sd3": flow_rows}  # models whose rows are not the DDIM pipeline's
SAMPLER_LABEL = {"sd3": "flow Euler"}  # the others: DDIM


def bench_model(name: str, args) -> dict:
    family = load_family(str(MODELS[name]))
    size = args.size or family.resolution
    prompts = (PROMPTS * args.images)[: args.images]
    seeds = list(range(args.images))
    rows = rows_for(name, family, args.steps, args.guidance, size)
    times = {row: [] for row in rows}
    images = {}
    for r in range(1 + args.rounds):
        for row, fn in rows.items():
            t0 = time.perf_counter()
            images[row] = fn(prompts, seeds)
            if r:
                times[row].append(time.perf_counter() - t0)
    base_row = next(iter(rows))
    base = np.stack([np.asarray(im) for im in images[base_row]]).astype(int)
    out = {}
    for row in rows:
        median = statistics.median(times[row])
        diff = int(np.abs(np.stack([np.asarray(im) for im in images[row]]).astype(int) - base).max())
        out[row] = {"median_s": median, "images_per_s": args.images / median, "max_abs_diff_uint8": diff}
    base_ips = out[base_row]["images_per_s"]
    for res in out.values():
        res["ratio"] = res["images_per_s"] / base_ips
    print(
        f"\nsampling | {name} ({MODELS[name]}) | {args.images} images {size}px | {args.steps} steps "
        f"{SAMPLER_LABEL.get(name, 'DDIM')} | guidance {args.guidance} | median of {args.rounds}"
    )
    print(f"{'row':22} {'s/batch':>8} {'images/s':>9} {'ratio':>6} {'max |diff|':>11}")
    for row, res in out.items():
        print(
            f"{row:22} {res['median_s']:8.3f} {res['images_per_s']:9.2f} {res['ratio']:6.2f} "
            f"{res['max_abs_diff_uint8']:11d}"
        )
    ratio = out["diffalign sample()"]["ratio"]
    print(
        f"diffalign sample() / {base_row}: {ratio:.2f} (target >= {TARGET}: {'ok' if ratio >= TARGET else 'MISSED'})"
    )
    return {"size": size, "rows": out}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl,sd3,toy", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--size", type=int, default=0, help="pixels (0: the model's native size)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model '{name}' (known: {', '.join(MODELS)})")
        if not (MODELS[name] / "model_index.json").is_file():
            print(f"\nsampling | {name}: {MODELS[name]} not present, skipped")
            continue
        results[name] = bench_model(name, args)
    out = {"machine": machine(), "settings": vars(args), "models": results, "target": TARGET}
    return write_results(out, args.json, "sampling.json")


if __name__ == "__main__":
    main()
