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
    assert cfg.objective.params["beta"] == 2000.0 and isinstance(cfg.objective.params["beta"], float)
    assert cfg.train.lr == 3e-4
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.train.mixed_precision == "bf16"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=1", "unknown config key 'train.max_step'; did you mean 'max_steps'"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'"),
        ("train.max_steps=ten", "train.max_steps='ten': expected an integer"),
        ("train.tensorboard=maybe", "train.tensorboard='maybe': expected true or false"),
        ("train.lr.x=1", "has no sub-keys"),
        ("objective.gama=10", "dpo has no 'gama' ('gamma' is a key of smpo)"),
        ("train.lr=-1", "train.lr=-1.0: must be > 0"),
        ("objective.beta=-5", "objective.beta=-5.0: must be > 0"),
        ("objective.beta=0", "objective.beta=0.0: must be > 0"),
        ("lora.target_modules=[to_q", "lora.target_modules=[to_q: cannot be read; expected a list: key=[a,b]"),
        ("score_args={a: 1", "unknown config key 'score_args'"),
        ("eval.scorers=[toy_aesthetic,pickscor]", "'pickscor' is not known; must be one of"),
        ("train.mixed_precision=fp8", "must be one of no, bf16, fp16"),
        ("train", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(RunConfig, None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("objective:\n  betta: 10\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown config key 'objective.betta': dpo has no 'betta'; did you mean 'beta'"
    ):
        load_config(RunConfig, path)
    path.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(RunConfig, None, ["objective.name=smpo", "objective.gamma=10", "train.seed=3"])
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(RunConfig, tmp_path / "out.yaml")
    assert again == cfg and again.objective.params["gamma"] == 10.0


def test_every_shipped_yaml_loads():
    paths = sorted(p for p in Path(CONFIGS).rglob("*.yaml") if "accelerate" not in p.parts)  # accelerate format
    assert len(paths) >= 4
    for path in paths:
        online = "online" in (yaml.safe_load(path.read_text()) or {})
        load_config(OnlineConfig if online else RunConfig, path)


def test_objective_fields_are_the_config():
    """objective: {name: smpo, gamma: 10}: typed (int -> float), checked, misspellings suggested."""
    cfg = load_config(RunConfig, None, ["objective.name=smpo", "objective.gamma=10"])
    assert cfg.objective.params["gamma"] == 10.0 and isinstance(cfg.objective.params["gamma"], float)
    assert cfg.objective.params["beta"] == 5000.0  # the objective's own default, recorded
    from diffalign.engine.common import build_objective

    assert build_objective(cfg.objective).gamma == 10.0
    with pytest.raises(ConfigError, match="smpo has no 'gama'; did you mean 'gamma'"):
        load_config(RunConfig, None, ["objective.name=smpo", "objective.gama=10"])
    with pytest.raises(ConfigError, match="sft has no 'beta'"):
        load_config(RunConfig, None, ["objective.name=sft", "objective.beta=1"])
    with pytest.raises(ConfigError, match="objective.clip=1.5: must be > 0 and < 1"):
        load_config(OnlineConfig, None, ["objective.clip=1.5"])


def test_negative_beta_needs_the_explicit_opt_in():
    cfg = load_config(RunConfig, None, ["objective.beta=-5", "objective.allow_negative_beta=true"])
    assert cfg.objective.params["beta"] == -5.0
    with pytest.raises(ConfigError, match="objective.beta=0.0: must be > 0"):  # zero is never a KL strength
        load_config(RunConfig, None, ["objective.beta=0", "objective.allow_negative_beta=true"])


@pytest.mark.parametrize("word", ["no", "off", "on", "yes", "null", "1e-4", "true", "0"])
def test_a_string_field_keeps_what_was_typed(word):
    cfg = load_config(RunConfig, None, [f"model.vae_path={word}", f"train.output_dir={word}"])
    assert cfg.model.vae_path == word and cfg.train.output_dir == word


def test_yaml_booleans_are_only_true_and_false(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  tensorboard: off\n  wandb: false\n  lr: 1e-4\n")
    cfg = load_config(RunConfig, path, ["train.gradient_checkpointing=yes"])
    assert cfg.train.mixed_precision == "no" and cfg.train.tensorboard is False and cfg.train.wandb is False
    assert cfg.train.lr == 1e-4 and cfg.train.gradient_checkpointing is True


def test_malformed_mapping_shows_the_form():
    from diffalign.config import ScoreConfig

    with pytest.raises(ConfigError, match=r"scorer_args=\{a: 1: cannot be read; expected a mapping"):
        load_config(ScoreConfig, None, ["scorer_args={a: 1"])
    with pytest.raises(ConfigError, match="scorer_args=3: expected a mapping"):
        load_config(ScoreConfig, None, ["scorer_args=3"])


def test_family_names_match_the_registry():
    from diffalign.config import FAMILY_NAMES
    from diffalign.models import FAMILIES

    assert set(FAMILY_NAMES) == {"auto", *FAMILIES}


def test_describe_lists_every_key_with_type_default_and_doc():
    from diffalign.config import describe
    from diffalign.objectives import OBJECTIVES

    text = describe(RunConfig)
    assert "train.lr (float, default 0.0001): Peak learning rate (AdamW). [> 0]" in text
    assert "with objective.name=smpo:" in text and "objective.gamma (float, default 10.0)" in text
    for name in OBJECTIVES:
        assert f"with objective.name={name}:" in text


@pytest.mark.parametrize(
    "old,new",
    [("online.lr", "train.lr"), ("online.train_steps", "train.steps_per_round"), ("online.reward", "reward.scorer"),
     ("online.steps", "sampling.steps"), ("online.split", "pairing.split")],
)  # fmt: skip
def test_an_old_online_key_names_its_new_place(old, new, tmp_path):
    """The on-line config is split by concern (train, sampling, reward, pairing, online): a key of the old one-section
    layout, in an override or in a YAML file, is a one-line error that names where it lives now."""
    from diffalign.config import ConfigError, OnlineConfig, load_config

    with pytest.raises(ConfigError, match=f"'{old}' has moved: it is '{new}' now"):
        load_config(OnlineConfig, None, [f"{old}=1"])
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=f"'{old}' has moved: it is '{new}' now") as err:
        load_config(OnlineConfig, path)
    assert "\n" not in str(err.value)
