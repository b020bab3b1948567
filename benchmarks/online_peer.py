"""Seconds per GRPO epoch: the official Flow-GRPO trainer against `diffalign online`, same tiny SD3, interleaved.

    git clone https://github.com/yifan123/flow_grpo /path/flow_grpo && git -C /path/flow_grpo checkout ac4c86e
    pip install ml_collections wandb          # the trainer's own imports (wandb runs with WANDB_MODE=disabled)
    python benchmarks/online_peer.py --flow-grpo /path/flow_grpo --epochs 6
    python benchmarks/online_peer.py --smoke  # no checkout: one diffalign epoch only (what the smoke test runs)

The peer: yifan123/flow_grpo at ac4c86e8cae021841f1fde853d340e0db67690dd (Jul 2025), `scripts/train_sd3.py` with
its `config/base.py`. This script fetches nothing: it reads the checkout given by --flow-grpo and leaves it
untouched; the patched copy of train_sd3.py and the config are written to a temporary folder.

Matched settings (both sides): assets/tiny/sd3, 64 px, fp32 on the CPU; 4 prompts x 4 images per epoch (flow_grpo:
2 sampling batches of 8 = 2 prompts x 4 images each, its DistributedKRepeatSampler; diffalign: prompts_per_round 4,
images_per_prompt 4, sample_batch 8), drawn from the same 8 prompts; 4 sampling steps at noise level 0.7, CFG 4.5 in
sampling and training; 3 trained steps per chain (flow_grpo: timestep_fraction 0.99 -> int(4 x 0.99) = 3; diffalign:
the flow SDE sampler records steps 0-2, the last step is the ODE); micro-batch 8; 2 optimizer steps per epoch
(flow_grpo: gradient_accumulation_steps 1 over 2 batches of 8; diffalign: steps_per_round 2, grad_accum 1); LoRA
r 32 / alpha 64, gaussian init, on the same 15 modules (flow_grpo's target names `attn.to_q` ... `attn.to_add_out`,
which leave the dual-attention `attn2` out; diffalign is given the same names); AdamW lr 3e-4, wd 1e-4; grad-norm
clip 1.0; ratio clip 1e-4; advantages over the prompt's mean and the global std, clipped to 5; no KL (beta 0); the
same saturation reward (mean of max(rgb) - min(rgb), diffalign.rewards.imagestats.saturation); T5 length 128 on
both sides (flow_grpo hard-codes 128 in train_sd3.py:540 and :625; diffalign: model.max_sequence_length=128).
Each side keeps its own per-epoch log besides (diffalign: the round's JSONL and tensorboard scalars); both write
their images every 10 epochs (flow_grpo: 15 JPEGs at `epoch % 10 == 0`, train_sd3.py:709; diffalign:
train.grid_every=10), and checkpoints are off on both sides (flow_grpo's save_freq and eval_freq are 10^9 epochs, so
they run only at epoch 0, which is left out; diffalign's train.checkpoint_every=0).

Patches to train_sd3.py (each replaces one exact passage, and the script stops if one no longer matches):
  1. gate: at the top of `while True:` (train_sd3.py:600) the epoch waits for this script's "go" and reports the
     previous epoch's seconds; "stop" ends the process there (the epoch count: the loop has none of its own).
  2. reward: `multi_score(...)` (train_sd3.py:474-475) -> the saturation scorer above, returning what multi_score
     returns ({"saturation": s, "avg": s}, {}); multi_score's dict has no entry to name it by.
Nothing else: the trainer runs on the CPU as it is (accelerate picks the device; mixed_precision "no" from the config),
and its paths (model, dataset folder of train.txt / test.txt, logdir) come from the config. The config: base.py's
get_config() with the settings above (prompt_fn general_ocr, the 8 prompts written as dataset/train.txt).

Timing: each side runs in its own process, started once (loading is not timed). This script alternates them: one
epoch of flow_grpo, then one of diffalign, and so on; an epoch is the time from one gate to the next (diffalign's gate
sits in front of its `plan_round`, the first call of a round in pipelines/online.py). The first epoch of each side
is left out (lazy init, flow_grpo's evaluation). Printed: seconds per epoch per side, the medians and the ratio
diffalign / flow_grpo. Both children get the same environment: OMP_NUM_THREADS from --threads, and OMP_WAIT_POLICY
from --omp-wait-policy (default PASSIVE, what `diffalign online` sets; "default" unsets it for both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

PEER_COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"
MODEL = REPO / "assets/tiny/sd3"
PROMPTS = [
    "a photo of a red cat", "a blue square at the left", "a painting of a dog", "a green circle",
    "a yellow car on a road", "two purple apples", "an orange bird in a tree", "a white boat at sea",
]  # fmt: skip
TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]  # train_sd3.py:419-428  # fmt: skip
MARK = "@@epoch"

# Both children: wait for "go" / "stop" on stdin; report the seconds since the last "go" on stdout.
GATE = f'''
import os as _os, sys as _sys, time as _time
_bench_last = [None]
def _bench_gate(epoch):
    now = _time.perf_counter()
    if _bench_last[0] is not None:
        print("{MARK}", epoch - 1, now - _bench_last[0], flush=True)
    if _sys.stdin.readline().strip() != "go":
        _sys.stdout.flush()
        _os._exit(0)
    _bench_last[0] = _time.perf_counter()
'''

SATURATION = '''
def _bench_saturation(images, prompts, metadata, only_strict=True):
    """diffalign.rewards.imagestats.saturation: (N, 3, H, W) in [0, 1] -> (N,) mean chroma."""
    s = (images.max(dim=1).values - images.min(dim=1).values).mean(dim=(1, 2)).float().cpu().numpy()
    return {"saturation": s, "avg": s}, {}
'''

PATCHES = [  # (what, the official passage, its replacement)
    (
        "gate",
        "    while True:\n        #################### EVAL ####################\n",
        "    while True:\n        _bench_gate(epoch)\n        #################### EVAL ####################\n",
    ),
    (
        "reward",
        "    reward_fn = getattr(flow_grpo.rewards, 'multi_score')(accelerator.device, config.reward_fn)\n"
        "    eval_reward_fn = getattr(flow_grpo.rewards, 'multi_score')(accelerator.device, config.reward_fn)\n",
        "    reward_fn = _bench_saturation\n    eval_reward_fn = _bench_saturation\n",
    ),
]

CONFIG = """
import importlib.util
spec = importlib.util.spec_from_file_location("base", {base!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

def get_config():
    config = base.get_config()
    config.seed = 42
    config.logdir = {logdir!r}
    config.save_dir = {logdir!r}
    config.save_freq = 10**9
    config.eval_freq = 10**9
    config.mixed_precision = "no"
    config.use_lora = True
    config.dataset = {dataset!r}
    config.resolution = 64
    config.pretrained.model = {model!r}
    config.prompt_fn = "general_ocr"
    config.reward_fn = {{"saturation": 1.0}}
    config.per_prompt_stat_tracking = True
    config.sample.num_steps = 4
    config.sample.eval_num_steps = 4
    config.sample.noise_level = 0.7
    config.sample.train_batch_size = 8
    config.sample.num_image_per_prompt = 4
    config.sample.num_batches_per_epoch = 2
    config.sample.test_batch_size = 4
    config.sample.global_std = True
    config.train.batch_size = 8
    config.train.timestep_fraction = 0.99
    config.train.learning_rate = 3e-4
    config.train.adam_weight_decay = 1e-4
    config.train.max_grad_norm = 1.0
    config.train.adv_clip_max = 5
    config.train.ema = False
{method}
    return config
"""
"""The peers' shared config (flow_grpo's config/base.py, DiffusionNFT's own copy of it); `method`: the lines of the
method's own keys (GRPO_KEYS here, online_peer_nft.NFT_KEYS)."""

GRPO_KEYS = """
    config.sample.guidance_scale = 4.5
    config.train.gradient_accumulation_steps = 1
    config.train.clip_range = 1e-4
    config.train.beta = 0.0
    config.train.cfg = True
"""

# diffalign's child: the `diffalign online` program, its round loop gated in front of plan_round.
DIFFALIGN = """
import os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as diffalign/pipelines/cli.py (overridden by the parent's env)
import diffalign.pipelines.online as online
{gate}
_plan = online.plan_round
def _gated(cfg, r, pool):
    _bench_gate(r)
    return _plan(cfg, r, pool)
online.plan_round = _gated
online.run(None, sys.argv[1:])
"""


def diffalign_overrides(work: Path, prompts: Path, epochs: int) -> list[str]:
    targets = ",".join(TARGETS)
    return [
        f"model.path={MODEL}", "model.resolution=64", "model.dtype=float32", "model.max_sequence_length=128",
        "lora.rank=32", "lora.alpha=64", f"lora.target_modules=[{targets}]",
        "objective.name=grpo", "objective.clip_range=1e-4", "objective.beta=0", "objective.adv_clip=5",
        "objective.global_std=true",
        f"train.output_dir={work / 'diffalign'}", "train.seed=42", "train.steps_per_round=2", "train.batch_size=8",
        "train.grad_accum=1", "train.trajectory_steps=3", "train.lr=3e-4", "train.weight_decay=1e-4",
        "train.max_grad_norm=1.0", "train.mixed_precision=no", "train.checkpoint_every=0",
        "train.grid_every=10",
        f"sampling.prompts={prompts}", "sampling.prompts_per_round=4", "sampling.images_per_prompt=4",
        "sampling.shared_noise=false", "sampling.steps=4", "sampling.guidance=4.5", "sampling.eta=0.7",
        "sampling.sample_batch=8",
        "reward.scorer=saturation", "reward.monitor=[]",
        f"online.rounds={epochs + 1}",  # the gate in front of round epochs + 1 reports the last timed one and stops
    ]  # fmt: skip


def patched_trainer(checkout: Path, work: Path, script: str = "scripts/train_sd3.py", patches: list = PATCHES,
                    expected: str = f"flow_grpo {PEER_COMMIT[:7]}") -> Path:  # fmt: skip
    """The peer's trainer `script` with `patches` applied and the gate and reward defined above its imports."""
    source = (checkout / script).read_text()
    for what, old, new in patches:
        if source.count(old) != 1:
            raise SystemExit(f"patch '{what}': its passage is not in {checkout}/{script} once (expected {expected})")
        source = source.replace(old, new)
    target = work / (Path(script).stem + "_bench.py")
    target.write_text(GATE + SATURATION + source)
    return target


class Child:
    """One side's process: `step()` runs one epoch and returns its seconds (None for the first, which only starts)."""

    def __init__(self, name: str, cmd: list[str], env: dict, cwd: Path, log: Path):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, bufsize=1)  # fmt: skip
        self.started = False

    def _send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def _report(self) -> float:
        for line in self.proc.stdout:  # the trainers print to stdout too
            if line.startswith(MARK):
                return float(line.split()[2])
        tail = self.log.read_text()[-3000:]
        raise SystemExit(f"{self.name} exited ({self.proc.wait()}) before reporting an epoch; its log ends:\n{tail}")

    def epoch(self) -> float:
        """The seconds of one epoch: 'go' at the gate, wait for the next gate's report."""
        self._send("go")
        return self._report()

    def stop(self) -> None:
        self._send("stop")
        self.proc.wait(timeout=120)


def child_env(args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_WAIT_POLICY", None)
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def add_diffalign_sides(sides: dict, work: Path, overrides: list[str], env: dict, compile_mode: str) -> None:
    """diffalign's side, and with `compile_mode` a third one: the same overrides plus train.compile=compile_mode."""
    program = DIFFALIGN.format(gate=GATE)
    sides["diffalign"] = Child("diffalign", [sys.executable, "-c", program, *overrides], env, REPO,
                               work / "diffalign.log")  # fmt: skip
    if compile_mode:
        compiled = [o.replace(str(work / "diffalign"), str(work / "compiled")) for o in overrides]
        cmd = [sys.executable, "-c", program, *compiled, f"train.compile={compile_mode}"]
        sides["compiled"] = Child("compiled", cmd, env, REPO, work / "compiled.log")


def summary(times: dict[str, list[float]], peer: str, settings: dict, args) -> dict:
    """The results record: settings, machine, seconds, medians, and diffalign's ratios to `peer` (when it ran);
    the medians and ratios are printed."""
    from bench_io import machine

    med = {name: statistics.median(t) for name, t in times.items()}
    settings = {**settings, "threads": args.threads, "omp_wait_policy": args.omp_wait_policy, "compile": args.compile}
    out = {"settings": settings, "machine": machine(), "seconds": times, "median_s": med}
    print(" ".join(f"{name} median {s:.2f} s/epoch" for name, s in med.items()))
    if peer in med:
        out["ratio"] = med["diffalign"] / med[peer]
        print(f"diffalign / {peer} = {out['ratio']:.2f}")
        if "compiled" in med:
            out["ratio_compiled"] = med["compiled"] / med[peer]
            print(f"diffalign train.compile={args.compile} / {peer} = {out['ratio_compiled']:.2f}")
    return out


def write_prompts(work: Path) -> None:
    """The peers' dataset folder under `work`: PROMPTS as train.txt (and test.txt, which their evaluation reads)."""
    (work / "dataset").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (work / "dataset" / f"{split}.txt").write_text("\n".join(PROMPTS) + "\n")


def write_peer_config(work: Path, checkout: Path, logdir: str, method: str) -> Path:
    """The peer's config file under `work`: CONFIG over the checkout's config/base.py, logging to work/logdir, with
    the method's own keys."""
    config = work / "bench_config.py"
    config.write_text(CONFIG.format(base=str(checkout / "config/base.py"), logdir=str(work / logdir),
                                    dataset=str(work / "dataset"), model=str(MODEL), method=method))  # fmt: skip
    return config


def race(sides: dict[str, Child], skip: int, epochs: int) -> dict[str, list[float]]:
    """Interleaved epochs (the peer's epoch e, then each diffalign side's), the first `skip` left out; the children
    are stopped at the end, or on an error."""
    times = {name: [] for name in sides}
    try:
        for e in range(skip + epochs):
            for name, child in sides.items():
                seconds = child.epoch()
                print(f"epoch {e} {name:13s} {seconds:7.2f} s" + ("  (left out)" if e < skip else ""), flush=True)
                if e >= skip:
                    times[name].append(seconds)
    finally:
        for child in sides.values():
            if child.proc.poll() is None:
                child.stop()
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flow-grpo", default="", help=f"a flow_grpo checkout at {PEER_COMMIT[:7]} (none: diffalign only)")
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per side (after one left-out epoch)")
    p.add_argument("--smoke", action="store_true", help="one epoch per side, none left out (a check, not a figure)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both sides (0: unset)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"])
    p.add_argument(
        "--work", default="", help="keep the children's logs, configs and outputs here (default: a temp dir)"
    )
    p.add_argument(
        "--compile",
        default="",
        choices=["", "blocks", "model"],
        help="a third side: diffalign with train.compile=this (its compile falls in the left-out epoch)",
    )
    p.add_argument("--json", default="", help="results file (default benchmarks/results/online_peer.json)")
    args = p.parse_args(argv)
    skip, epochs = (0, 1) if args.smoke else (1, args.epochs)

    from bench_io import write_results

    with tempfile.TemporaryDirectory(prefix="online_peer_") as tmp:
        work = Path(args.work or tmp)
        write_prompts(work)
        env = child_env(args)
        sides = {}
        if args.flow_grpo:
            checkout = Path(args.flow_grpo).resolve()
            config = write_peer_config(work, checkout, "flow_grpo", GRPO_KEYS)
            trainer = patched_trainer(checkout, work)
            peer_env = {**env, "PYTHONPATH": os.pathsep.join([str(checkout), env.get("PYTHONPATH", "")])}
            sides["flow_grpo"] = Child("flow_grpo", [sys.executable, str(trainer), f"--config={config}"], peer_env,
                                       checkout, work / "flow_grpo.log")  # fmt: skip
        overrides = diffalign_overrides(work, work / "dataset/train.txt", skip + epochs)
        if args.smoke:  # a check, not a figure: keep the round's checkpoint (the smoke test reads its modules)
            overrides.append("train.checkpoint_every=1")
        add_diffalign_sides(sides, work, overrides, env, args.compile)
        times = race(sides, skip, epochs)
    settings = {"flow_grpo_commit": PEER_COMMIT, "epochs": epochs, "left_out": skip, "smoke": args.smoke}
    return write_results(summary(times, "flow_grpo", settings, args), args.json, "online_peer.json")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
