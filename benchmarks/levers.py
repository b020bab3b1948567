"""Speed levers on diffalign's train step (row (a) of train_step.py), side by side in one process.

    python benchmarks/levers.py --size tiny --compile        # CPU, a few seconds (+ compile start-up)
    python benchmarks/levers.py --size sd15 --steps 3        # CPU, about 10 minutes on 2 cores
    python benchmarks/levers.py --size sdxl --device cuda --dtype bfloat16 --steps 5

Each lever row is a setting toggled on the same LoRA'd UNet and run on the same cached batches; the rows run
interleaved (one step of each per round) and the table gives the median s/step, the step's peak extra memory and
both relative to the default row (no autocast, contiguous, no checkpointing, for-each AdamW; weights in --dtype):
  bf16 autocast       torch.autocast(bf16) around the forward (what accelerate's mixed_precision="bf16" does);
                      this CPU has AMX-BF16; weights stay in --dtype, LoRA params fp32, the loss fp32
  channels_last       UNet weights (and so conv activations) in NHWC
  grad ckpt           diffusers gradient checkpointing (recompute in backward): the time-vs-memory trade
  fused AdamW         torch.optim.AdamW(fused=True) (meant for the GPU; LoRA params are few)
  MaPO                the MaPO objective instead of Diffusion-DPO: no reference forward at all (its time and
                      memory saving; same batches, same loop functions)
With --compile, torch.compile(UNet) runs last (it cannot be switched off again): start-up = first step, then the
steady median. Compiled graphs are per (adapters on/off, grad/no-grad), so the first step compiles several.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_io import machine, write_results  # noqa: E402
from train_step import DTYPES, GIB, SIZES, Bench, MemoryProbe, bench_run, measure  # noqa: E402

from diffalign.config import ObjectiveConfig, from_dict  # noqa: E402
from diffalign.engine.common import build_objective  # noqa: E402

# name -> (autocast bf16, channels_last, gradient checkpointing, fused AdamW, objective)
LEVERS = {
    "default": (False, False, False, False, "dpo"),
    "bf16 autocast": (True, False, False, False, "dpo"),
    "channels_last": (False, True, False, False, "dpo"),
    "bf16 + channels_last": (True, True, False, False, "dpo"),
    "grad ckpt": (False, False, True, False, "dpo"),
    "bf16 + grad ckpt": (True, False, True, False, "dpo"),
    "fused AdamW": (False, False, False, True, "dpo"),
    "MaPO (no reference)": (False, False, False, False, "mapo"),
}


class LeverStep:
    """bench.step_a with one lever setting applied first. Switching is inside the timed step but costs nothing
    unless channels_last changes (one pass over the weights), which happens only between rows."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.adamw = bench.opt_a.optimizer
        tc = bench.train_cfg
        self.fused = torch.optim.AdamW(bench.params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        self.objectives = {
            "dpo": bench.objective,
            "mapo": build_objective(from_dict(ObjectiveConfig, {"name": "mapo"})),
        }
        self.state = None

    def apply(self, setting: tuple) -> None:
        """Switch the shared UNet / optimizer to `setting` (cheap when only autocast or the optimizer change)."""
        _, channels_last, ckpt, fused, objective = setting
        old = self.state or LEVERS["default"]
        denoiser = self.bench.family.denoiser
        if self.state is None or channels_last != old[1]:
            denoiser.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if self.state is None or ckpt != old[2]:
            denoiser.enable_gradient_checkpointing() if ckpt else denoiser.disable_gradient_checkpointing()
        self.bench.opt_a.optimizer = self.fused if fused else self.adamw
        self.bench.ctx.objective = self.objectives[objective]
        self.bench.ctx.reference = self.bench.reference if self.objectives[objective].needs_reference else None
        self.state = setting

    def step(self, setting: tuple) -> float:
        self.apply(setting)
        device = self.bench.device.type
        amp = partial(torch.autocast, device, dtype=torch.bfloat16) if setting[0] else nullcontext
        return self.bench.step_a(amp)


def run_compile(bench: Bench, lever: LeverStep, probe: MemoryProbe, steps: int, bf16: bool) -> dict:
    """torch.compile the UNet in place, then time the first step (start-up) and `steps` more."""
    setting = (bf16, False, False, False, "dpo")
    lever.apply(setting)
    bench.family.denoiser.compile()
    times, peaks = [], []
    for i in range(steps + 1):
        with probe:
            t0 = time.perf_counter()
            lever.step(setting)
            if bench.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peaks.append(probe.peak)
        print(f"  compiled step {i + 1}: {times[-1]:.3f} s{' (start-up, compiles)' if i == 0 else ''}")
    return {
        "startup_s": times[0],
        "times": times[1:],
        "median_s": statistics.median(times[1:]),
        "step_peak_bytes": max(peaks[1:]),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights dtype of the frozen base")
    p.add_argument("--pairs", type=int, default=0)
    p.add_argument("--steps", type=int, default=3, help="measured rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--levers", default=",".join(LEVERS), help="comma-separated subset of: " + ", ".join(LEVERS))
    p.add_argument("--compile", action="store_true", help="also torch.compile the UNet (last; slow start-up)")
    p.add_argument("--compile-bf16", action="store_true", help="compile under bf16 autocast instead of fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.size == "sdxl" and not args.device.startswith("cuda"):
        p.error("--size sdxl is GPU only")
    names = args.levers.split(",")
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        p.error(f"unknown levers {unknown}; known: {', '.join(LEVERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Bench reads these train_step options; levers always measure row (a) from its default state.
    args.precision, args.gradient_checkpointing, args.beta, args.rows = "fp32", False, 0.0, "a"

    with tempfile.TemporaryDirectory(prefix="diffalign-levers-") as tmp:
        bench = Bench(args, bench_run(args, Path(tmp)), Path(tmp))
        lever = LeverStep(bench)
        probe = MemoryProbe(bench.device)
        steps = {name: partial(lever.step, LEVERS[name]) for name in names}
        results = measure(steps, probe, args.steps, args.warmup)
        compiled = None
        if args.compile:
            compiled = run_compile(bench, lever, probe, args.steps + 1, args.compile_bf16)

    base = results.get("default") or next(iter(results.values()))
    x0 = bench.floor_call[0][0]
    print(
        f"\nlevers on row (a) | size {args.size} | {bench.pairs} pair(s), latents {'x'.join(map(str, x0.shape[1:]))} | "
        f"{bench.device} weights {args.dtype} | median of {args.steps} after {args.warmup} warm-up"
    )
    print(f"{'lever':26} {'s/step':>8} {'x default':>10} {'step GiB':>9} {'x default':>10}")
    for name, res in results.items():
        print(
            f"{name:26} {res['median_s']:8.3f} {res['median_s'] / base['median_s']:10.2f} "
            f"{res['step_peak_bytes'] / GIB:9.3f} {res['step_peak_bytes'] / max(base['step_peak_bytes'], 1):10.2f}"
        )
    if compiled:
        label = f"torch.compile ({'bf16' if args.compile_bf16 else 'fp32'})"
        print(
            f"{label:26} {compiled['median_s']:8.3f} {compiled['median_s'] / base['median_s']:10.2f} "
            f"{compiled['step_peak_bytes'] / GIB:9.3f} {compiled['step_peak_bytes'] / max(base['step_peak_bytes'], 1):10.2f}"
            f"   start-up (first step) {compiled['startup_s']:.1f} s"
        )
    out = {
        "machine": machine(),
        "settings": {"size": args.size, "device": str(bench.device), "dtype": args.dtype, "pairs": bench.pairs},
        "levers": results,
        "compile": compiled,
    }
    return write_results(out, args.json, f"levers-{args.size}-{bench.device.type}.json")


if __name__ == "__main__":
    main()
