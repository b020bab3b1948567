"""Train the toy world's base text-to-image model from scratch and save it in diffusers format.

    nice -n 10 python assets/make_toy_model.py --out assets/toy_model            # 30-50 min on 2 CPU cores

What it builds (a few MB):
- tokenizer/     CLIPTokenizer in which every world word is one token (diffalign.models.tokenizers)
- text_encoder/  CLIPTextModel, hidden 64, 2 layers, trained jointly with the UNet
- unet/          UNet2DConditionModel in PIXEL space (3 + 2 coordinate channels -> 3, 32x32; the coordinates give
                 explicit absolute position, see diffalign.models.toy.add_coords); cross-attention only at 8x8
                 (last down block, mid, first up block) because attention at 16x16 doubled the step time; plus
                 `addition_embed_type="text"` (attention-pooled prompt added to the time embedding), a global
                 conditioning path that lets every ResNet see the prompt (colour was right after ~500 steps)
- scheduler/     DDPMScheduler, squaredcos_cap_v2, v-prediction (why: see build_components), trailing spacing
- model_index.json with `_class_name: DiffalignToyPipeline` (diffalign.models maps it to ToyFamily)

Training: fresh rendered batches every step (diffalign.toy.shapes; no dataset on disk), 10% empty captions for
classifier-free guidance, AdamW with linear warm-up and cosine decay, the plain (unweighted) v-prediction MSE
(why not min-SNR: see build_components), gradient clipping, and an EMA of the weights, which is what gets saved. Every `--checkpoint-minutes` the EMA weights are also saved to
`--checkpoint-dir`/step-N so sample quality can be measured while it runs (assets/make_toy_data.py --eval-only).
The CPU may be shared, so `--max-minutes` stops the run early (and saves) if it is too slow; training_info.json
records the steps actually done.
Everything is seeded (torch, numpy); results differ across machines only by floating-point non-determinism.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

# Shared CPUs: OpenMP threads that spin while waiting for a descheduled sibling wasted ~4x the CPU time here
# (7.9 s/step instead of 0.6 under load); sleeping waits cost little when the machine is idle. Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from diffalign.models.tokenizers import build_clip_tokenizer  # noqa: E402
from diffalign.models.toy import COORD_CHANNELS, add_coords  # noqa: E402
from diffalign.toy import shapes  # noqa: E402

MODEL_INDEX = {
    "_class_name": "DiffalignToyPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
}


def build_components(seed: int):
    """Fresh tokenizer, text encoder, UNet and scheduler for the toy world (weights from `seed`)."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(shapes.WORDS)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=shapes.RESOLUTION,
        in_channels=3 + COORD_CHANNELS,  # xt + (x, y) coordinate channels: see diffalign.models.toy.add_coords
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),  # 32x32, 16x16, 8x8
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),  # 8x8, 16x16, 32x32
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    # Loss: plain v-MSE = (1 + SNR) * x0-MSE, so high-noise steps, where the layout is decided, keep weight >= 1.
    # Min-SNR-5 weighting (x0 weight min(SNR, 5), ~0 at high noise) learnt colour, shape and size but never position:
    # after 700-1100 steps the prediction was identical for all five position words; without it, it follows them
    # (x0 estimate at t=999 centred on the right anchor) after 675 steps.
    # v-prediction, not epsilon: with the cosine schedule an epsilon model's x0 estimate at the first sampling steps
    # (alpha_bar 2e-9 at t=999, 6e-3 at t=949) divides its error by sqrt(alpha_bar), and the clipped junk set a
    # random background colour (the first run, 870 steps: purple/orange backgrounds, position accuracy at chance).
    # v is well-posed at every t (at t=T it is -x0). "trailing" spacing makes samplers start at t=999; clip_sample
    # clips x0 estimates to the pixel range. Neither affects training.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        timestep_spacing="trailing",
    )
    return tokenizer, text_encoder, unet, scheduler


def save(out: Path, tokenizer, text_encoder, unet, scheduler, info: dict, index: dict = MODEL_INDEX) -> None:
    """A toy model folder: the components, `index` as model_index.json (the pipeline class), training_info.json."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    text_encoder.save_pretrained(out / "text_encoder")
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_loop(args, models, ema, tokenizer, text_encoder, scheduler, ckpt_dir: Path, loss_of, index=MODEL_INDEX):
    """The toy programs' shared loop: render a batch of shapes, `loss_of(x0 (B, 3, H, W) in [-1, 1], text states
    (B, 77, 64), generator)`, AdamW with warm-up + cosine (`lr_at`), clipping at 1, an EMA of the weights, a log line
    every 25 steps, EMA checkpoints every --checkpoint-minutes, a --max-minutes guard.
    Returns (last step index, last logged loss, start time)."""
    opt = torch.optim.AdamW(models.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = last_ckpt = time.time()
    running, last_loss, step = [], float("nan"), 0
    for step in range(args.steps):
        images, captions = shapes.render_batch(rng, args.batch_size, args.empty_fraction)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # (B, H, W, 3) [0,1] -> (B, 3, H, W) [-1,1]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        cond = text_encoder(ids.input_ids).last_hidden_state  # (B, 77, 64)
        loss = loss_of(x0, cond, gen)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, q in zip(ema.parameters(), models.parameters()):
                e.lerp_(q, 1 - decay)

        running.append(loss.item())
        if (step + 1) % 25 == 0:
            elapsed = time.time() - start
            print(
                f"step {step + 1}/{args.steps} loss {np.mean(running):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{elapsed / (step + 1):.2f}s/step elapsed {elapsed / 60:.1f}min",
                flush=True,
            )
            last_loss, running = float(np.mean(running)), []
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            last_ckpt = time.time()
            info = {"step": step + 1, "minutes": (time.time() - start) / 60}
            save(ckpt_dir / f"step-{step + 1}", tokenizer, ema["text_encoder"], ema["unet"], scheduler, info, index)
            print(f"checkpoint {ckpt_dir / f'step-{step + 1}'}", flush=True)
        if time.time() - start > args.max_minutes * 60:  # the CPU is shared: bound the wall-clock time
            print(f"stopping at step {step + 1}: past --max-minutes {args.max_minutes}", flush=True)
            break
    return step, last_loss, start


def add_train_args(p: argparse.ArgumentParser, *, out: str, steps: int, lr: float, warmup: int, ema: float,
                   checkpoint_minutes: float, checkpoint_dir: str, max_minutes: float) -> None:  # fmt: skip
    """The training flags both toy programs take (this one and assets/make_toy_flow_model.py), with their defaults."""
    p.add_argument("--out", default=out)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--ema", type=float, default=ema, help="final EMA decay (warmed up as (1+n)/(10+n))")
    p.add_argument("--empty-fraction", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-minutes", type=float, default=checkpoint_minutes)
    p.add_argument("--checkpoint-dir", default=checkpoint_dir, help="intermediate EMA weights")
    p.add_argument(
        "--max-minutes", type=float, default=max_minutes, help="stop early (and save) past this wall-clock time"
    )
    p.add_argument("--seed", type=int, default=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_train_args(p, out="assets/toy_model", steps=2400, lr=1e-3, warmup=100, ema=0.995, checkpoint_minutes=10.0,
                   checkpoint_dir="runs/toy_base_checkpoints", max_minutes=48.0)  # fmt: skip
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_dir = Path(args.checkpoint_dir)
    tokenizer, text_encoder, unet, scheduler = build_components(args.seed)
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = copy.deepcopy(models).requires_grad_(False)
    n_params = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}
    print(f"params: {n_params}", flush=True)

    def v_loss(x0, cond, gen):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = scheduler.add_noise(x0, eps, t)
        pred = unet(add_coords(xt), t, encoder_hidden_states=cond).sample  # (B, 3 + 2, H, W) -> (B, 3, H, W)
        target = scheduler.get_velocity(x0, eps, t)  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        return (pred - target).pow(2).mean()  # (B, 3, H, W) -> ()

    step, last_loss, start = train_loop(args, models, ema, tokenizer, text_encoder, scheduler, ckpt_dir, v_loss)

    info = {
        "command": "python assets/make_toy_model.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "steps_done": step + 1,
        "minutes": round((time.time() - start) / 60, 1),
        "params": n_params,
        "final_loss": round(last_loss, 4),
    }
    save(out, tokenizer, ema["text_encoder"], ema["unet"], scheduler, info)
    print(f"saved {out} {info}", flush=True)


if __name__ == "__main__":
    main()
