"""Resumable training checkpoints: safetensors + JSON only (no pickle), written atomically.

A checkpoint folder `step-000123/` holds
    trainable.safetensors   the trainable (LoRA) parameters by name
    optimizer.safetensors   the optimizer's per-parameter state tensors, keyed "<param index>.<name>"
    rng.safetensors         torch CPU RNG state and every named torch.Generator state
    state.json              step, optimizer param_groups and scalar state, LR-scheduler state, python/numpy RNG,
                            data position and anything else the trainer passes; written last = "complete" marker

It is written to `step-000123.tmp-<pid>/`, every file fsynced, then renamed into place, so a kill during a save never
leaves a half checkpoint under a real name; the previous checkpoints stay until the new one is complete. Leftover
`*.tmp-*` folders (a save that was killed) are ignored by `list_checkpoints` and removed by the next save. A failed
write (disk full, ...) removes its temp folder and raises a one-line DiffalignError naming the checkpoint.

Test hook: DIFFALIGN_TEST_SAVE_PAUSE=<step>:<seconds> sleeps after the first file of checkpoint <step>, so a test
can kill or signal the process in the middle of that save (tests/test_checkpoint.py). Real runs leave it unset.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffalign.errors import DiffalignError

COMPLETE = "state.json"
TEST_PAUSE = "DIFFALIGN_TEST_SAVE_PAUSE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _test_pause(step: int) -> None:
    at, _, seconds = os.environ.get(TEST_PAUSE, "").partition(":")
    if at and int(at) == step:
        time.sleep(float(seconds))


def _optimizer_parts(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors "<param idx>.<name>" (safetensors) and the rest (JSON) of an optimizer or its state_dict (an FSDP2
    run's, gathered). A nested dict in a parameter's state (bitsandbytes' 8-bit AdamW keeps its quantized moments
    under `__bnb_optimizer_quant_state__`) is flattened with "/" between the levels."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for sub, inner in value.items():
                put(f"{key}/{sub}", inner)
        elif torch.is_tensor(value):
            tensors[key] = value
        else:
            scalars[key] = value

    for idx, state in sd["state"].items():
        for name, value in state.items():
            put(f"{idx}.{name}", value)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        node = state.setdefault(int(idx), {})
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    generators: dict[str, torch.Generator],
    extra: dict,
    keep: int = 2,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint `step` atomically under ckpt_dir and prune to the newest `keep` complete ones.

    `tensors` = {file stem: {name: tensor}}: more safetensors files in the same atomic folder (the guards' kept
    copy); read them back with `load_checkpoint_tensors`.

    Call from one process only (the trainer's main process): leftover temp folders of killed saves are removed here.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f"{final.name}.tmp-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("step-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for stem, named in (tensors or {}).items():
            _save_tensors(named, tmp / f"{stem}.safetensors")
        _write(tmp, final, ckpt_dir, step, trainable, optimizer, lr_scheduler, generators, extra)
    except OSError as err:  # disk full, quota, read-only file system, ...: one line; older checkpoints untouched
        shutil.rmtree(tmp, ignore_errors=True)
        kept = ", ".join(p.name for p in list_checkpoints(ckpt_dir)) or "none"
        raise DiffalignError(
            f"{final}: checkpoint not written ({err.strerror or err}); complete checkpoints kept: {kept}"
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, final: Path, ckpt_dir: Path, step, trainable, optimizer, lr_scheduler, generators, extra):
    """The files of one checkpoint into `tmp`, fsynced, then `tmp` renamed to `final` (state.json last)."""
    _save_tensors(trainable, tmp / "trainable.safetensors")
    _test_pause(step)
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    rng.update({f"gen.{name}": g.get_state() for name, g in generators.items()})
    _save_tensors(rng, tmp / "rng.safetensors")
    np_state = np.random.get_state()
    state = {
        "step": step,
        "optimizer": opt_meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        "python_random": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        **extra,
    }
    with open(tmp / COMPLETE, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders and folders without state.json are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and "." not in p.name and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume: str, ckpt_dir: Path) -> Path:
    """`latest` -> newest complete checkpoint under ckpt_dir; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise DiffalignError(f"--resume latest: no complete checkpoint under {ckpt_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise DiffalignError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE})")
    return path


def load_checkpoint(
    path: Path,
    named_params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    generators: dict[str, torch.Generator],
    place=None,
) -> dict:
    """Restore everything save_checkpoint wrote; returns the state dict (step, extra keys).

    `place(full, param)`: lays a saved (whole) tensor out as `param` and its optimizer state (FSDP2: this process's
    shard, diffalign.engine.sharding.place_like); the files do not depend on the process count."""
    path = Path(path)
    try:
        state = json.loads((path / COMPLETE).read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, json.JSONDecodeError, FileNotFoundError) as err:  # damaged after it was written
        raise DiffalignError(
            f"{path}: unreadable checkpoint ({type(err).__name__}: {err}); try an older one"
        ) from None
    missing = set(named_params) ^ set(trainable)
    if missing:
        raise DiffalignError(
            f"{path}: trainable parameters do not match this run ({len(missing)} differ, e.g. {sorted(missing)[0]})"
        )
    place = place or (lambda full, param: full)
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(place(trainable[name], param))
    opt_state = _optimizer_state(optimizer_tensors, state["optimizer"])
    flat = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():  # moments shaped like their parameter; "step" stays a scalar
            if torch.is_tensor(value) and value.dim() and value.shape == flat[idx].shape:
                entry[key] = place(value, flat[idx])
    optimizer.load_state_dict(opt_state)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(rng["torch_cpu"])
    for name, g in generators.items():
        g.set_state(rng[f"gen.{name}"])
    py = state["python_random"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = state["numpy_random"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
    return state


def load_checkpoint_tensors(path: Path, stem: str) -> dict[str, torch.Tensor] | None:
    """The `stem` file that save_checkpoint(tensors=...) wrote into checkpoint `path`; None if it has none."""
    file = Path(path) / f"{stem}.safetensors"
    if not file.is_file():
        return None
    try:
        return load_file(str(file))
    except SafetensorError as err:
        raise DiffalignError(f"{file}: unreadable ({err}); try an older checkpoint") from None
