"""Every command answers --help / -h with its usage, a runnable example and every config key (type, default, doc);
--print-config prints the resolved config, which loads back to the same config."""

import dataclasses
import shlex

import pytest
import yaml
from diffalign.pipelines.cli import COMMANDS, config_class, main

from diffalign.config import load_config
from diffalign.schema import field_types


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, the objective's keys for each objective included."""
    keys = []
    for f in dataclasses.fields(cls):
        typ = field_types(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            keys += _keys(typ, f"{prefix}{f.name}.")
            for variant in (typ.__dict__.get("VARIANTS") or {}).values():
                keys += _keys(variant, f"{prefix}{f.name}.")
        elif f.name != "params":
            keys.append(prefix + f.name)
    return keys


def test_top_level_help_lists_the_commands(capsys):
    for flag in ("--help", "-h", "help"):
        assert main([flag]) == 0
        out = capsys.readouterr().out
        assert all(name in out for name in COMMANDS) and "diffalign <command> --help" in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_lists_every_key(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert main([command, "configs/does_not_exist.yaml", "-h"]) == 0  # help wins over everything else
    assert capsys.readouterr().out == out
    assert out.startswith(f"usage: diffalign {command} ") and "example:\n  diffalign " + command in out
    for key in _keys(config_class(command)):
        assert f"  {key} (" in out, key
    assert "train.lr (float, default 0.0001): Peak learning rate (AdamW). [> 0]" in out or command != "train"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_help_example_is_a_valid_command_line(command, capsys):
    """The example's config and overrides load (running them is tests/test_readme.py's job)."""
    argv = shlex.split(COMMANDS[command][3])[1:]
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err


def test_print_config_resolves_and_round_trips(tmp_path, capsys):
    argv = ["train", "configs/sdxl_smpo.yaml", "train.mixed_precision=no", "objective.gamma=5", "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["train"]["mixed_precision"] == "no" and data["objective"]["gamma"] == 5.0
    assert data["objective"]["beta"] == 5000.0  # the objective's default, resolved
    (tmp_path / "resolved.yaml").write_text(printed)
    cls = config_class("train")
    assert load_config(cls, tmp_path / "resolved.yaml") == load_config(cls, "configs/sdxl_smpo.yaml", argv[2:4])


def test_print_config_reports_bad_values_like_a_run(capsys):
    assert main(["train", "train.lr=-1", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == "diffalign: error: train.lr=-1.0: must be > 0"


def test_unknown_option_lists_the_options(capsys):
    assert main(["generate", "--resume", "latest"]) == 2
    assert "unknown option --resume (options: --print-config, -h)" in capsys.readouterr().err


def test_malformed_command_lines_are_one_line_errors(capsys):
    assert main(["train", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == "diffalign: error: --resume needs a value"
    assert main(["train", "a.yaml", "b.yaml"]) == 2
    assert "unexpected argument 'b.yaml'" in capsys.readouterr().err
