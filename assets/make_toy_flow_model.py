"""Make the toy world's flow-matching twin: the toy model (assets/toy_model) fine-tuned by rectified flow.

    nice -n 10 python assets/make_toy_flow_model.py --out assets/toy_flow_model --max-minutes 25
    python assets/make_toy_flow_model.py --eval toy_flow toy     # fidelity: 16 held-out prompts x 8 seeds, 20 steps

Same tokenizer, text encoder and UNet architecture as assets/toy_model (assets/make_toy_model.py); the scheduler is a
FlowMatchEulerDiscreteScheduler (shift 1) and the UNet learns the velocity u = eps - x0 at
x_s = (1 - s) x0 + s eps, called at timestep s * 1000 (diffalign.models.toy, `Schedule.model_timestep`).

Why a fine-tune and not a fresh 45-minute run: the v-prediction DDPM is already a flow model in disguise. With
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and s = sigma / (alpha + sigma), x_s = x_t / (alpha + sigma) is the
flow path, and its velocity is u = eps - x0 = (sigma - alpha) x_t + (alpha + sigma) v. The network differs from a flow
network only by that input scale (1 to sqrt 2), an output skip term, and a monotone remapping of the timestep
(t/T = 2/pi atan(s / (1 - s)) for the cosine schedule, within ~30% of s). So the DDPM weights, with their learnt
shapes, colours and layout, are a good initialisation, and the plain rectified-flow loss
    L = mean || u_theta(x_s, s, c) - (eps - x0) ||^2,    s ~ U{1/T, ..., 1}
only has to learn those maps. Everything else follows toy_base: fresh rendered batches, 10% empty captions (CFG),
AdamW with warm-up and cosine decay, clipping, an EMA of the weights (saved), a `--max-minutes` guard.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: see assets/make_toy_model.py

import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from make_toy_model import MODEL_INDEX, add_train_args, save, train_loop  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from diffalign.models.toy import add_coords  # noqa: E402

FLOW_MODEL_INDEX = {**MODEL_INDEX, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def evaluate_heldout(model: str, guidance: float, seeds_per_prompt: int = 8) -> dict:
    """Fidelity and aesthetic of `model` on the 16 held-out prompts x seeds 10^6 + i (make_toy_data.py's)."""
    from make_toy_data import evaluate

    from diffalign.models import load_family
    from diffalign.paths import TOY_HELDOUT

    held = [line.strip() for line in TOY_HELDOUT.read_text().splitlines() if line.strip()]
    prompts = [q for q in held for _ in range(seeds_per_prompt)]
    seeds = [10**6 + i for i in range(len(prompts))]
    return {"model": model, "guidance": guidance, **evaluate(load_family(model), prompts, seeds, 20, guidance)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="assets/toy_model", help="the DDPM toy model to start from")
    add_train_args(p, out="assets/toy_flow_model", steps=1000, lr=5e-4, warmup=20, ema=0.99, checkpoint_minutes=5.0,
                   checkpoint_dir="runs/toy_flow_checkpoints", max_minutes=25.0)  # fmt: skip
    p.add_argument("--eval", nargs="+", default=[], help="only measure these models (toy, toy_flow or folders)")
    p.add_argument("--guidance", type=float, default=1.5, help="CFG scale of --eval")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if args.eval:
        for model in args.eval:
            print(json.dumps(evaluate_heldout(model, args.guidance)), flush=True)
        return
    torch.manual_seed(args.seed)
    out, ckpt_dir = Path(args.out), Path(args.checkpoint_dir)
    tokenizer = CLIPTokenizer.from_pretrained(args.init, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.init, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    big_t = scheduler.config.num_train_timesteps
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).train()
    ema = copy.deepcopy(models).requires_grad_(False)

    def flow_loss(x0, cond, gen):
        sigma = (torch.randint(0, big_t, (x0.shape[0],), generator=gen) + 1).float() / big_t  # (B,) in (0, 1]
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        pred = unet(add_coords(xt), sigma * big_t, encoder_hidden_states=cond).sample  # (B, 3, H, W)
        return (pred - (eps - x0)).pow(2).mean()  # rectified flow: velocity eps - x0; (B, 3, H, W) -> ()

    step, last_loss, start = train_loop(
        args, models, ema, tokenizer, text_encoder, scheduler, ckpt_dir, flow_loss, FLOW_MODEL_INDEX
    )

    info = {
        "command": "python assets/make_toy_flow_model.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "steps_done": step + 1,
        "minutes": round((time.time() - start) / 60, 1),
        "final_loss": round(last_loss, 4),
    }
    save(out, tokenizer, ema["text_encoder"], ema["unet"], scheduler, info, FLOW_MODEL_INDEX)
    print(f"saved {out} {info}", flush=True)


if __name__ == "__main__":
    main()
