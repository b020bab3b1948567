"""What a run writes next to its outputs: package versions, git SHA, command line, time."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from diffalign.paths import REPO

PACKAGES = ("diffalign", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "datasets")


def git_sha(repo: Path = REPO) -> str:
    """HEAD of the diffalign checkout, with "-dirty" when tracked files changed; "" outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_record(**extra) -> dict:
    return {
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions(),
        **extra,
    }


def write_run_record(out_dir: Path, **extra) -> Path:
    path = Path(out_dir) / "run.json"
    path.write_text(json.dumps(run_record(**extra), indent=2))
    return path
