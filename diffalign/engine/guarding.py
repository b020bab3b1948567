"""The reward-hacking guards inside `diffalign train` and `diffalign online` (config section `guards`).

    guard = GuardRun.build(cfg.guards, family, reward, named_params, out, accelerator, unit="step")  # None if off
    guard.start(ckpt, saved)                   # base images + values (adapters off); a resume reloads the best
    ... after optimizer step / round n:  tripped = guard.due(n, last) and guard.check(n)
        save_checkpoint(..., extra={**extra, **parts[0]}, tensors=parts[1])   # parts = guard.checkpoint_parts()
        if tripped: break
    info = guard.finish()                      # puts the best passing weights back; for summary.json

Every check samples the held-out prompts with the same fixed seeds, measures each monitor (diffalign.guards) and
the ranking reward, logs `guard/<monitor>` to tensorboard and a row to guards.jsonl, and keeps an in-memory copy of
the LoRA when the check passes every rule with the best reward so far (step 0 is the base model, a passing
evaluation). The kept copy and its (reward, step) go into every checkpoint (`checkpoint_parts`), so `--resume` gets
them back: a resumed run keeps the same weights as an uninterrupted one. The programs check before they save, so the
checkpoint of step n has seen the check of step n. A trip prints one line naming the monitor, its value and the
limit; the loop stops and lora/ is the best passing copy. Exit code 0: the stop is the guard doing its job, and the
run's outputs (lora/, eval, summary) are complete; summary.json says `guards.tripped` so a script can tell.

Several processes: the main process measures, and its verdict (the tripped rules, whether this check is the new best)
is broadcast, so every process leaves the loop together and keeps the same copy. Under FSDP2 every process draws its
share of the check's images (`generate_shared`, passed in as `generate`) and keeps its own shard of the best copy;
the checkpoint gathers it (a collective), so the file is an unsharded run's and resumes with any process count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from diffalign.checkpoint import load_checkpoint_tensors
from diffalign.config import GuardsConfig, MonitorConfig, from_dict
from diffalign.engine.sharding import full_tensors, place_like
from diffalign.errors import DiffalignError
from diffalign.guards import Monitor, measure_all, trips
from diffalign.lora import reference_mode
from diffalign.paths import TOY_HELDOUT
from diffalign.rewards import load_scorer
from diffalign.rewards.frames import FrameReduced


def guard_prompts(gcfg: GuardsConfig) -> list[str]:
    path = Path(TOY_HELDOUT if gcfg.prompts == "toy" else gcfg.prompts)
    if not path.is_file():
        raise DiffalignError(f"guards.prompts: {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()][: gcfg.max_prompts]


def build_monitors(gcfg: GuardsConfig) -> list[Monitor]:
    """Checked monitor configs (typos name the key, e.g. guards.monitors.fidelity.limt) -> Monitors."""
    monitors = []
    for name, spec in gcfg.monitors.items():
        where = f"guards.monitors.{name}"
        if not isinstance(spec, dict):
            raise DiffalignError(f"{where}: expected a mapping {{kind, rule, limit, ...}}, got {spec!r}")
        mc = from_dict(MonitorConfig, spec, where=where)
        if mc.kind == "scorer" and not mc.scorer:
            raise DiffalignError(f"{where}.scorer: kind scorer needs a scorer name")
        monitors.append(Monitor.build(name, **vars(mc)))
    return monitors


class GuardRun:
    def __init__(self, gcfg, family, reward, params: dict, out: Path, accelerator, unit: str, generate=None):
        self.gcfg, self.family, self.reward, self.params = gcfg, family, reward, params
        self.accelerator, self.unit, self.path = accelerator, unit, Path(out) / "guards.jsonl"
        self.main = accelerator.is_main_process
        self.generate = generate  # sharded: every process draws a share, the main process gets them all
        self.draws = self.main or generate is not None  # the processes that run the check's forwards
        self.monitors = build_monitors(gcfg) if self.main else []
        prompts = guard_prompts(gcfg)
        g = gcfg.images_per_prompt
        self.group = g
        self.prompts = [p for p in prompts for _ in range(g)]  # (P*G,) flat index p * G + k
        self.seeds = [gcfg.seed + i for i in range(len(self.prompts))]
        self.kw = {"steps": gcfg.steps, **({"guidance": gcfg.guidance} if gcfg.guidance > 0 else {})}
        self.base_images = self.base = None
        self.best = None  # (reward, step, {name: tensor}) of the best passing evaluation
        self.tripped, self.last = [], None

    @classmethod
    def build(cls, gcfg: GuardsConfig, family, reward, params, out, accelerator, unit: str, generate=None):
        """None when guards are off (every: 0); `reward` = a scorer or a scorer name (ranks passing checks);
        `generate(prompts, seeds, kw)`: a sharded run's shared draw (None: the main process draws alone)."""
        if not gcfg.every:
            return None
        if not gcfg.monitors:
            raise DiffalignError("guards.every > 0 needs at least one entry in guards.monitors")
        if accelerator.is_main_process:
            reward = load_scorer(gcfg.reward) if gcfg.reward else reward
            reward = FrameReduced(load_scorer(reward) if isinstance(reward, str) else reward)  # videos: frame mean
        return cls(gcfg, family, reward, params, out, accelerator, unit, generate)

    def sample(self):
        """The check's images: on the main process (None on the others when the draw is shared)."""
        if self.generate is not None:
            return self.generate(self.prompts, self.seeds, self.kw)
        images = []
        for i in range(0, len(self.prompts), 64):
            images += self.family.generate(self.prompts[i : i + 64], seeds=self.seeds[i : i + 64], **self.kw)
        return images

    def start(self, resumed_from: Path | None = None, saved: dict | None = None) -> None:
        """Base images (adapters off) and base values; the base counts as a passing evaluation at step 0.

        After a `--resume` (checkpoint folder `resumed_from`, its state `saved`; guards.jsonl already cut to it) the
        base is measured again (same seeds, adapters off: the same images) but not logged twice, and the best
        passing copy and the last check come back from the checkpoint."""
        if self.draws:
            with reference_mode(self.family.denoiser):
                self.base_images = self.sample()
        if self.main:
            self.base = measure_all(self.monitors, self.base_images, self.prompts, self.group, self.base_images)
        if resumed_from is None or "guards" not in saved:  # a fresh run, or guards switched on at the resume
            self._judge(0, self.base_images, base=True)
            return
        state, kept = saved["guards"], load_checkpoint_tensors(resumed_from, "guards_best")  # every process
        self.last = state["last"]
        if state["best"] is not None and kept is not None:
            reward, step = state["best"]
            self.best = (
                reward,
                step,
                {k: place_like(kept[k].to(p.device, p.dtype), p) for k, p in self.params.items()},
            )

    def checkpoint_parts(self) -> tuple[dict, dict]:
        """({"guards": state} for the checkpoint's state.json, {"guards_best": weights} for its tensors), on the main
        process. Every process calls it: a sharded copy is gathered first (a collective)."""
        gathers = self.best is not None and (self.main or self.generate is not None)  # sharded: every process
        tensors = {"guards_best": full_tensors(self.best[2])} if gathers else {}
        if not self.main:
            return {}, {}
        best = None if self.best is None else [self.best[0], self.best[1]]
        return {"guards": {"best": best, "last": self.last}}, tensors

    def due(self, n: int, last: int) -> bool:
        return n % self.gcfg.every == 0 or n == last

    def check(self, n: int) -> bool:
        """Measure after step/round n; True if a guard tripped (every process gets the same answer)."""
        images = self.sample() if self.draws else None
        self.tripped = self._judge(n, images, base=False)
        return bool(self.tripped)

    def _judge(self, n: int, images, base: bool) -> list[str]:
        """The main process measures and records check n; every process gets the tripped rules and, when the check
        passed with the best reward so far, keeps a copy of (its shard of) the LoRA."""
        verdict = [[], None]  # tripped rules, the reward of a new best passing check (None: not one)
        if self.main:
            values = (
                self.base if base else measure_all(self.monitors, images, self.prompts, self.group, self.base_images)
            )
            failed = [] if base else trips(self.monitors, values, self.base)
            reward = self._record(n, images, values, failed)
            verdict = [failed, reward if not failed and (self.best is None or reward > self.best[0]) else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(verdict)
        if verdict[1] is not None:
            self.best = (verdict[1], n, {k: p.detach().clone() for k, p in self.params.items()})
        return verdict[0]

    def _record(self, n: int, images, values: dict, failed: list[str]) -> float:
        """guards.jsonl, the trackers and a line when a rule tripped; returns the check's mean reward."""
        with torch.no_grad():
            reward = float(self.reward(images, self.prompts).float().mean())
        row = {self.unit: n, "reward": reward, **values, "passed": not failed}
        if failed:
            row["tripped"] = failed
        self.accelerator.log({f"guard/{k}": v for k, v in {"reward": reward, **values}.items()}, step=n)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last = n
        if failed:
            print(f"guard tripped at {self.unit} {n}: " + "; ".join(failed), flush=True)
        return reward

    def finish(self) -> dict:
        """Put the kept weights back into the LoRA (every process: its copy or shard) and say which step they are."""
        keep = self.best is not None and (self.tripped or self.gcfg.keep_best)
        if keep:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.best[2][k])
        if not self.main:
            return {}
        kept = self.best[1] if keep else self.last
        info = {"tripped": self.tripped, f"kept_{self.unit}": kept, "kept_reward": self.best[0] if keep else None}
        how = "best passing" if keep else "last"
        print(f"guards: lora/ holds the {how} weights, {self.unit} {kept}" + (" (the base)" if kept == 0 else ""))
        plot_guards(self.path, self.path.parent / "eval" / "guards.png", self.unit, kept)
        return info


def plot_guards(path: Path, out_png: Path, unit: str, kept: int | None) -> Path | None:
    """guards.png: one panel per logged value (the ranking reward and each monitor) against step/round, the base
    value dashed, failed checks in red, the kept weights' step marked. None when guards.jsonl has no rows."""
    from diffalign.engine.curves import read_rows

    rows = read_rows(path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows[0] if k not in (unit, "passed", "tripped")]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    xs = [r[unit] for r in rows]
    for ax, name in zip(axes[0], names):
        ax.plot(xs, [r[name] for r in rows], "o-", color="#3b7dd8", ms=3)
        bad = [r for r in rows if not r["passed"]]
        ax.plot([r[unit] for r in bad], [r[name] for r in bad], "o", color="#d83b3b")
        ax.axhline(rows[0][name], color="gray", ls="--", lw=1)  # unit 0 = the base model
        if kept is not None:
            ax.axvline(kept, color="#2a9d4b", lw=1)
        ax.set_title(f"guard {name}", fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"kept: {unit} {kept} (green); failed checks red; base dashed", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
