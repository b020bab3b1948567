"""Toy-world alignment benchmark: every objective, trained from the same toy base, judged on held-out prompts.

For each objective in the registry: `diffalign train` in its own process (so peak memory is per run) with the
objective's toy-scaled settings below, then base vs aligned on the held-out prompts with the same seeds:
reward win rate with a Wilson 95% CI, mean reward change, prompt-fidelity change, the drift from the base on the same
seeds (DRIFT_COLUMNS: the shape's move from its anchor and its size change in pixels, the background's colour cast and
texture change in levels of 255, the outline's 1 - IoU; diffalign.rewards.toy_drift), train wall time, time per step,
peak RSS, CPU seconds of the whole child (training, sampling, evaluation). Prints a table and writes results.json +
results.png.

    python benchmarks/toy_alignment.py                    # every offline (SETTINGS) and on-line (ONLINE) row
    python benchmarks/toy_alignment.py --objectives dpo,mapo --out runs/bench
    python benchmarks/toy_alignment.py --objectives nft,grpo,d3po,dragon --curves   # time to a 90% win rate

Targets (issue 15): the default `diffalign train` (the dpo row's settings) Δ toy_aesthetic >= +0.4 with a win rate
>= 95%; every offline row Δ >= +0.2 with the CI's lower bound >= 80%; fidelity within 2 points everywhere. Offline
rows use the toy family's default LoRA targets (attention + resnet convs); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Toy-scaled settings per objective: the paper's estimator (x_t source, reference or not, label kind) and β,
# with the learning rate and step count sized for a 1.4 M-parameter pixel-space model on a CPU.
COMMON = [
    "train.batch_size=8",
    "train.lr=1e-4",
    "train.max_steps=300",
    "lora.rank=8",
    "lora.alpha=8",
    "train.validate_every=0",
]
SETTINGS: dict[str, list[str]] = {
    "dpo": ["objective.name=dpo", "objective.beta=5000"],
    # InPO: lr 1e-3 and 90 steps (an InPO step costs ~3.4 DPO steps: about DPO-300's time); at lr 1e-4 it moved
    # the toy by +0.05 in 50 steps
    "inpo": ["objective.name=inpo", "objective.beta=5000", "train.lr=1e-3", "train.max_steps=90"],
    # SmPO: lr 3e-4 and 160 steps (an SmPO step costs ~5.9 DPO steps: about 3x DPO-300's time); lr 1e-3 gave +0.22 to
    # +0.35 but at most 83% wins, lr 1e-4 +0.06 in 50 steps
    "smpo": [
        "objective.name=smpo",
        "objective.beta=5000",
        "train.lr=3e-4",
        "train.max_steps=160",
        "data.label_scorer=toy_aesthetic",
        "data.label_mode=smpo",
    ],
    "kto": ["objective.name=kto", "objective.beta=5000"],
    "mapo": ["objective.name=mapo"],
    "sft": ["objective.name=sft"],
}
# On-line rows: `diffalign online` with the shipped toy config (its own sampling / training budget); "steps" in the
# table = optimizer steps (online.rounds x train.steps_per_round), the wall time includes the sampling of every round.
# A row is a shipped config plus overrides; "_flow" rows run the DDPM toy's config on the flow-matching toy
# (assets/toy_flow_model) with toy_flow_grpo's sampler: Flow-GRPO's SDE at a = 0.3, 10 steps (the DDPM configs' eta 1
# would be a = 1, which leaves visible noise in this pixel-space model).
FLOW = ["model.path=toy_flow", "sampling.eta=0.3", "sampling.steps=10"]
ONLINE: dict[str, list[str]] = {
    "d3po": ["configs/toy_d3po.yaml"],
    "dragon": ["configs/toy_dragon.yaml"],
    "dragon_fd": ["configs/toy_dragon_fd.yaml"],
    "dro": ["configs/toy_dro.yaml"],
    # the reward-hacking demo: DRAGON on the hackable toy_area reward, without and with the guards (README)
    "hack": ["configs/toy_hack.yaml"],
    "hack_guard": ["configs/toy_hack_guarded.yaml"],
    "nft": ["configs/toy_nft.yaml"],
    # toy_grpo side by side (issue 34): as shipped (with the drift guard), without the guard (the recipe before it),
    # and with GRPO's own KL to the base retuned, unguarded so its drift is the KL's alone. GRPO refuses
    # online.kl_weight (objective.beta is its KL, Flow-GRPO's β); β 10 is a judgement from a one-round probe
    # (docs/results.md#drift-on-the-toy-world), not Flow-GRPO's 0.04, whose KL drops the step's Δt
    "grpo": ["configs/toy_grpo.yaml"],
    "grpo_noguard": ["configs/toy_grpo.yaml", "guards.every=0"],
    "grpo_kl": ["configs/toy_grpo.yaml", "objective.beta=10", "guards.every=0"],
    "nft_flow": ["configs/toy_flow_nft.yaml"],
    "grpo_flow": ["configs/toy_flow_grpo.yaml"],
    "d3po_flow": ["configs/toy_d3po.yaml", *FLOW],
    "dragon_flow": ["configs/toy_dragon.yaml", *FLOW],
    "dro_flow": ["configs/toy_dro.yaml", *FLOW],
    # the methods two or more peers ship (issue 31), on the flow toy with toy_flow_grpo's / toy_flow_nft's sizes:
    # their own configs, and Flow-GRPO with CPS (its a = 0.8), MixGRPO's sliding 3-step window (one step every 2
    # rounds over the 10 steps) and CFG-free rounds (guidance 1 in sampling and training; eval keeps the toy's 1.5)
    "grpo_guard_flow": ["configs/toy_grpo_guard.yaml"],
    "dppo_flow": ["configs/toy_flow_dppo.yaml"],
    "dgpo_flow": ["configs/toy_flow_dgpo.yaml"],
    "awm_flow": ["configs/toy_flow_awm.yaml"],
    "cps_flow": ["configs/toy_flow_grpo.yaml", "sampling.sampler=flow_cps", "sampling.eta=0.8"],
    "mixgrpo_flow": [
        "configs/toy_flow_grpo.yaml",
        "sampling.sde_window_size=3",
        "sampling.sde_window_range=[0,9]",
        "sampling.sde_window_shift_every=2",
    ],
    "nocfg_flow": ["configs/toy_flow_grpo.yaml", "sampling.guidance=1.0"],
    # MixGRPO's window with a third of the lr: GRPO averages its loss over the trained steps, so training 3 of 10 puts
    # about 3x the gradient on each
    "mixgrpo_flow_lr": ["configs/toy_flow_grpo.yaml", "sampling.sde_window_size=3", "sampling.sde_window_range=[0,9]",
                        "sampling.sde_window_shift_every=2", "train.lr=1e-3"],
    # the same methods on the DDPM toy (DDIM-eta steps; CPS is a flow sampler): toy_grpo's sizes, sampler and lr 1e-3
    # for the policy-ratio methods; DGPO and AWM train on ODE rounds, their own configs on the DDPM toy
    "grpo_guard": ["configs/toy_grpo.yaml", "objective.name=grpo_guard", "objective.clip_range=2e-6",
                   "objective.global_std=false"],
    "dppo": ["configs/toy_flow_dppo.yaml", "model.path=toy", "sampling.steps=6", "sampling.eta=1.0", "train.lr=1e-3"],
    "dgpo": ["configs/toy_flow_dgpo.yaml", "model.path=toy"],
    "awm": ["configs/toy_flow_awm.yaml", "model.path=toy"],
    "mixgrpo": ["configs/toy_grpo.yaml", "sampling.sde_window_size=2", "sampling.sde_window_range=[0,5]",
                "sampling.sde_window_shift_every=2"],
    "nocfg": ["configs/toy_grpo.yaml", "sampling.guidance=1.0"],
}  # fmt: skip
# drift columns: (header, scorer in the report's drift block, statistic): "change" = aligned - base mean (the prompt
# errors), "aligned" = the aligned mean (base-relative scorers, 0 at the base)
DRIFT_COLUMNS = (
    ("Δpos px", "toy_position_error", "mean_delta"),
    ("Δsize px", "toy_size_error", "mean_delta"),
    ("Δhue°", "toy_colour_error", "mean_delta"),
    ("bg/255", "toy_background_shift", "mean_new"),
    ("Δtex/255", "toy_background_texture", "mean_new"),
    ("outline", "toy_outline_change", "mean_new"),
)
# --curves: a held-out point every round (16 prompts x 4 seeds, win rate against the base on the same seeds), and
# the sampling + training time to the first point at or above a 90% win rate (curve points are not counted).
CURVES = ["train.validate_every=1", "eval.curve_seeds=4"]
TARGET_WIN = 0.9


def time_to_win(run_dir: Path, target: float = TARGET_WIN) -> tuple[int | None, float | None]:
    """(round, seconds of sampling + training) of the first curve point whose win rate is >= target, else Nones."""
    points = [json.loads(x) for x in (run_dir / "curves.jsonl").read_text().splitlines() if x.strip()]
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
    elapsed, seconds = 0.0, {}
    for r in rounds:
        elapsed += r["round_seconds"]
        seconds[r["round"]] = elapsed
    for p in points:
        win = next((v for k, v in p.items() if k.startswith("win/")), None)
        if win is not None and win >= target:
            return p["step"], seconds[p["step"]]
    return None, None


def run_one(name: str, out: Path, extra: list[str], curves: bool = False) -> dict:
    """Train + evaluate one objective in a child process; returns the row."""
    run_dir = out / name
    if name in ONLINE:
        config, *fixed = ONLINE[name]
        more = CURVES if curves else []
        args = ["online", config, *fixed, *more, *extra, "train.tensorboard=false", f"train.output_dir={run_dir}"]
    else:
        args = ["train", *COMMON, *SETTINGS[name], *extra, f"train.output_dir={run_dir}"]
    start = time.time()
    cmd = [sys.executable, "-m", "diffalign.pipelines.cli", *args]
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    (out / f"{name}.log").write_text(log)
    if child.returncode != 0:
        raise SystemExit(f"{name}: training failed (exit {child.returncode}); see {out / f'{name}.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    if name in ONLINE:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        steps = cfg["online"]["rounds"] * cfg["train"]["steps_per_round"]
    else:
        steps = summary["steps"]
    reward, fidelity = report["scorers"]["toy_aesthetic"], report["scorers"]["toy_fidelity"]
    row = {
        "objective": name,
        "steps": steps,
        "win_rate": reward["win_rate"],
        "ci": [reward["ci_low"], reward["ci_high"]],
        "reward_base": reward["mean_old"],
        "reward_aligned": reward["mean_new"],
        "reward_change": reward["mean_delta"],
        "fidelity_base": fidelity["mean_old"],
        "fidelity_aligned": fidelity["mean_new"],
        "fidelity_change_points": 100 * fidelity["mean_delta"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_step": summary["train_seconds"] / max(steps, 1),
        "peak_rss_gb": usage.ru_maxrss / 1024**2,  # KiB -> GiB (Linux)
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # the whole child: training, sampling and evaluation
        "total_seconds": time.time() - start,
        "comparisons": reward.get("n"),
        "drift": {name: report["drift"][name][stat] for _, name, stat in DRIFT_COLUMNS},
    }
    if curves and name in ONLINE:
        row["to_90_round"], row["to_90_seconds"] = time_to_win(run_dir)
    if "toy_area" in report["scorers"]:  # the hack demo's reward, and where its guards stopped
        row["toy_area_change"] = report["scorers"]["toy_area"]["mean_delta"]
    if "guards" in summary:
        row["guards_kept_round"], row["guards_tripped"] = summary["guards"]["kept_round"], summary["guards"]["tripped"]
    if "eval_fd" in summary:  # distribution-level reward: FD to the exemplar set, base -> aligned
        row["fd_base"], row["fd_aligned"] = summary["eval_fd"]["base"], summary["eval_fd"]["aligned"]
    return row


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'objective':<13}{'steps':>6}{'win rate [95% CI]':>24}{'reward':>16}{'Δreward':>9}"
        f"{'fidelity':>15}{'Δfid pts':>9}{''.join(f'{h:>9}' for h, _, _ in DRIFT_COLUMNS)}"
        f"{'train s':>9}{'s/step':>8}{'RSS GB':>8}{'CPU s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        drift = "".join(f"{r['drift'][name]:>+9.2f}" for _, name, _ in DRIFT_COLUMNS)
        lines.append(
            f"{r['objective']:<13}{r['steps']:>6}"
            f"{100 * r['win_rate']:>9.1f}% [{100 * r['ci'][0]:4.1f}, {100 * r['ci'][1]:5.1f}]"
            f"{r['reward_base']:>8.2f}→{r['reward_aligned']:<6.2f}{r['reward_change']:>+9.2f}"
            f"{r['fidelity_base']:>7.3f}→{r['fidelity_aligned']:<6.3f}{r['fidelity_change_points']:>+9.1f}"
            f"{drift}"
            f"{r['train_seconds']:>9.0f}{r['seconds_per_step']:>8.2f}{r['peak_rss_gb']:>8.2f}"
            f"{r.get('cpu_seconds', float('nan')):>7.0f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["objective"] for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    win = [100 * r["win_rate"] for r in rows]
    err = [[100 * (r["win_rate"] - r["ci"][0]) for r in rows], [100 * (r["ci"][1] - r["win_rate"]) for r in rows]]
    axes[0].bar(names, win, yerr=err, capsize=4, color="#3b7dd8")
    axes[0].axhline(50, color="gray", ls="--", lw=1)
    axes[0].set_title("reward win rate vs base (%)")
    axes[1].bar(names, [r["fidelity_change_points"] for r in rows], color="#d8823b")
    axes[1].axhline(-5, color="red", ls="--", lw=1)
    axes[1].set_title("prompt-fidelity change (points)")
    axes[2].bar(names, [r["drift"]["toy_background_shift"] for r in rows], color="#9b59b6")
    axes[2].set_title("background cast vs base (/255)")
    axes[3].bar(names, [r["drift"]["toy_position_error"] for r in rows], color="#2a9d4b")
    axes[3].set_title("shape centre: Δ distance to anchor (px)")
    axes[4].bar(names, [r["train_seconds"] for r in rows], color="#777777")
    axes[4].set_title("train wall time (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--objectives", default=",".join([*SETTINGS, *ONLINE]), help="comma-separated rows (SETTINGS, ONLINE)"
    )
    parser.add_argument("--out", default=f"runs/toy_alignment-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument(
        "--curves", action="store_true", help="on-line rows: a curve point every round and the time to 90%% wins"
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra key=value overrides for every run (e.g. eval.max_prompts=8)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.objectives.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS and n not in ONLINE]
    if unknown:
        raise SystemExit(f"no toy settings for {unknown} (known: {', '.join([*SETTINGS, *ONLINE])})")
    rows = []
    for name in names:
        rows.append(run_one(name, out, args.overrides, args.curves))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    for r in rows:
        if "to_90_round" in r:
            reached = r["to_90_round"] is not None
            when = (
                f"round {r['to_90_round']}, {r['to_90_seconds']:.0f} s of sampling + training" if reached else "never"
            )
            print(f"{r['objective']}: first held-out win rate >= {100 * TARGET_WIN:.0f}%: {when}")
    for r in rows:
        if "guards_tripped" in r:  # which guarded rows the guards stopped, and which weights they kept
            how = f"stopped by {r['guards_tripped'][0]}" if r["guards_tripped"] else "passed every check"
            print(f"{r['objective']}: guards {how}; lora/ holds round {r['guards_kept_round']}")
    for r in rows:
        if "fd_base" in r:
            print(
                f"{r['objective']}: FD to the exemplar set on held-out prompts {r['fd_base']:.3f} -> {r['fd_aligned']:.3f}"
            )
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "results.png")
    print(f"\nresults.json and results.png in {out}")
    return rows


if __name__ == "__main__":
    main()
