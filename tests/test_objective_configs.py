"""Every shipped YAML loads into RunConfig and builds its objective the way the trainer does."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from diffalign.config import RunConfig, load_config
from diffalign.objectives import OBJECTIVES
from pipelines.common import build_objective

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_objective(path):
    cfg = load_config(RunConfig, path)
    objective = build_objective(cfg.objective)
    assert isinstance(objective, OBJECTIVES[cfg.objective.name])
    # rule: objective.beta / sft_weight reach the objective only if its class has that field, so a YAML must not
    # set them for objectives without one (they would be silently ignored)
    fields = {f.name for f in dataclasses.fields(objective)}
    raw = (yaml.safe_load(path.read_text()) or {}).get("objective", {})
    for key in ("beta", "sft_weight"):
        if key in raw:
            assert key in fields, f"{path.name}: objective '{cfg.objective.name}' has no '{key}'"
            assert getattr(objective, key) == raw[key]


def test_every_new_objective_has_an_sdxl_config():
    names = {load_config(RunConfig, p).objective.name for p in CONFIGS}
    assert {"inpo", "smpo", "kto", "mapo", "dro", "sft"} <= names
