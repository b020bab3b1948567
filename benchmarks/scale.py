"""How the cache's costs grow with the number of pairs N, on a synthetic Pick-a-Pic-shaped set (tiny SDXL, 64 px).

    python benchmarks/scale.py                                  # N = 1000, 4000, 16000
    python benchmarks/scale.py --sizes 64 --steps 2 --processes 1 --repeats 2   # smoke test (tests/...smoke.py)

The data set is made by `make_pickapic` (seeded): N pairs, N / 16 captions (Pick-a-Pic v2: 959,040 pairs, ~16
per caption), captions assigned to pairs in a shuffled order, two JPEGs of 64-112 px per pair (seeded noise plus
shapes), hard labels (no ties), one parquet file. Every figure comes from running the shipped commands as a user
does, one process per measurement (assets/tiny/sdxl, configs/tiny/sdxl_dpo.yaml, fp32 on CPU):

  bytes/pair      parquet size / N; cache: pair shards / N, text shards / N (and per caption), and what format 1
                  (cond stored with every pair) would have used for the text
  build s         `diffalign cache` with 1 process and with `accelerate launch --num_processes 2` (CPU, gloo), each
                  process with one torch thread (one core stands for one GPU): index.json's build_seconds (from
                  the first barrier to the index, so without start-up and model loading), the median of
                  --repeats builds per process count (default: as many as make ~10 s of 1-process build, at most
                  5, alternating 1 and 2 processes: a 2-second build is mostly noise); ratio 2p / 1p; and
                  per process the seconds of each phase (build-phases.jsonl: encoding its pair shards, waiting
                  for the others, encoding its text shards)
  steps/s         `diffalign train` (batch 4, --steps steps, DataLoader in the main process) from the cache and from
                  the raw parquet (VAE + text encoders every step), from the run's metrics.jsonl
  peak RSS MB     the cache training run's max RSS (wait4), and a pass that reads every pair of the cache once in
                  the training order (ResumableSampler + EpochView + DataLoader): max RSS and the growth during it

Targets (issue #21): text bytes grow with captions, not pairs; 2-process build <= 0.6x the 1-process time; peak
RSS flat in N; training from the cache faster than from raw images at every N. Timings on a shared machine are
distorted (above all the 2-process build, which needs two idle cores): check the recorded load.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_io import machine, write_results  # noqa: E402

PAIRS_PER_CAPTION = 16
CONFIG = REPO / "configs/tiny/sdxl_dpo.yaml"
# SDXL at 1024², fp16, for the extrapolation: latents (4, 128, 128); prompt_embeds (77, 2048); pooled (1280)
# per pair besides the latents: size_info_w, size_info_l (4,) int64 each; label fp32; index, caption hash int64
SDXL = {"latent": 4 * 128 * 128 * 2, "text": (77 * 2048 + 1280) * 2, "size_info": 2 * 4 * 8, "ids": 4 + 8 + 8}
PICKAPIC = {"pairs": 959_040, "parquet_bytes": 322e9, "pairs_per_caption": PAIRS_PER_CAPTION}


def make_pickapic(path: Path, n: int, seed: int = 0) -> Path:
    """Write N seeded Pick-a-Pic-shaped pairs (caption, jpg_0, jpg_1, label_0, label_1) to one parquet file."""
    rng = random.Random(seed)
    captions = max(1, n // PAIRS_PER_CAPTION)
    owner = [i % captions for i in range(n)]
    rng.shuffle(owner)  # a caption's pairs are spread over the file, as in Pick-a-Pic
    noise = np.random.default_rng(seed)

    def image() -> bytes:
        w, h = rng.randrange(64, 113), rng.randrange(64, 113)
        pixels = noise.integers(0, 64, (h, w, 3), dtype=np.uint8) + np.uint8(rng.randrange(0, 160))
        img = Image.fromarray(pixels)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.randrange(w // 2), rng.randrange(h // 2)
            draw.rectangle([x, y, x + rng.randrange(8, w // 2), y + rng.randrange(8, h // 2)], fill=rng.randrange(255))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    texts = [
        f"synthetic prompt {k}: a {rng.choice(['red', 'blue', 'green'])} scene, detailed" for k in range(captions)
    ]
    label_0 = [float(rng.random() < 0.5) for _ in range(n)]
    table = pa.table(
        {
            "caption": [texts[k] for k in owner],
            "jpg_0": pa.array([image() for _ in range(n)], pa.binary()),
            "jpg_1": pa.array([image() for _ in range(n)], pa.binary()),
            "label_0": label_0,
            "label_1": [1.0 - v for v in label_0],
        }
    )
    pq.write_table(table, path)
    return path


# Linux carries a process's max RSS across exec, so a child spawned by this (large) process would report at least
# this process's RSS; a small launcher in between spawns the command and reports the command's own peak.
LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, u = os.wait4(p.pid, 0); "
    "print(f'maxrss_kb={u.ru_maxrss}', flush=True); sys.exit(os.waitstatus_to_exitcode(s))"
)


def run(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """Run a command to the end: (wall seconds, its max RSS in MB, its output); fails loudly on error."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO))
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        launched = [sys.executable, "-c", LAUNCHER, *cmd]
        code = subprocess.run(launched, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if code != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{output[-3000:]}")
    maxrss_kb = int(output.rsplit("maxrss_kb=", 1)[1].split()[0])
    return wall, maxrss_kb / 1024, output


def cli(*args: str, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "diffalign.pipelines.cli", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(port)]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "diffalign.pipelines.cli", *args]


def data_args(source: Path, cache: Path | None) -> list[str]:
    args = [str(CONFIG), f"model.path={REPO / 'assets/tiny/sdxl'}", f"data.source={source}"]
    return args + ([f"data.cache_dir={cache}", "data.cache_shard_size=256"] if cache else [])


def vm_hwm_mb() -> float:
    """This process's peak resident set since exec (VmHWM), in MB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def read_pass(cache: str, batch: int) -> dict:
    """(In a fresh process) read every pair of the cache once in the training order; RSS before/after, pairs/s."""
    from torch.utils.data import DataLoader

    from diffalign.data import CachedPairs, collate
    from diffalign.data.sampler import EpochView, ResumableSampler

    pairs = CachedPairs(cache)
    before = vm_hwm_mb()
    loader = DataLoader(EpochView(pairs), batch_size=batch, sampler=ResumableSampler(len(pairs)), collate_fn=collate)
    start, seen = time.perf_counter(), 0
    for batch_data in loader:
        seen += len(batch_data["label"])
        if seen >= len(pairs):
            break
    seconds = time.perf_counter() - start
    peak = vm_hwm_mb()
    return {"pairs": seen, "pairs_per_s": seen / seconds, "rss_before_mb": before, "peak_rss_mb": peak}


def build_once(source: Path, cache: Path, processes: int) -> dict:
    """One `diffalign cache` run: wall seconds, index.json's build_seconds and each process's phase seconds."""
    wall, _, _ = run(cli("cache", *data_args(source, cache), processes=processes), threads=1)
    build = json.loads((cache / "index.json").read_text())["build_seconds"]
    lines = [json.loads(x) for x in (cache / "build-phases.jsonl").read_text().splitlines()]
    phases = {str(x["rank"]): x["phases"] for x in lines}  # per process: pairs_s, wait_pairs_s, text_s
    return {"wall_s": wall, "build_s": build, "phases": phases}


def measure(n: int, work: Path, args) -> dict:
    source = make_pickapic(work / f"pickapic-{n}.parquet", n, seed=args.seed)
    row: dict = {"pairs": n, "captions": max(1, n // PAIRS_PER_CAPTION), "parquet_bytes": source.stat().st_size}

    runs: dict[int, list[dict]] = {p: [] for p in args.processes}
    repeats, i = args.repeats, 0
    while i < repeats or i == 0:  # the process counts alternate, so each repeat sees the same machine
        for p in args.processes:
            cache = work / (f"cache-{n}-{p}p" if i == 0 else f"cache-{n}-{p}p-again")  # the first is kept
            runs[p].append(build_once(source, cache, p))
            if i > 0:
                shutil.rmtree(cache)
        if i == 0 and repeats == 0:  # auto: enough builds for ~min_build_seconds of 1-process build, at most 5
            repeats = min(5, max(1, math.ceil(args.min_build_seconds / max(runs[1][0]["build_s"], 1e-3))))
        i += 1
    builds = {}
    for p, done in runs.items():  # the median build (its phases too); every repeat's seconds alongside
        median = sorted(done, key=lambda b: b["build_s"])[len(done) // 2]
        builds[p] = {**median, "all_build_s": [b["build_s"] for b in done]}
    row["build"] = builds
    if len(builds) > 1:
        row["build_2p_over_1p"] = builds[max(builds)]["build_s"] / builds[1]["build_s"]

    cache = work / f"cache-{n}-1p"
    index = json.loads((cache / "index.json").read_text())
    size = {kind: sum(f.stat().st_size for f in cache.glob(f"{kind}-*.safetensors")) for kind in ("pairs", "text")}
    per_caption = size["text"] / index["captions"]
    from diffalign.data.shards import ShardFile

    row["cache"] = {
        "text_rows": sum(ShardFile(cache / name).rows("caption") for name in index["text"]),
        "pair_bytes_per_pair": size["pairs"] / n,
        "text_bytes": size["text"],
        "text_bytes_per_caption": per_caption,
        "text_bytes_per_pair": size["text"] / n,
        "format1_text_bytes_per_pair": per_caption,  # cond stored with every pair
        "bytes_per_pair": (size["pairs"] + size["text"]) / n,
        "raw_parquet_bytes_per_pair": row["parquet_bytes"] / n,
    }

    train = {}
    for kind, cache_dir in (("cache", cache), ("raw", None)):
        out = work / f"train-{n}-{kind}"
        steps = [f"train.max_steps={args.steps}", f"train.log_every={args.steps}", "train.batch_size=4"]
        steps += ["train.tensorboard=false", f"train.output_dir={out}", "train.checkpoint_every=0"]
        _, rss, _ = run(cli("train", *data_args(source, cache_dir), *steps), threads=args.threads)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train[kind] = {"steps_per_s": metrics[-1]["steps_per_s"], "peak_rss_mb": rss}
    train["cache_over_raw_speed"] = train["cache"]["steps_per_s"] / train["raw"]["steps_per_s"]
    row["train"] = train

    _, _, output = run([sys.executable, __file__, "--read-pass", str(cache)], threads=args.threads)
    row["read_pass"] = json.loads(next(ln for ln in output.splitlines() if ln.startswith("{")))
    return row


def extrapolate() -> dict:
    """Bytes per pair for SDXL at 1024² (fp16) on Pick-a-Pic v2, from the tensor shapes (not from the tiny model)."""
    pairs, captions = PICKAPIC["pairs"], PICKAPIC["pairs"] / PICKAPIC["pairs_per_caption"]
    latents = 2 * SDXL["latent"] + SDXL["size_info"] + SDXL["ids"]
    flipped = 2 * (2 * SDXL["latent"] + SDXL["size_info"]) + SDXL["ids"]  # both orientations stored
    text = SDXL["text"] * captions
    return {
        "latent_bytes_per_pair": latents,
        "text_bytes_per_caption": SDXL["text"],
        "captions": captions,
        "cache_bytes": latents * pairs + text,
        "cache_bytes_with_hflip": flipped * pairs + text,
        "format1_bytes": (latents + SDXL["text"]) * pairs,
        "raw_parquet_bytes": PICKAPIC["parquet_bytes"],
    }


def print_table(rows: list[dict], sdxl: dict) -> None:
    print(f"{'N':>6} {'capt':>5} | {'raw B/p':>8} {'cache B/p':>9} {'text B/p':>8} {'fmt1 text':>9} |", end="")
    print(f" {'build 1p':>8} {'2p':>6} {'2p/1p':>5} | {'cache st/s':>10} {'raw st/s':>8} {'x':>5} |", end="")
    print(f" {'RSS train':>9} {'RSS read':>8} {'read grow':>9}")
    for r in rows:
        c, b, t, rp = r["cache"], r["build"], r["train"], r["read_pass"]
        two = b.get(2, {}).get("build_s", float("nan"))
        print(
            f"{r['pairs']:>6} {r['captions']:>5} | {c['raw_parquet_bytes_per_pair']:>8.0f} {c['bytes_per_pair']:>9.0f}",
            end="",
        )
        print(f" {c['text_bytes_per_pair']:>8.0f} {c['format1_text_bytes_per_pair']:>9.0f} |", end="")
        print(f" {b[1]['build_s']:>8.1f} {two:>6.1f} {r.get('build_2p_over_1p', float('nan')):>5.2f} |", end="")
        print(
            f" {t['cache']['steps_per_s']:>10.2f} {t['raw']['steps_per_s']:>8.2f} {t['cache_over_raw_speed']:>5.2f} |",
            end="",
        )
        print(
            f" {t['cache']['peak_rss_mb']:>9.0f} {rp['peak_rss_mb']:>8.0f} {rp['peak_rss_mb'] - rp['rss_before_mb']:>9.1f}"
        )
    for r in rows:
        for p, b in r["build"].items():
            per_rank = " | ".join(
                f"rank {k}: pairs {v['pairs_s']:.1f}, wait {v['wait_pairs_s']:.1f}, text {v['text_s']:.1f}"
                for k, v in sorted(b["phases"].items())
            )
            again = ", ".join(f"{x:.1f}" for x in b["all_build_s"])
            print(f"N {r['pairs']}, {p} process(es), builds {again} s; the median's phases in s: {per_rank}")
    gb = 1e9
    print(
        f"SDXL 1024² fp16 on Pick-a-Pic v2: {sdxl['cache_bytes'] / gb:.0f} GB cache "
        f"({sdxl['cache_bytes'] / sdxl['raw_parquet_bytes']:.2f}x the {sdxl['raw_parquet_bytes'] / gb:.0f} GB parquet; "
        f"{sdxl['cache_bytes_with_hflip'] / gb:.0f} GB with hflip) vs {sdxl['format1_bytes'] / gb:.0f} GB with cond per pair"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="numbers of pairs N")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="build with these process counts")
    parser.add_argument(
        "--repeats", type=int, default=0, help="builds per process count, median reported (0: auto, see below)"
    )
    parser.add_argument(
        "--min-build-seconds", type=float, default=10.0, help="auto repeats: until ~this much 1-process build, <= 5"
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="keep data and caches here (default: a temp folder)")
    parser.add_argument("--json", default="", help="results file (default benchmarks/results/scale.json)")
    parser.add_argument("--read-pass", default="", help=argparse.SUPPRESS)  # internal: one read pass, JSON line
    args = parser.parse_args()
    if args.read_pass:
        print(json.dumps(read_pass(args.read_pass, batch=16)))
        return
    if 1 not in args.processes:
        parser.error("--processes must include 1 (the reference build)")
    with tempfile.TemporaryDirectory(prefix="diffalign-scale-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sdxl, rows = extrapolate(), []
        for n in args.sizes:  # results are written after each N: a long run interrupted keeps what it measured
            rows.append(measure(n, work, args))
            out = {"machine": machine(), "settings": vars(args), "rows": rows, "sdxl_pickapic_v2": sdxl}
            write_results(out, args.json, "scale.json")
    print_table(rows, sdxl)


if __name__ == "__main__":
    main()
