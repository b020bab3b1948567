"""What every benchmark script records next to its numbers: the machine, and the JSON results file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """CPU model, cores, torch threads, 1-min load (a busy machine makes timings meaningless), versions, GPU."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(out: dict, path: str | Path, default_name: str) -> dict:
    """Write `out` as JSON to `path` (--json), or to benchmarks/results/<default_name> when it is empty."""
    target = Path(path or REPO / "benchmarks/results" / default_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1))
    print(f"wrote {target}")
    return out
