"""Two processes (accelerate launch, CPU + gloo) x 2 pairs == one process x 4 pairs; only rank 0 writes; resume.

Why they can match: the sampler gives rank r the global positions r, r+2, ... of the one data stream, so each step
the two ranks together see the same 4 pairs as the single process; every pair's t and eps come from a generator
keyed on (seed, epoch, pair index), not from a per-process stream; the loss is a mean over pairs and DDP averages
the two ranks' gradients, so the update is the same. It is not bitwise (batch-2 vs batch-4 kernels round
differently, beta/2 = 1000 amplifies it, AdamW's first steps are ~ lr * sign(g)); the tolerance is checked against
a control run that feeds different pairs, which is what a rank whose gradients were not all-reduced would train on.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from safetensors.torch import load_file
from test_train_cli import lora_distance

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "train",
    str(REPO / "configs/tiny/sd15_dpo.yaml"),
    f"model.path={REPO / 'assets/tiny/sd15'}",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.tensorboard=false",
]
LOSS_TOL, LORA_TOL = 5e-4, 1e-4  # measured: 6e-5 and 1.3e-6; different pairs: 5e-3..4e-2 and 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> str:
    """`accelerate launch` 2 CPU processes (gloo) of `diffalign train`; returns the combined output."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "diffalign.pipelines.cli",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lora(run: Path) -> dict:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("path", sorted((REPO / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_accelerate_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert path.read_text().startswith("# ")  # a header says what it is for and how to launch it
    supported = {
        "ddp_multi_gpu": "MULTI_GPU",
        "multi_node": "MULTI_GPU",
        "fsdp": "FSDP",
        "fsdp_multi_node": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
    }
    assert config.distributed_type.value == supported[path.stem]
    assert config.mixed_precision == "no"  # precision comes from train.mixed_precision (it wins over this file)


@pytest.mark.numerics
@pytest.mark.slow  # two `accelerate launch` runs of 2 processes: ~45 s on 2 shared cores
def test_two_processes_equal_one_with_the_doubled_batch_and_resume(tmp_path):
    pairs = write_parquet(tmp_path / "pairs.parquet", make_rows(12, seed=3))
    data = [f"data.source={pairs}", f"data.cache_dir={tmp_path / 'cache'}"]
    one, control, two, resumed = (tmp_path / name for name in ("one", "control", "two", "resumed"))
    assert main([*ARGS, *data, "train.batch_size=4", f"train.output_dir={one}"]) == 0
    assert main([*ARGS, *data, "train.batch_size=2", f"train.output_dir={control}"]) == 0
    # its own cache folder: the main process builds it while the other waits, then both read it
    data2 = [f"data.source={pairs}", f"data.cache_dir={tmp_path / 'cache2'}"]
    output = _launch(*ARGS, *data2, "train.batch_size=2", f"train.output_dir={two}")
    assert output.count("caching cache2") >= 1 and (tmp_path / "cache2" / "index.json").is_file()
    assert not list(tmp_path.glob(".cache2.tmp-*"))  # one builder, finished

    # the same training as one process with the doubled batch ...
    for a, b in zip(_metrics(one), _metrics(two)):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOL), a["step"]
    assert lora_distance(_lora(one), _lora(two)) < LORA_TOL
    # ... which the tolerance can tell apart from training on other pairs (a rank that skipped the all-reduce)
    assert lora_distance(_lora(one), _lora(control)) > 100 * LORA_TOL
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(_metrics(one), _metrics(control))) > 2 * LOSS_TOL

    # only rank 0 wrote: one row per step, one LoRA message, one checkpoint folder per save, no temp leftovers
    assert [r["step"] for r in _metrics(two)] == [1, 2, 3, 4]
    assert output.count("saved LoRA to") == 1 and output.count("data: ") == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002"]

    # the 2-process run resumes exactly from its step-2 checkpoint
    shutil.copytree(two / "checkpoints", resumed / "checkpoints")
    (resumed / "metrics.jsonl").write_text((two / "metrics.jsonl").read_text())  # rows 3, 4 must be replaced
    output = _launch(*ARGS, *data2, "train.batch_size=2", f"train.output_dir={resumed}", "--resume", "latest")
    assert output.count("resumed from") == 1
    assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3, 4]
    for a, b in zip(_metrics(two), _metrics(resumed)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    assert lora_distance(_lora(two), _lora(resumed)) < 1e-6


# ---- on-line: each process samples its share of a round and trains on its share of every step's rows ------------

ONLINE = [
    "online",
    f"model.path={REPO / 'assets/tiny/sd15'}",
    "lora.rank=4",
    "lora.alpha=4",
    "sampling.prompts_per_round=4",
    "sampling.images_per_prompt=2",
    "sampling.sample_batch=4",  # 2 chunks: one per process, or both in one process (same keyed noise either way)
    "sampling.steps=2",
    "sampling.guidance=2.0",
    "train.steps_per_round=2",
    "reward.scorer=toy_aesthetic",
    "reward.monitor=[]",
    "online.rounds=2",
    "train.tensorboard=false",
    "eval.prompts=",
]
ONLINE_LORA_TOL = 1e-5  # measured 8e-7 (d3po); without the all-reduce of KTO z the losses differ by 3e-2


def _rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow  # one `accelerate launch` of 2 processes + two in-process runs: ~60 s on 2 shared cores
@pytest.mark.parametrize("objective", ["d3po", "kto"])
def test_online_two_processes_equal_one_with_the_doubled_batch(tmp_path, objective):
    """2 processes x 2 rows per step == 1 process x 4 rows: same round log (rewards of the gathered round, losses)
    and the same LoRA up to float rounding. KTO also checks that its baseline z is averaged over processes (each
    process alone would see only half the batch)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\nblue bird\n")
    split = {"d3po": ["pairing.split=all_pairs"], "kto": ["pairing.split=top_bottom", "objective.beta=1000"]}
    args = [*ONLINE, f"sampling.prompts={prompts}", f"objective.name={objective}", *split[objective]]
    one, control, two = (tmp_path / name for name in ("one", "control", "two"))
    assert main([*args, "train.batch_size=4", f"train.output_dir={one}"]) == 0
    assert main([*args, "train.batch_size=2", f"train.output_dir={control}"]) == 0
    output = _launch(*args, "train.batch_size=2", f"train.output_dir={two}")
    assert output.count("round 2/2") == 1  # only the main process logs and writes

    for a, b in zip(_rounds(one), _rounds(two), strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)  # the gathered round is the same round
        assert a["pairs_or_samples"] == b["pairs_or_samples"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=LOSS_TOL)
    assert lora_distance(_lora(one), _lora(two)) < ONLINE_LORA_TOL
    assert lora_distance(_lora(one), _lora(control)) > 10 * ONLINE_LORA_TOL  # half the rows: a different update
