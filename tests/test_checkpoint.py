"""Checkpoints: exact round trip of params/optimizer/scheduler/RNG, atomic writes, pruning, `latest`; and end to end,
a training process killed (SIGKILL mid-save) or stopped (SIGTERM) resumes to exactly the uninterrupted run."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from diffalign.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from diffalign.data.sampler import ResumableSampler
from diffalign.errors import DiffalignError


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=20)
    return model, opt, sched


def _train(model, opt, sched, gen, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) ** 2).mean() + torch.rand(()) * 0  # consumes the global RNG too
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_round_trip_continues_exactly(tmp_path):
    model, opt, sched = _setup()
    gen = torch.Generator().manual_seed(1)
    _train(model, opt, sched, gen, 3)
    params = dict(model.named_parameters())
    random.seed(5)
    np.random.seed(5)
    save_checkpoint(tmp_path, 3, params, opt, sched, {"noise": gen}, {"data_position": 24})
    expected = _train(model, opt, sched, gen, 4)
    expected_py, expected_np = random.random(), np.random.rand()

    model2, opt2, sched2 = _setup(seed=99)  # different init: everything must come from the checkpoint
    gen2 = torch.Generator().manual_seed(12345)
    state = load_checkpoint(
        resolve_resume("latest", tmp_path), dict(model2.named_parameters()), opt2, sched2, {"noise": gen2}
    )
    assert state["step"] == 3 and state["data_position"] == 24
    assert _train(model2, opt2, sched2, gen2, 4) == expected
    assert random.random() == expected_py and np.random.rand() == expected_np


def test_pruning_latest_and_incomplete_folders_ignored(tmp_path):
    model, opt, sched = _setup()
    params = dict(model.named_parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, params, opt, sched, {}, {"data_position": step}, keep=2)
    (tmp_path / "step-000009.tmp-123").mkdir()  # a save killed half-way
    (tmp_path / "step-000010").mkdir()  # no state.json: incomplete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert resolve_resume("latest", tmp_path).name == "step-000003"


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    params = dict(model.named_parameters())
    save_checkpoint(tmp_path, 1, params, opt, sched, {}, {"data_position": 1})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffalign.checkpoint.json.dump", disk_full)
    with pytest.raises(DiffalignError) as err:
        save_checkpoint(tmp_path, 2, params, opt, sched, {}, {"data_position": 2})
    message = str(err.value)
    assert "step-000002: checkpoint not written (No space left on device)" in message and "\n" not in message
    assert message.endswith("complete checkpoints kept: step-000001")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())


def test_leftover_temp_folders_are_removed_by_the_next_save(tmp_path):
    model, opt, sched = _setup()
    params = dict(model.named_parameters())
    (tmp_path / "step-000004.tmp-99999").mkdir(parents=True)  # a save killed half-way by another process
    (tmp_path / "step-000004.tmp-99999" / "trainable.safetensors").write_bytes(b"half")
    assert list_checkpoints(tmp_path) == []
    save_checkpoint(tmp_path, 2, params, opt, sched, {}, {"data_position": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_damaged_checkpoint_is_a_one_line_error(tmp_path):
    model, opt, sched = _setup()
    params = dict(model.named_parameters())
    path = save_checkpoint(tmp_path, 1, params, opt, sched, {}, {"data_position": 1})
    (path / "optimizer.safetensors").write_bytes(b"\x00" * 16)  # damaged after it was written
    with pytest.raises(DiffalignError, match=r"step-000001: unreadable checkpoint \(SafetensorError"):
        load_checkpoint(path, params, opt, sched, {})


def test_resume_errors_name_the_path(tmp_path):
    with pytest.raises(DiffalignError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(DiffalignError, match="not a complete checkpoint folder"):
        resolve_resume(str(tmp_path), tmp_path)
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, dict(model.named_parameters()), opt, sched, {}, {"data_position": 0})
    other = torch.nn.Linear(4, 2)
    with pytest.raises(DiffalignError, match="trainable parameters do not match"):
        load_checkpoint(tmp_path / "step-000001", {"w": other.weight}, opt, sched, {})


def test_sampler_resumes_mid_stream_and_shards_processes():
    full = ResumableSampler(10, seed=3)
    stream = iter(full)
    first = [next(stream) for _ in range(25)]  # crosses two epoch boundaries
    assert sorted(first[:10]) == list(range(10)) and first[:10] != first[10:20]
    resumed = iter(ResumableSampler(10, seed=3, start=13))
    assert [next(resumed) for _ in range(12)] == first[13:25]
    r0, r1 = (
        iter(ResumableSampler(10, seed=3, rank=0, world_size=2)),
        iter(ResumableSampler(10, seed=3, rank=1, world_size=2)),
    )
    both = [x for _ in range(5) for x in (next(r0), next(r1))]
    assert both == first[:10]


# ---------------------------------------------------------------------------------------------------------------
# End to end: a real `diffalign train` process killed with SIGKILL (during a checkpoint save) or stopped with SIGTERM,
# then resumed with `--resume latest`; its per-step losses must equal an uninterrupted run's. grad_accum = 2, so a
# checkpoint taken inside an accumulation cycle would show up as a loss mismatch.

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "train",
    str(REPO / "configs/tiny/sd15_dpo.yaml"),
    f"model.path={REPO / 'assets/tiny/sd15'}",
    "train.max_steps=8",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=10",
    "train.log_every=1",
    "train.tensorboard=false",
]
_UNINTERRUPTED: dict = {}


@pytest.fixture
def pairs_file(tmp_path_factory):
    from data_factory import make_rows, write_parquet

    if "pairs" not in _UNINTERRUPTED:
        _UNINTERRUPTED["pairs"] = write_parquet(tmp_path_factory.mktemp("pairs") / "p.parquet", make_rows(12, seed=3))
    return _UNINTERRUPTED["pairs"]


@pytest.fixture
def uninterrupted(pairs_file, tmp_path_factory):
    """The reference: the same run in this process, never interrupted (made once per session)."""
    from diffalign.pipelines.cli import main

    if "run" not in _UNINTERRUPTED:
        run = tmp_path_factory.mktemp("uninterrupted") / "run"
        assert main([*ARGS, f"data.source={pairs_file}", f"train.output_dir={run}"]) == 0
        _UNINTERRUPTED["run"] = run
    return _UNINTERRUPTED["run"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _start(run: Path, pairs: Path, pause: str) -> subprocess.Popen:
    """`diffalign train` in a subprocess; pause "STEP:SECONDS" holds the save of checkpoint STEP after its first file."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DIFFALIGN_TEST_SAVE_PAUSE=pause)
    log = open(run.parent / f"{run.name}.log", "w")
    cmd = [sys.executable, "-m", "diffalign.pipelines.cli", *ARGS, f"data.source={pairs}", f"train.output_dir={run}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_until(done, proc: subprocess.Popen, run: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not done():
        log = (run.parent / f"{run.name}.log").read_text()
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the test could interrupt it:\n{log[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for the run:\n{log[-2000:]}")
        time.sleep(0.01)


def _assert_same_run(run: Path, reference: Path) -> None:
    rows, expected = _metrics(run), _metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, 9))  # no duplicated or garbled rows
    for got, want in zip(rows, expected):
        for key in ("loss", "reward_margin", "err_w", "err_l", "lr"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), (got["step"], key)
    lora = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    ref = load_file(str(reference / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora.keys() == ref.keys() and all(torch.allclose(lora[k], ref[k], atol=1e-6) for k in ref)


@pytest.fixture
def killed_mid_save(pairs_file, tmp_path_factory, tmp_path):
    """A copy of a run SIGKILLed while writing its step-6 checkpoint (after logging step 6; 2 and 4 complete)."""
    if "killed" not in _UNINTERRUPTED:
        run = tmp_path_factory.mktemp("killed") / "run"
        proc = _start(run, pairs_file, pause="6:60")  # the kill lands inside the step-6 save
        half_saved = lambda: list((run / "checkpoints").glob("step-000006.tmp-*/trainable.safetensors"))  # noqa: E731
        _wait_until(half_saved, proc, run)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        _UNINTERRUPTED["killed"] = run
    return Path(shutil.copytree(_UNINTERRUPTED["killed"], tmp_path / "killed"))


def test_kill_during_save_keeps_the_last_good_checkpoint(killed_mid_save, uninterrupted):
    ckpt = killed_mid_save / "checkpoints"
    assert len(list(ckpt.glob("step-000006.tmp-*"))) == 1  # the half-written save is still there...
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-000002", "step-000004"]  # ...and ignored
    assert resolve_resume("latest", ckpt).name == "step-000004"
    for name in ("trainable.safetensors", "optimizer.safetensors"):  # intact: bitwise what the clean run wrote
        got, want = (
            load_file(str(run / "checkpoints" / "step-000004" / name)) for run in (killed_mid_save, uninterrupted)
        )
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_sigkill_then_resume_latest_equals_the_uninterrupted_run(killed_mid_save, uninterrupted, pairs_file):
    from diffalign.pipelines.cli import main

    assert [r["step"] for r in _metrics(killed_mid_save)] == list(range(1, 7))  # logged past the checkpoint
    args = [*ARGS, f"data.source={pairs_file}", f"train.output_dir={killed_mid_save}", "--resume", "latest"]
    assert main(args) == 0
    _assert_same_run(killed_mid_save, uninterrupted)
    assert not list((killed_mid_save / "checkpoints").glob("*.tmp-*"))  # cleaned up by the step-6 save


def test_sigterm_saves_at_a_step_boundary_exits_143_and_resumes(pairs_file, uninterrupted, tmp_path):
    from diffalign.pipelines.cli import main

    run = tmp_path / "stopped"
    proc = _start(run, pairs_file, pause="4:1")
    _wait_until(lambda: list((run / "checkpoints").glob("step-000004.tmp-*")), proc, run)
    proc.send_signal(signal.SIGTERM)  # lands during the step-4 save: step 5 runs, then the loop saves and stops
    assert proc.wait(timeout=60) == 143
    log = (tmp_path / "stopped.log").read_text()
    assert "SIGTERM: saved checkpoint at step 5; resume with --resume latest" in log
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002", "step-000004", "step-000005"]
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]
    assert main([*ARGS, f"data.source={pairs_file}", f"train.output_dir={run}", "--resume", "latest"]) == 0
    _assert_same_run(run, uninterrupted)
