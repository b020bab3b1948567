"""The programs as Python functions: `train`, `generate`, `score`, `compare` (and `online`, `export`).

Each takes what the command line takes: a config (a YAML path, a config object such as `RunConfig()`, or None for
the defaults), dotted overrides, and returns a `Result`: the output folder plus what the program measured, read back
from the files it wrote. Errors are the CLI's: a `DiffalignError` (ConfigError for config values) with a one-line
message.

    from diffalign.pipelines.api import compare, generate, train
    run = train(None, ["train.max_steps=50", "train.output_dir=runs/toy-dpo"])   # the toy world
    print(run.report["scorers"]["toy_aesthetic"]["win_rate"], run.path / "lora")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.pipelines import compare as _compare
from diffalign.pipelines import export as _export
from diffalign.pipelines import generate as _generate
from diffalign.pipelines import online as _online
from diffalign.pipelines import score as _score
from diffalign.pipelines import train as _train


@dataclass
class Result:
    path: Path
    """The output folder the program wrote (config.yaml and run.json are in it)."""
    report: dict[str, Any] = field(default_factory=dict)
    """train / online: eval/report.json ({} when eval.prompts is ""); score: summary.json; compare: report.json."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """train: metrics.jsonl; online: rounds.jsonl; generate: manifest.jsonl; score: scores.jsonl; compare: pairs.jsonl."""


def _read(path: Path, report: str, rows: str) -> Result:
    report_file, rows_file = path / report, path / rows
    return Result(
        path=path,
        report=json.loads(report_file.read_text()) if report_file.is_file() else {},
        rows=[json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else [],
    )


def train(config: Any = None, overrides: list[str] | tuple = (), resume: str = "") -> Result:
    """`diffalign train`: the LoRA is `result.path / "lora"`; report = the base-vs-aligned evaluation."""
    return _read(_train.run(config, list(overrides), resume=resume), "eval/report.json", "metrics.jsonl")


def online(config: Any = None, overrides: list[str] | tuple = (), resume: str = "") -> Result:
    """`diffalign online`: rows = one per round; report = the base-vs-aligned evaluation."""
    return _read(_online.run(config, list(overrides), resume=resume), "eval/report.json", "rounds.jsonl")


def generate(config: Any = None, overrides: list[str] | tuple = ()) -> Result:
    """`diffalign generate`: rows = one per image (file, prompt, seed, settings)."""
    return _read(_generate.run(config, list(overrides)), "summary.json", "manifest.jsonl")


def score(config: Any = None, overrides: list[str] | tuple = ()) -> Result:
    """`diffalign score`: report["scorers"][name] = mean, std, n; rows = per-image scores."""
    return _read(_score.run(config, list(overrides)), "summary.json", "scores.jsonl")


def compare(config: Any = None, overrides: list[str] | tuple = ()) -> Result:
    """`diffalign compare`: report["scorers"][name] = win rate with its 95% CI, mean delta, ...; rows = pairs."""
    return _read(_compare.run(config, list(overrides)), "report.json", "pairs.jsonl")


def export(config: Any = None, overrides: list[str] | tuple = ()) -> Path:
    """`diffalign export`: the written LoRA file or folder."""
    return _export.run(config, list(overrides))
