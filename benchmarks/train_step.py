"""One Diffusion-DPO LoRA train step, three ways, on the same model and the same batches, in one process.

    python benchmarks/train_step.py --size tiny                       # tiny SDXL-shaped (assets/tiny/sdxl), CPU
    python benchmarks/train_step.py --size sd15 --steps 5             # SD1.5-size UNet, random weights, 32x32 latents
    python benchmarks/train_step.py --size sdxl --device cuda --precision bf16 --dtype bfloat16   # GPU only

Rows (run interleaved a, b, c, a, b, c, ...; median over --steps rounds after --warmup rounds):
  (a) diffalign's default path: the functions the `pipelines/train.py` loop calls (`micro_step`, `finish_step`,
      `read_sums` from diffalign/engine/step.py) on pairs from the latent + text cache (`CachedPairs`, no VAE or text
      encoder in the step): `denoising_errors` with the reference = the same UNet with LoRA off (`reference_mode`),
      one stacked [w; l] forward each, `DiffusionDPO`, accelerate backward / clipping / AdamW, one host sync.
  (b) the naive research recipe: decode the images, VAE-encode winners and losers and run the text encoder(s)
      every step; the reference is a frozen deep copy of the UNet; winner and loser go through separate forwards.
  (c) the compute floor: policy forward + reference forward (LoRA off) + backward on ready x_t and embeddings;
      no data loading, no optimizer step, no copies.

Memory per row = held + step peak: "held" is the bytes of the weights, buffers and optimizer state that row needs
(a: UNet + LoRA + AdamW state; b: the same + the reference copy + VAE + text encoders; c: UNet + LoRA), "step peak"
the largest extra memory during one step (CPU: VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS
before the step, with freed heap handed back by malloc_trim first; CUDA: max_memory_allocated minus
memory_allocated before the step). The sum is what a process running only that row needs beyond the Python and
library baseline. Linux only (reads /proc).

Sizes (random weights, nothing is downloaded):
  tiny: assets/tiny/sdxl as shipped (1 M-param UNet, tiny VAE and text encoders), 64 px -> 8x8 latents, 2 pairs.
  sd15: SD1.5 UNet config (860 M), real-size SD VAE (84 M) and CLIP-L text encoder (123 M) configs, random init,
        with the tiny word-list tokenizer; 256 px -> 32x32 latents, 1 pair.
  sdxl: SDXL-base UNet config (2.6 B), SDXL VAE, CLIP-L + OpenCLIP-bigG text encoder configs; 1024 px -> 128x128
        latents, 1 pair. GPU only (measured on a 2-core CPU: about 100 s/step and 16 GB).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import io
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "diffalign-bench-hf-datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_io import machine, write_results  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from diffalign.config import ObjectiveConfig, RunConfig, from_dict, load_config  # noqa: E402
from diffalign.data import CachedPairs, PreferencePairs, build_cache, collate, load_preferences  # noqa: E402
from diffalign.data.sampler import EpochView, ResumableSampler  # noqa: E402
from diffalign.engine.common import build_objective  # noqa: E402
from diffalign.engine.run import Run  # noqa: E402
from diffalign.engine.step import draw_t_and_eps, family_inputs, finish_step, micro_step, read_sums  # noqa: E402
from diffalign.likelihood import Schedule  # noqa: E402
from diffalign.lora import reference_mode  # noqa: E402
from diffalign.sources.pairs import Pairs  # noqa: E402

GIB = 1024**3
# size -> (pixel resolution, pairs per step, beta)
SIZES = {"tiny": (64, 2, 5000.0), "sd15": (256, 1, 2000.0), "sdxl": (1024, 1, 5000.0)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LABELS = {
    "a": "(a) diffalign: cache, LoRA-off ref, stacked",
    "b": "(b) naive: encoders, ref copy, split w/l",
    "c": "(c) floor: fwd + ref fwd + bwd",
}
TARGETS = {"a/b time": 0.5, "a/b memory": 1.0, "a/c time": 1.15}


# ---------------------------------------------------------------------------------------------------------------
# Models (random weights; the tiny one is the shipped folder)


def _sd_vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # the SD1.5 / SDXL VAE config (84 M params)
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    ).eval()


def _clip_text(tokenizer, hidden: int, layers: int, heads: int, act: str, with_projection: bool, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,  # CLIPTextModel pools at the first eos id
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval().to(dtype)


def build_family(size: str, device: torch.device, dtype: torch.dtype):
    """The family object of `size` with VAE and text encoders (the naive row and the cache build need them)."""
    if size == "tiny":
        from diffalign.models import load_family

        return load_family(str(REPO / "assets/tiny/sdxl"), dtype=dtype).to(device)

    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from diffalign.models.sd import SDFamily
    from diffalign.models.sdxl import SDXLFamily
    from diffalign.models.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer("a photo of cat dog red blue painting".split(), model_max_length=77)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if size == "sd15":
        with torch.device(device):  # random init directly on the target device (fast on a GPU)
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the other defaults are SD1.5's
            vae = _sd_vae(0.18215, False)
            text_encoder = _clip_text(tokenizer, 768, 12, 12, "quick_gelu", False, dtype)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet if dtype == torch.float32 else unet.to(dtype),  # to() warns even for a no-op
            scheduler=DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return SDFamily(pipe, dict(vae.config), dtype)
    with torch.device(device):
        unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = _sd_vae(0.13025, True)
        text_encoder = _clip_text(tokenizer, 768, 12, 12, "quick_gelu", False, dtype)
        text_encoder_2 = _clip_text(tokenizer, 1280, 32, 20, "gelu", True, dtype)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet if dtype == torch.float32 else unet.to(dtype),
        scheduler=EulerDiscreteScheduler(**schedule, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    return SDXLFamily(pipe, dict(vae.config), dtype)


# ---------------------------------------------------------------------------------------------------------------
# Data: a parquet of random pairs -> raw pairs (naive row) and the latent cache (diffalign row)


def write_pairs(path: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """n Pick-a-Pic-shaped rows of smooth random JPEGs at `resolution` px."""
    rng = np.random.default_rng(seed)

    def jpeg() -> bytes:
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    rows = {"caption": [f"a photo of a red cat {i}" for i in range(n)], "jpg_0": [], "jpg_1": []}
    for _ in range(n):
        rows["jpg_0"].append(jpeg())
        rows["jpg_1"].append(jpeg())
    rows["label_0"], rows["label_1"] = [1.0] * n, [0.0] * n
    pq.write_table(pa.table(rows), path)
    return path


def endless(dataset, batch_size: int, seed: int = 0):
    """Batches exactly as pipelines/train.py draws them (ResumableSampler + EpochView + collate, no workers)."""
    sampler = ResumableSampler(len(dataset), seed=seed, with_epoch=True)
    return iter(DataLoader(EpochView(dataset), batch_size=batch_size, sampler=sampler, collate_fn=collate))


# ---------------------------------------------------------------------------------------------------------------
# Memory


class MemoryProbe:
    """Extra memory of one call (see the module docstring): `with probe: step()`, then `probe.peak` in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process_peak = 0  # largest absolute value seen at a step's end (VmHWM / max_memory_allocated)
        if device.type == "cpu":
            self._libc = ctypes.CDLL("libc.so.6")  # glibc malloc_trim: freed heap back to the OS
            with open("/proc/self/clear_refs", "w") as f:  # raise now, not in the middle of a run
                f.write("5")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._libc.malloc_trim(0)
            self._before = self._status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            absolute = torch.cuda.max_memory_allocated()
        else:
            absolute = self._status("VmHWM")
        self.peak = absolute - self._before
        self.process_peak = max(self.process_peak, absolute)


def held_bytes(modules: list, optimizers: list = ()) -> int:
    """Bytes of the distinct tensors held by `modules` (params + buffers) and `optimizers` (state)."""
    seen, total = set(), 0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ---------------------------------------------------------------------------------------------------------------
# The bench: one model, three step functions


class Bench:
    """Shared state of the three rows: family (policy UNet + LoRA), reference copy, data iterators, optimizers."""

    def __init__(self, args, run: Run, workdir: Path):
        """The policy, its LoRA, optimizer, schedule and step context come from the programs' own Run (a)."""
        self.args, self.run, self.accelerator = args, run, run.accelerator
        self.device = run.device
        resolution, default_pairs, default_beta = SIZES[args.size]
        self.pairs = args.pairs or default_pairs
        t0 = time.perf_counter()
        family = build_family(args.size, self.device, DTYPES[args.dtype])
        self.init_s = time.perf_counter() - t0
        self.family = family
        self.schedule = Schedule(family.scheduler, family.prediction_type)
        self.objective = build_objective(
            from_dict(ObjectiveConfig, {"name": "dpo", "beta": args.beta or default_beta})
        )
        self.estimator = run.cfg.estimator
        self.train_cfg = tc = run.opt

        # Data: the same pairs, raw (b) and cached (a); both iterate them in the same order.
        parquet = write_pairs(workdir / "pairs.parquet", max(4, 2 * self.pairs), resolution)
        raw = PreferencePairs(load_preferences(str(parquet)), resolution)
        build_cache(family, raw, workdir / "cache", model_path=f"benchmark-{args.size}", progress=False)
        self.cached = CachedPairs(workdir / "cache")
        self.iter_a = endless(self.cached, self.pairs)
        self.iter_b = endless(raw, self.pairs)

        self.ref_copy = None
        if "b" in args.rows:  # (b)'s reference: a frozen copy of the base UNet, made before the LoRA exists
            self.ref_copy = copy.deepcopy(family.denoiser).requires_grad_(False).eval()
        else:  # as pipelines/train.py from a finished cache: no VAE or text encoders in memory
            for name in [n for n in ("vae", "text_encoder", "text_encoder_2") if n in family.pipe.components]:
                setattr(family.pipe, name, None)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        run.load_model(family=family, reference="base")  # gradient checkpointing (before the LoRA), LoRA
        self.params, self.reference = run.params, run.reference
        run.build_optimizer(10**6)
        self.lr_a = run.lr_scheduler
        self.opt_b = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        # accelerate patches forward() with autocast when mixed_precision="bf16"; the copy gets the same treatment
        self.ctx = run.prepare(Pairs(), objective=self.objective, schedule=self.schedule, estimator=self.estimator)
        self.prepared, self.opt_a = run.prepared, run.optimizer
        if self.ref_copy is not None:
            self.ref_copy = self.accelerator.prepare(self.ref_copy)
        self.gen = torch.Generator().manual_seed(0)
        self.sums: dict[str, float] = {}
        self._floor_inputs()

    def _floor_inputs(self) -> None:
        """(c)'s ready inputs: x_t, target and the exact UNet call (args, kwargs) family.denoise makes."""
        x0, cond, _ = family_inputs(self.family, next(endless(self.cached, self.pairs)), self.device)
        t, eps = draw_t_and_eps(True, x0, self.schedule, torch.Generator().manual_seed(1), self.estimator)
        xt, self.floor_target = self.schedule.add_noise(x0, eps, t), self.schedule.target(x0, eps, t)
        captured = {}

        def capture(module, args, kwargs):
            captured["call"] = (args, kwargs)

        hook = self.family.denoiser.register_forward_pre_hook(capture, with_kwargs=True)
        with torch.no_grad():
            self.family.denoise(xt, t, cond)
        hook.remove()
        self.floor_call = captured["call"]

    # ---- (a) the pipelines/train.py loop body, grad_accum = 1: the same functions (diffalign/engine/step.py) --------
    def step_a(self, amp=nullcontext) -> float:
        with amp():
            sums = micro_step(self.accelerator, self.prepared, self.ctx, next(self.iter_a), {})
        finish_step(self.accelerator, self.ctx, sums)
        metrics = read_sums(sums)  # the loop's per-step metric read
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.lr_a.step()
        return metrics["loss"]

    # ---- (b) the naive recipe ------------------------------------------------------------------------------------
    @contextmanager
    def _as_reference_copy(self):
        """family.denoise runs the frozen copy inside the block (same conditioning code, other network)."""
        policy, self.family.denoiser = self.family.denoiser, self.ref_copy
        try:
            yield
        finally:
            self.family.denoiser = policy

    def step_b(self, amp=nullcontext) -> float:
        family, schedule, beta = self.family, self.schedule, self.objective.beta
        batch = next(self.iter_b)
        with amp():
            with torch.no_grad():
                x0_w = family.encode_images(batch["pixels_w"].to(self.device))  # VAE every step, winners ...
                x0_l = family.encode_images(batch["pixels_l"].to(self.device))  # ... and losers
                prompt_cond = family.encode_prompts(batch["prompt"])  # text encoder(s) every step
            cond_w = {**prompt_cond, "size_info": batch["size_info_w"].to(self.device)}
            cond_l = {**prompt_cond, "size_info": batch["size_info_l"].to(self.device)}
            b = x0_w.shape[0]
            t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=self.gen).to(self.device)
            eps = torch.randn(x0_w.shape, generator=self.gen).to(x0_w)
            xt_w, xt_l = schedule.add_noise(x0_w, eps, t), schedule.add_noise(x0_l, eps, t)
            target_w, target_l = schedule.target(x0_w, eps, t), schedule.target(x0_l, eps, t)
            with torch.no_grad(), self._as_reference_copy():
                ref_w = F.mse_loss(family.denoise(xt_w, t, cond_w).float(), target_w, reduction="none").mean((1, 2, 3))
                ref_l = F.mse_loss(family.denoise(xt_l, t, cond_l).float(), target_l, reduction="none").mean((1, 2, 3))
            err_w = F.mse_loss(family.denoise(xt_w, t, cond_w).float(), target_w, reduction="none").mean((1, 2, 3))
            err_l = F.mse_loss(family.denoise(xt_l, t, cond_l).float(), target_l, reduction="none").mean((1, 2, 3))
            loss = -F.logsigmoid(-0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.train_cfg.max_grad_norm)
        self.opt_b.step()
        self.opt_b.zero_grad(set_to_none=True)
        return loss.item()

    # ---- (c) the floor ---------------------------------------------------------------------------------------------
    def step_c(self, amp=nullcontext) -> float:
        denoiser, (args, kwargs), target = self.family.denoiser, self.floor_call, self.floor_target
        with amp():
            with torch.no_grad(), reference_mode(denoiser):
                ref_err = (denoiser(*args, **kwargs).sample.float() - target).pow(2).flatten(1).mean(1)
            err = (denoiser(*args, **kwargs).sample.float() - target).pow(2).flatten(1).mean(1)  # (2B,)
            (err_w, err_l), (ref_w, ref_l) = err.chunk(2), ref_err.chunk(2)
            loss = -F.logsigmoid(-0.5 * self.objective.beta * ((err_w - ref_w) - (err_l - ref_l))).mean()
        loss.backward()
        for p in self.params:
            p.grad = None
        return loss.item()

    def held(self) -> dict[str, int]:
        f = self.family
        encoders = [f.pipe.components.get(n) for n in ("vae", "text_encoder", "text_encoder_2")]
        extra = [m for m in (self.ref_copy, *encoders) if m is not None]
        return {
            "a": held_bytes([f.denoiser], [self.opt_a.optimizer]),
            "b": held_bytes([f.denoiser, *extra], [self.opt_b]),
            "c": held_bytes([f.denoiser]),
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steps: dict, probe: MemoryProbe, rounds: int, warmup: int, log=print) -> dict[str, dict]:
    """Run the step functions interleaved (a, b, c, a, b, c, ...); per name: times, step peaks, first-step time."""
    device = probe.device
    out = {name: {"times": [], "peaks": []} for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            with probe:
                t0 = time.perf_counter()
                loss = step()
                sync(device)
                dt = time.perf_counter() - t0
            if r == 0:
                out[name]["first_s"] = dt
            if r >= warmup:
                out[name]["times"].append(dt)
                out[name]["peaks"].append(probe.peak)
            log(
                f"  round {r + 1}/{warmup + rounds} {name}: {dt:.3f} s, step peak {probe.peak / GIB:.3f} GiB, "
                f"loss {loss:.4f}{' (warm-up)' if r < warmup else ''}"
            )
    for res in out.values():
        res["median_s"] = statistics.median(res["times"])
        res["min_s"] = min(res["times"])
        res["step_peak_bytes"] = max(res["peaks"])
    return out


def report(bench: Bench, results: dict, args, process_peak: int) -> dict:
    held = bench.held()
    for name, res in results.items():
        res["label"] = LABELS[name]
        res["held_bytes"] = held[name]
        res["total_bytes"] = held[name] + res["step_peak_bytes"]
    ratios = {}
    if {"a", "b"} <= results.keys():
        ratios["a/b time"] = results["a"]["median_s"] / results["b"]["median_s"]
        ratios["a/b memory"] = results["a"]["total_bytes"] / results["b"]["total_bytes"]
    if {"a", "c"} <= results.keys():
        ratios["a/c time"] = results["a"]["median_s"] / results["c"]["median_s"]
    x0 = bench.floor_call[0][0]
    settings = {
        "size": args.size,
        "device": str(bench.device),
        "precision": args.precision,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "pairs": bench.pairs,
        "latents": list(x0.shape[1:]),
        "unet_params_M": round(sum(p.numel() for p in bench.family.denoiser.parameters()) / 1e6, 1),
        "lora_params_M": round(sum(p.numel() for p in bench.params) / 1e6, 2),
        "rounds": args.steps,
        "warmup": args.warmup,
        "model_init_s": round(bench.init_s, 1),
    }
    s = settings
    print(
        f"\ntrain step | size {s['size']} (UNet {s['unet_params_M']} M, LoRA {s['lora_params_M']} M) | {s['pairs']} pair(s), "
        f"latents {'x'.join(map(str, s['latents']))} | {s['device']} {s['precision']} weights {s['dtype']} | "
        f"grad ckpt {'on' if s['gradient_checkpointing'] else 'off'} | median of {s['rounds']} after {s['warmup']} warm-up"
    )
    print(f"{'row':46} {'s/step':>8} {'min':>8} {'held GiB':>9} {'step GiB':>9} {'total GiB':>10}")
    for res in results.values():
        print(
            f"{res['label']:46} {res['median_s']:8.3f} {res['min_s']:8.3f} {res['held_bytes'] / GIB:9.3f} "
            f"{res['step_peak_bytes'] / GIB:9.3f} {res['total_bytes'] / GIB:10.3f}"
        )
    for key, value in ratios.items():
        ok = "ok" if value <= TARGETS[key] else "MISSED"
        print(f"{key:12} {value:6.3f}  (target <= {TARGETS[key]}: {ok})")
    print(f"process peak {'allocated' if bench.device.type == 'cuda' else 'RSS'}: {process_peak / GIB:.2f} GiB")
    return {
        "machine": machine(),
        "settings": settings,
        "rows": results,
        "ratios": ratios,
        "targets": TARGETS,
        "process_peak_bytes": process_peak,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="accelerate mixed precision")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights dtype of the frozen base")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--pairs", type=int, default=0, help="pairs per step (0: the size's default)")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=5, help="measured rounds (each runs every row once)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    p.add_argument("--rows", default="abc", help="which rows, e.g. 'a' alone for a clean process peak")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default="", help="write the results here (default benchmarks/results/...)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    args = p.parse_args(argv)
    if args.size == "sdxl" and not args.device.startswith("cuda"):
        p.error("--size sdxl is GPU only (about 100 s/step and 16 GB on a 2-core CPU); use --device cuda")
    return args


def bench_run(args, tmp: Path) -> Run:
    """The programs' Run for the benchmark: its accelerator (device, precision), LoRA, optimizer and schedule."""
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the Run's accelerator reads it, as `accelerate launch --cpu` sets it
    mixed = {"fp32": "no", "bf16": "bf16"}[args.precision]
    overrides = [f"train.output_dir={tmp}/run", f"train.mixed_precision={mixed}", "train.tensorboard=false"]
    overrides.append(f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}")
    cfg = load_config(RunConfig, None, overrides)
    return Run(cfg, cfg.train, "", unit="step", log_file="metrics.jsonl", default_name="run", grad_accum=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as tmp:
        bench = Bench(args, bench_run(args, Path(tmp)), Path(tmp))
        steps = {name: getattr(bench, f"step_{name}") for name in args.rows}
        probe = MemoryProbe(bench.device)
        results = measure(steps, probe, args.steps, args.warmup, log=(lambda *_: None) if args.quiet else print)
        out = report(bench, results, args, probe.process_peak)
    gc = "-gc" if args.gradient_checkpointing else ""
    name = f"train_step-{args.size}-{bench.device.type}-{args.precision}{gc}.json"
    return write_results(out, args.json, name)


if __name__ == "__main__":
    main()
