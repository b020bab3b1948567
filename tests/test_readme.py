"""The README's runnable blocks run: the toy tour (train, generate, score, compare, export, --print-config) and the
scripting example, in a fresh folder, offline, on the shipped toy model.

A block is picked by its first line (`# tested: ...`), so editing the README changes what runs. To stay within
seconds, each run gets fewer steps than the README shows: the FAST overrides below are appended to every command
line (a later key=value wins), and the scripting block gets the same values by textual replacements that must
each match (so the README cannot drift from what is tested). The README's no-argument `diffalign train` (300
steps, about a minute and a half) runs in the slow step.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = {
    "train": ["train.max_steps=2", "eval.max_prompts=2", "eval.images_per_prompt=1", "eval.steps=2"],
    "generate": ["steps=2"],
}
SCRIPT_FAST = {
    "cfg.train.max_steps = 100": "cfg.train.max_steps = 2; cfg.eval.max_prompts = 2; cfg.eval.steps = 2",
    '"images_per_prompt=4"]': '"images_per_prompt=4", "steps=2"]',
}


def readme_block(tag: str) -> str:
    """The fenced block whose first line is `# tested: <tag>`."""
    blocks = re.findall(r"```(?:bash|python)\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(f"# tested: {tag}\n")]
    assert len(found) == 1, f"README has {len(found)} blocks tagged '{tag}'"
    return found[0]


def command_lines(block: str) -> list[list[str]]:
    """Shell lines (continuations joined, comments dropped) -> argv lists without the leading `diffalign`."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv[0] == "diffalign", line
            lines.append(argv[1:])
    return lines


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder that sees the repo's assets/ and configs/ as a clone does."""
    for name in ("assets", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_toy_tour_runs(workdir, capsys):
    lines = command_lines(readme_block("the toy tour"))
    assert [argv[0] for argv in lines] == ["train", "generate", "generate", "score", "compare", "export", "train"]
    for argv in lines:
        fast = FAST.get(argv[0], []) if "--print-config" not in argv else []
        assert main([*argv, *fast]) == 0, (argv, capsys.readouterr().err[-3000:])
    assert (workdir / "runs/toy-dpo/lora/pytorch_lora_weights.safetensors").is_file()
    report = json.loads((workdir / "runs/cmp/report.json").read_text())
    assert report["images"] == 4 and set(report["scorers"]) == {"toy_aesthetic", "toy_fidelity"}
    summary = json.loads((workdir / "runs/score-aligned/summary.json").read_text())
    assert summary["images"] == 4
    assert (workdir / "toy-dpo-kohya.safetensors").is_file()
    assert "name: smpo" in capsys.readouterr().out  # the --print-config line printed the resolved config


def test_the_scripting_example_runs(workdir, capsys):
    code = readme_block("scripting")
    for old, new in SCRIPT_FAST.items():
        assert old in code, old
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, "README.md (scripting)", "exec"), scope)  # noqa: S102 (the README's own example)
    run, base, aligned, scores, result = (scope[k] for k in ("run", "base", "aligned", "scores", "result"))
    assert (run.path / "lora" / "pytorch_lora_weights.safetensors").is_file() and run.rows[-1]["step"] == 2
    assert len(base.rows) == len(aligned.rows) == 4 and len(scores.rows) == 4
    assert 0 <= result.report["scorers"]["toy_aesthetic"]["win_rate"] <= 1


@pytest.mark.slow
def test_the_embedded_default_runs(workdir):
    """`diffalign train` with no arguments (README set-up): 300 steps on the toy world, then the report."""
    assert main([]) == 0
    (run,) = (workdir / "runs").glob("run-*")
    assert (run / "eval" / "report.json").is_file() and (run / "lora").is_dir()
