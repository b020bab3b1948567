"""Where one on-line epoch's CPU time goes: torch.profiler over one GRPO or NFT round of `diffalign online`.

    python benchmarks/profile_online.py                       # GRPO and NFT, the tiny SD3, online_peer's settings
    python benchmarks/profile_online.py --methods nft --rows 40 --python

The program runs as `diffalign online` does (pipelines/online.py's `run`), its round loop hooked in front of
`plan_round`, the first call of a round: round 1 warms up (lazy init), round 2 runs under torch.profiler, and the
run stops at round 3's start (no end-of-run evaluation). GRPO uses benchmarks/online_peer.py's matched settings
(4 prompts x 4 images, 4 steps at noise 0.7, CFG 4.5, 3 trained steps, micro-batch 8, 2 optimizer steps); NFT the
same round with configs/sd3_nft.yaml's method keys (CFG 1, ODE sampling, one optimizer step of 16 rows).

Printed per method: the round's wall time, the number of aten op calls, the host reads (aten::item /
_local_scalar_dense: what `.item()`, `float(t)`, `bool(t)` and `.tolist()` run; nonzero; on the CPU no syncs, on a
GPU each one waits for the queue) and the ops by self CPU time. --python profiles the same round with cProfile
instead (the profiler's op tables do not show Python-side work: encoders called per chunk, module walks, I/O): the
functions by cumulative time and the callers of the host reads.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as diffalign/pipelines/cli.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import diffalign.pipelines.online as online  # noqa: E402
import torch  # noqa: E402
from online_peer import PROMPTS, diffalign_overrides  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")
NFT = [  # configs/sd3_nft.yaml's method keys on online_peer's round
    "objective.name=nft", "objective.beta=1.0", "objective.kl_weight=1e-4", "objective.adv_clip=5.0",
    "objective.old_decay=linear", "sampling.guidance=1.0", "sampling.eta=0.0", "train.steps_per_round=1",
    "train.batch_size=8", "train.grad_accum=2", "train.trajectory_steps=0",
]  # fmt: skip


class _Done(Exception):
    pass


def profile_round(overrides: list[str], python: bool) -> tuple[float, profile | cProfile.Profile]:
    """Round 2 of a `diffalign online` run under torch.profiler (or cProfile): (its wall seconds, the profile)."""
    plan, state = online.plan_round, {}

    def hooked(cfg, r, pool):
        if r == 1:
            state["prof"] = cProfile.Profile() if python else profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        elif r == 2:
            state["seconds"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
            raise _Done
        return plan(cfg, r, pool)

    online.plan_round = hooked
    try:
        online.run(None, overrides)
    except _Done:
        pass
    finally:
        online.plan_round = plan
    return state["seconds"], state["prof"]


def report(name: str, seconds: float, prof: profile, rows: int) -> dict:
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    syncs = {e.key: e.count for e in events if e.key in SYNCS}
    print(f"\n=== {name}: one round {seconds:.2f} s, {calls} op calls; host reads {syncs}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    return {"seconds": seconds, "op_calls": calls, "syncs": syncs}


def report_python(name: str, seconds: float, prof: cProfile.Profile, rows: int) -> dict:
    print(f"\n=== {name}: one round {seconds:.2f} s (cProfile)")
    stats = pstats.Stats(prof).sort_stats("cumulative")
    stats.print_stats(rows)
    stats.print_callers(
        r"method 'item'|method 'tolist'|method 'nonzero'|encode_prompts|get_parameter_dtype|get_parameter_device"
    )
    return {"seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="grpo,nft", help="comma-separated: grpo, nft")
    p.add_argument("--rows", type=int, default=30, help="ops in each table")
    p.add_argument("--python", action="store_true", help="cProfile instead: Python time and who reads the host")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--compile", default="none", help="train.compile: none, blocks, model (round 1, not profiled, compiles)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for name in args.methods.split(","):
        with tempfile.TemporaryDirectory(prefix="profile_online_") as tmp:
            work = Path(tmp)
            prompts = work / "prompts.txt"
            prompts.write_text("\n".join(PROMPTS) + "\n")
            overrides = diffalign_overrides(work, prompts, 2)  # rounds = 3: warm-up, profiled, stop
            if name == "nft":  # its own objective keys; the later keys win
                overrides = [o for o in overrides if not o.startswith("objective.")] + NFT
            overrides.append(f"train.compile={args.compile}")
            seconds, prof = profile_round(overrides, args.python)
            out[name] = (report_python if args.python else report)(name, seconds, prof, args.rows)
    return out


if __name__ == "__main__":
    main()
