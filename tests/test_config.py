"""Configs: YAML + dotted overrides, typo suggestions, type checks; every shipped YAML loads."""

from pathlib import Path

import pytest
import yaml

from diffalign.config import ConfigError, OnlineConfig, RunConfig, load_config, save_config
from diffalign.paths import CONFIGS


def test_defaults_are_the_toy_world():
    cfg = load_config(RunConfig)
    assert cfg.model.path == "toy" and cfg.data.source == "toy" and cfg.objective.name == "dpo"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  beta: 2000\ntrain:\n  lr: 1.0e-5\n")
    cfg = load_config(
        RunConfig, path, ["train.lr=3e-4", "lora.target_modules=to_q,to_v", "train.mixed_precision=bf16"]
    )
    assert cfg.objective.beta == 2000.0 and isinstance(cfg.objective.beta, float)
    assert cfg.train.lr == 3e-4
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.train.mixed_precision == "bf16"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=1", "unknown config key 'train.max_step'; did you mean 'max_steps'"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'"),
        ("train.max_steps=ten", "train.max_steps: expected an integer"),
        ("train.tensorboard=maybe", "train.tensorboard: expected true/false"),
        ("train.lr.x=1", "has no sub-keys"),
        ("train", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(RunConfig, None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("objective:\n  betta: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'objective.betta'; did you mean 'beta'"):
        load_config(RunConfig, path)
    path.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(RunConfig, None, ["objective.extra={gamma: 10}", "train.seed=3"])
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(RunConfig, tmp_path / "out.yaml")
    assert again == cfg and again.objective.extra == {"gamma": 10}


def test_every_shipped_yaml_loads():
    paths = sorted(p for p in Path(CONFIGS).rglob("*.yaml") if "accelerate" not in p.parts)  # accelerate format
    assert len(paths) >= 4
    for path in paths:
        online = "online" in (yaml.safe_load(path.read_text()) or {})
        load_config(OnlineConfig if online else RunConfig, path)
