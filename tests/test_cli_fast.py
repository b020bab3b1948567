"""Fast answers: `diffalign <command> --help` and a bad config value answer from the config schemas alone, without
importing diffusers, transformers or open_clip (the programs import those, and are imported only to run); the
--flags a program takes are declared in COMMANDS, so they must stay equal to its run() parameters."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
from diffalign.pipelines.cli import COMMANDS

HEAVY = ("diffusers", "transformers", "open_clip")
# `python -m diffalign ARGS` in this process, then one line: the exit code and the heavy modules it imported
RUN_AND_LIST = (
    "import json, runpy, sys\n"
    "try:\n"
    "    runpy.run_module('diffalign', run_name='__main__')\n"
    "except SystemExit as done:\n"
    f"    print(json.dumps([done.code, sorted(m for m in {HEAVY} if m in sys.modules)]))\n"
)


def run_cli(*args: str) -> tuple[int, list[str], str, str]:
    """-> (exit code, heavy modules imported, stdout before the last line, stderr) of `python -m diffalign ARGS`."""
    out = subprocess.run([sys.executable, "-c", RUN_AND_LIST, *args], capture_output=True, text=True, timeout=120)
    *printed, last = out.stdout.rstrip("\n").split("\n")
    code, heavy = json.loads(last)
    return code, heavy, "\n".join(printed), out.stderr


def test_a_bad_config_value_answers_without_the_heavy_libraries():
    code, heavy, _, err = run_cli("train", "train.lr=abc")
    assert code == 2 and heavy == []
    assert err.strip() == "diffalign: error: train.lr='abc': expected a number"  # one line naming the key


def test_help_answers_without_the_heavy_libraries():
    code, heavy, out, _ = run_cli("train", "--help")
    assert code == 0 and heavy == []
    assert out.startswith("usage: diffalign train ") and "  train.lr (float, default 0.0001): " in out


@pytest.mark.parametrize("args", [("online", "--resume"), ("generate", "--resume", "latest"), ("serve-reward", "x=1")])
def test_bad_command_lines_answer_without_the_heavy_libraries(args):
    code, heavy, _, err = run_cli(*args)
    assert code == 2 and heavy == [] and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,code", [(("train", "train.lr=abc"), 2), (("train", "--print-config"), 0)])
def test_a_launched_process_leaves_with_the_programs_exit_code(args, code):
    """Under a multi-process launch (WORLD_SIZE > 1) the CLI ends its process with os._exit after flushing (no
    interpreter finalisation for gloo's threads to abort: an atexit hook does not run), with the program's exit code
    and printed output; a single process finalises as usual."""
    hook = (
        "import atexit, runpy; atexit.register(print, 'FINALISED'); runpy.run_module('diffalign', run_name='__main__')"
    )
    for world, finalised in (("2", False), ("1", True)):
        env = dict(os.environ, WORLD_SIZE=world)
        out = subprocess.run([sys.executable, "-c", hook, *args], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == code, out.stderr
        assert ("train.lr='abc'" in out.stderr) if code else out.stdout.startswith("model:")
        assert ("FINALISED" in out.stdout) == finalised


def test_python_m_diffalign_is_the_command():
    out = subprocess.run([sys.executable, "-m", "diffalign", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: diffalign <command>")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_declared_options_are_the_programs_run_parameters(command):
    spec = COMMANDS[command]
    params = inspect.signature(importlib.import_module(spec.module).run).parameters
    assert list(params)[:2] == ["config", "overrides"]
    assert list(spec.options) == list(params)[2:]


def test_the_cli_sets_a_passive_openmp_wait_before_torch_loads_and_keeps_a_users_value():
    """OMP_WAIT_POLICY=PASSIVE by default (steady epochs on shared cores), set before torch is imported; a value in
    the environment wins."""
    code = (
        "import os, sys; import diffalign.pipelines.cli; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "False"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "False"]
