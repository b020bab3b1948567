"""What a run writes and how it stops: the shared output folder, log rows cut back to a checkpoint, the flat
hyper-parameters for the trackers, fp16's scaler state, and the SIGTERM/SIGINT flag (pre-emptible machines)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from diffalign.engine.common import prepare_output_dir
from diffalign.errors import DiffalignError


class StopFlag:
    """SIGTERM/SIGINT ask the loop to save and stop at the next boundary (an optimizer step or a round)."""

    def __init__(self):
        self.signal = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM (or a stop seen on another process), 130 for SIGINT: what a shell reports."""
        return 130 if self.signal == "SIGINT" else 143

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which finishes the step and saves."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shared_output_dir(path: str, resume: bool, state: PartialState, default_name: str = "run") -> Path:
    """The main process checks and creates the output folder; the others get its name (a default one is timed)."""
    reply = [None]
    if state.is_main_process:
        try:
            reply = [("ok", str(prepare_output_dir(path, resume=resume, default_name=default_name)))]
        except DiffalignError as err:
            reply = [("error", str(err))]
    if state.num_processes > 1:
        broadcast_object_list(reply)
    kind, text = reply[0]
    if kind == "error":
        raise DiffalignError(text)
    return Path(text)


def truncate_metrics(path: Path, step: int, key: str = "step") -> None:
    """Keep the log rows whose `key` (step, or round for `diffalign online`) is <= `step`, what the checkpoint saw: a
    killed run may have logged later steps, or half a line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get(key), int) and row[key] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def scaler_state(accelerator) -> dict | None:
    """fp16's GradScaler state (scale, growth tracker: JSON numbers), None without one."""
    return accelerator.scaler.state_dict() if accelerator.scaler is not None else None


def flat_hparams(config: dict) -> dict:
    """{section: {key: value}} -> {"section.key": value} for the scalar values (tensorboard's hparams, wandb)."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    return flat
