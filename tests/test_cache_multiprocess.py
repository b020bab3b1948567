"""`diffalign cache` with 2 processes (accelerate launch, CPU + gloo) equals 1 process; a kill -9 resumes.

Which shards each run encoded is read from the cache's build-log.jsonl (one line per shard written, with the
writer's rank and pid), not from timings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_factory import make_rows, write_parquet
from test_cache import assert_same_cache, encoded_files
from test_multiprocess import _free_port

from diffalign.data import read_index

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _args(source: Path, out: Path, shard_size: int) -> list[str]:
    return [
        "cache",
        f"model.path={REPO / 'assets/tiny/sd15'}",
        "model.resolution=32",
        f"data.source={source}",
        f"data.cache_dir={out}",
        "data.drop_ties=false",
        "data.hflip=true",
        f"data.cache_shard_size={shard_size}",
    ]


def _rows(n: int) -> list[dict]:
    rows = make_rows(n, seed=4)
    for i, row in enumerate(rows):
        row["caption"] = f"caption {i % 5}"
    return rows


def _one_process(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diffalign.pipelines.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # one `accelerate launch` of 2 processes + one plain run: ~40 s on 2 shared cores
def test_two_process_build_equals_one_process_build(tmp_path):
    source = write_parquet(tmp_path / "pairs.parquet", _rows(14))
    one, two = tmp_path / "one", tmp_path / "two"
    done = _one_process(*_args(source, one, 3))
    assert done.returncode == 0, done.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "diffalign.pipelines.cli", *_args(source, two, 3)]
    done = subprocess.run(launch, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("cache ") == 1  # the main process reports

    log = [json.loads(line) for line in (two / "build-log.jsonl").read_text().splitlines()]
    pairs_by_rank = {
        r: sorted(e["file"] for e in log if e["rank"] == r and e["file"].startswith("pairs")) for r in (0, 1)
    }
    assert pairs_by_rank == {
        0: [f"pairs-{c:05d}.safetensors" for c in (0, 2, 4)],  # 14 pairs / 3 = 5 chunks, c % 2 == rank
        1: [f"pairs-{c:05d}.safetensors" for c in (1, 3)],
    }
    phases = [json.loads(line) for line in (two / "build-phases.jsonl").read_text().splitlines()]
    assert sorted(p["rank"] for p in phases) == [0, 1]  # each process timed its own phases
    assert sorted(e["file"] for e in log) == sorted(encoded_files(one))  # the same shards, each written once
    assert read_index(two)["captions"] == 5 and read_index(two)["pairs"] == 14
    assert_same_cache(one, two)  # every tensor of two epochs of items, bitwise


@pytest.mark.slow  # two runs of `diffalign cache` as subprocesses: ~35 s on 2 shared cores
def test_kill_9_mid_build_then_rerun_encodes_only_the_unfinished_shards(tmp_path):
    source = write_parquet(tmp_path / "pairs.parquet", _rows(64))
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "diffalign.pipelines.cli", *_args(source, out, 2)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "build-log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = encoded_files(out)
    assert 3 <= len(first) < 32 and not (out / "index.json").exists(), "the build was not killed mid-way"

    done = _one_process(*_args(source, out, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    files = encoded_files(out)
    assert files[: len(first)] == first and len(set(files)) == len(files)  # nothing encoded twice
    assert sorted(f for f in files if f.startswith("pairs")) == [f"pairs-{c:05d}.safetensors" for c in range(32)]
    assert read_index(out)["pairs"] == 64 and not list(out.glob("*.tmp-*"))
