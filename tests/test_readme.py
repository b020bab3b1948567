"""The README's runnable blocks run: the toy tour (train, generate, score, compare, export, --print-config) and the
scripting example, in a fresh folder, offline, on the shipped toy model.

A block is picked by its first line (`# tested: ...`), so editing the README changes what runs. To stay within
seconds, each run gets fewer steps than the README shows: the FAST overrides below are appended to every command
line (a later key=value wins), and the scripting block gets the same values by textual replacements that must
each match (so the README cannot drift from what is tested). The README's no-argument `diffalign train` (300
steps, about a minute and a half) runs in the slow step.

The README is a user guide: its methods and families tables list every key of OBJECTIVES and FAMILIES once, its
rewards table every scorer, its links point at files (and headings) that exist, its test command is the one CI
runs, and it stays short (results and background live in docs/).
"""

import json
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest
from diffalign.pipelines.cli import main

from diffalign.models import FAMILIES
from diffalign.objectives import OBJECTIVES
from diffalign.rewards import SCORERS

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
    drift = json.loads((workdir / "runs/toy-dpo/eval/report.json").read_text())["drift"]  # the end-of-run report
    assert "toy_background_shift" in drift and "toy_position_error" in report["drift"]  # and compare's
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


@pytest.mark.slow(minutes=1)
def test_the_embedded_default_runs(workdir):
    """`diffalign train` with no arguments (README set-up) but its length: the embedded toy model, data and prompts,
    a runs/run-<time> folder, the held-out curve and the report, in 40 of its 300 steps (CI time: the whole run is
    5.5 CPU minutes; its learning is tests/test_toy_learning.py's DPO check, its figures are docs/results.md's)."""
    assert main(["train", "train.max_steps=40"]) == 0
    (run,) = (workdir / "runs").glob("run-*")
    assert (run / "eval" / "report.json").is_file() and (run / "lora").is_dir()


# ---- the README as a guide: tables, links, length ------------------------------------------------------------

MAX_LINES = 350


def readme_table(heading: str) -> list[list[str]]:
    """The cells of the first table under `## <heading>` (header and separator rows dropped)."""
    section = (REPO / "README.md").read_text().split(f"\n## {heading}\n", 1)
    assert len(section) == 2, f"README has no '## {heading}' section"
    body = section[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    table = rows[: next((i for i, r in enumerate(rows) if i and not rows[i - 1].startswith("|")), len(rows))]
    return [[c.strip() for c in r.strip("|").split("|")] for r in table[2:]]


def first_cell_keys(rows: list[list[str]]) -> Counter:
    """Row keys: the first cell of each row, which must be one backticked name."""
    keys = Counter()
    for row in rows:
        match = re.fullmatch(r"`([^`]+)`", row[0])
        assert match, f"table row without a `key` first cell: {row}"
        keys[match.group(1)] += 1
    return keys


@pytest.mark.parametrize("heading,registry", [("Methods", OBJECTIVES), ("Model families", FAMILIES)])
def test_table_lists_every_registry_key_once(heading, registry):
    keys = first_cell_keys(readme_table(heading))
    assert not [k for k, n in keys.items() if n > 1], f"{heading}: rows listed twice"
    assert set(keys) == set(registry), (
        f"{heading}: missing {set(registry) - set(keys)}, extra {set(keys) - set(registry)}"
    )


@pytest.mark.parametrize("heading", ["Methods", "Model families"])
def test_shipped_configs_named_in_the_tables_exist(heading):
    """The last column names configs/<name>.yaml (patterns such as `toy_*` or `sdxl_<method>` are skipped)."""
    names = [n for row in readme_table(heading) for n in re.findall(r"`([^`]+)`", row[-1])]
    assert names
    missing = [n for n in names if not re.search(r"[*<]", n) and not (REPO / "configs" / f"{n}.yaml").is_file()]
    assert not missing


def test_rewards_table_lists_every_scorer_once():
    """The second column names each scorer in backticks; text in parentheses describes it and is not counted."""
    cells = [n for row in readme_table("Rewards") for n in re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", row[1]))]
    counts = Counter(cells)
    assert not [k for k, n in counts.items() if n > 1] and set(counts) == set(SCORERS)


def test_readme_is_a_short_guide():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move results and background to docs/"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    titles = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
)
def test_links_point_at_files_and_headings_that_exist(page):
    """Every relative markdown link of the README (and of the docs pages it leads to) names an existing file, and an
    #anchor names a heading of it."""
    source = REPO / page
    text = re.sub(r"```.*?```", "", source.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for link in links:
        if re.match(r"[a-z]+://|mailto:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        if not path.exists():
            broken.append(link)
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            broken.append(link)
    assert not broken, f"{page}: broken links {broken}"


def test_repo_paths_named_in_the_readme_exist():
    """Backticked paths into the repo's own folders (`configs/...`, `docs/...`, ...) name files or folders."""
    text = (REPO / "README.md").read_text()
    roots = ("assets/", "benchmarks/", "configs/", "diffalign/", "docs/", "pipelines/", "tests/")
    paths = {p for p in re.findall(r"`([^`\s]+)`", text) if p.startswith(roots) and not re.search(r"[<*]", p)}
    assert paths
    assert not [p for p in sorted(paths) if not (REPO / p).exists()]


def test_the_test_command_is_the_one_ci_runs():
    """The README's test command is .ci/run's first pytest line, with the same offline environment."""
    ci = (REPO / ".ci/run").read_text().splitlines()
    command = next(line for line in ci if line.startswith("python -m pytest"))
    env = next(line for line in ci if line.startswith("export HF_HUB_OFFLINE"))
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert any(command in b.splitlines() and env in b.splitlines() for b in blocks), command
