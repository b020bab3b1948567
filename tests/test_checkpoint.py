"""Checkpoints: exact round trip of params/optimizer/scheduler/RNG, atomic writes, pruning, `latest`."""

import random

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

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
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, params, opt, sched, {}, {"data_position": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())


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
