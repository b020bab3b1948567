"""Seconds per DiffusionNFT epoch: the official DiffusionNFT trainer against `diffalign online objective=nft`, same
tiny SD3, interleaved (online_peer.py's method, whose machinery this script reuses).

    git clone https://github.com/NVlabs/DiffusionNFT /path/DiffusionNFT && git -C /path/DiffusionNFT checkout 24af555
    python benchmarks/online_peer_nft.py --diffusion-nft /path/DiffusionNFT --epochs 12 [--compile model]

The peer: NVlabs/DiffusionNFT at 24af5554898d85e93efa492f42b5e9cdf4156e9b, `scripts/train_nft_sd3.py` with its
`config/base.py` (its own copy of flow_grpo's package; no install needed: the checkout goes on PYTHONPATH). It runs
under torch DDP even on one GPU, so it is launched as one process (RANK 0, WORLD_SIZE 1, gloo).

Matched settings (both sides): assets/tiny/sd3, 64 px, fp32 on the CPU; 4 prompts x 4 images per epoch (2 sampling
batches of 8; diffalign: prompts_per_round 4, images_per_prompt 4, sample_batch 8), from the same 8 prompts; 4
deterministic Euler steps (the peer's solver "flow" with deterministic=True, one transformer call per step as its
recipe's "dpm2"; diffalign: sampling.eta 0), sampled with the "old" adapter, no CFG (guidance 1); training: every
sample at 3 of the 4 sampler timesteps (the peer: timestep_fraction 0.99, a per-sample permutation; diffalign:
objective.timesteps=sampler, a keyed draw from the grid per visit), 48 visits in micro-batches of 8, each visit the
old (no grad), policy (grad) and reference (adapters off, no grad) predictions; NFT beta 1, KL weight 1e-4, advantages
over the prompt's mean and the global std clipped to 5; the old adapter's EMA after the epoch, decay type 1
("linear"); LoRA r 32 / alpha 64 on the same 8 target names; AdamW lr 3e-4, wd 1e-4, grad-norm clip 1.0; the same
saturation reward; T5 length 128 (the peer hard-codes it; diffalign: model.max_sequence_length=128).
One difference in the optimizer steps, kept because the forwards and backwards are what is timed: the peer takes one
AdamW step over the epoch's 48 visits (gradient_accumulation_steps 2 x 3 timesteps); diffalign takes three, each over
all 16 samples (steps_per_round 3, batch 8, grad_accum 2: a step draws each sample once). Off on both sides: the
peer's EMA of the policy (its evaluation copy; train.ema False), checkpoints and evaluation after epoch 0 (save_freq,
eval_freq 10^9; epoch 0 is left out); images: the peer logs 15 every 10 epochs, diffalign its grid every 10 rounds.

Patches to train_nft_sd3.py (each replaces one exact passage; the script stops if one no longer matches):
  1. gate: at the top of `for epoch in range(...)` (train_nft_sd3.py:582) the epoch waits for "go" and reports the
     previous epoch's seconds (online_peer.py's gate);
  2. CPU: `init_process_group("nccl")` -> "gloo" and no `torch.cuda.set_device` (:60-61); the device `cuda:LOCAL_RANK`
     -> cpu (:365); `DDP(..., device_ids=[local_rank], output_device=local_rank)` -> no device ids (:440);
  3. reward: `multi_score(device, config.reward_fn)` (:529-530) -> the saturation scorer, returning what
     multi_score returns ({"saturation": s, "avg": s}, {}).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from online_peer import (  # noqa: E402
    Child,
    add_diffalign_sides,
    child_env,
    diffalign_overrides,
    patched_trainer,
    race,
    summary,
    write_peer_config,
    write_prompts,
)

PEER_COMMIT = "24af5554898d85e93efa492f42b5e9cdf4156e9b"
SCRIPT = "scripts/train_nft_sd3.py"

PATCHES = [  # (what, the official passage, its replacement)
    (
        "gate",
        "    for epoch in range(first_epoch, config.num_epochs):\n",
        "    for epoch in range(first_epoch, config.num_epochs):\n        _bench_gate(epoch)\n",
    ),
    (
        "cpu: process group",
        '    dist.init_process_group("nccl", rank=rank, world_size=world_size)\n'
        "    torch.cuda.set_device(lock_rank)\n",
        '    dist.init_process_group("gloo", rank=rank, world_size=world_size)\n',
    ),
    ("cpu: device", '    device = torch.device(f"cuda:{local_rank}")\n', '    device = torch.device("cpu")\n'),
    (
        "cpu: DDP",
        "DDP(transformer, device_ids=[local_rank], output_device=local_rank, find_unused_parameters=False)",
        "DDP(transformer, find_unused_parameters=False)",
    ),
    (
        "reward",
        '    reward_fn = getattr(flow_grpo.rewards, "multi_score")(device, config.reward_fn)  # Pass device\n'
        '    eval_reward_fn = getattr(flow_grpo.rewards, "multi_score")(device, config.reward_fn)  # Pass device\n',
        "    reward_fn = _bench_saturation\n    eval_reward_fn = _bench_saturation\n",
    ),
]

NFT_KEYS = """
    config.sample.guidance_scale = 1.0
    config.sample.deterministic = True
    config.sample.solver = "flow"
    config.train.gradient_accumulation_steps = 2
    config.train.beta = 1e-4
    config.train.adv_mode = "all"
    config.beta = 1.0
    config.decay_type = 1
"""
"""config/nft.py's `_get_config` keys, at this benchmark's sizes (after online_peer's CONFIG, the shared ones)."""

NFT = [  # configs/sd3_nft.yaml's method keys at this benchmark's sizes (the later keys win)
    "objective.name=nft", "objective.beta=1.0", "objective.kl_weight=1e-4", "objective.adv_clip=5.0",
    "objective.old_decay=linear", "objective.timesteps=sampler", "sampling.guidance=1.0", "sampling.eta=0.0",
    "train.steps_per_round=3", "train.batch_size=8", "train.grad_accum=2", "train.trajectory_steps=0",
]  # fmt: skip


def nft_overrides(work: Path, prompts: Path, epochs: int) -> list[str]:
    return [o for o in diffalign_overrides(work, prompts, epochs) if not o.startswith("objective.")] + NFT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--diffusion-nft", required=True, help=f"a DiffusionNFT checkout at {PEER_COMMIT[:7]}")
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per side (after one left-out epoch)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both sides (0: unset)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"])
    p.add_argument("--compile", default="", choices=["", "blocks", "model"], help="a third side: train.compile=this")
    p.add_argument("--work", default="", help="keep the children's logs, configs and outputs here")
    p.add_argument("--json", default="", help="results file (default benchmarks/results/online_peer_nft.json)")
    args = p.parse_args(argv)
    from bench_io import write_results

    with tempfile.TemporaryDirectory(prefix="online_peer_nft_") as tmp:
        work = Path(args.work or tmp)
        write_prompts(work)
        env = child_env(args)
        checkout = Path(args.diffusion_nft).resolve()
        config = write_peer_config(work, checkout, "peer", NFT_KEYS)
        trainer = patched_trainer(checkout, work, SCRIPT, PATCHES, f"DiffusionNFT {PEER_COMMIT[:7]}")
        ddp = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}  # fmt: skip
        peer_env = {**env, **ddp, "PYTHONPATH": str(checkout)}
        sides = {"diffusion_nft": Child("diffusion_nft", [sys.executable, str(trainer), f"--config={config}"],
                                        peer_env, checkout, work / "peer.log")}  # fmt: skip
        overrides = nft_overrides(work, work / "dataset/train.txt", 1 + args.epochs)
        add_diffalign_sides(sides, work, overrides, env, args.compile)
        times = race(sides, 1, args.epochs)
    settings = {"diffusion_nft_commit": PEER_COMMIT, "epochs": args.epochs, "left_out": 1}
    return write_results(summary(times, "diffusion_nft", settings, args), args.json, "online_peer_nft.json")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
