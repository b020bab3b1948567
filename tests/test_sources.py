"""One source per method, one registry: every objective's sources exist, give what the objective takes (by name),
and a mismatch or a misfit config is a one-line error when the config loads, before any model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from diffalign.config import OnlineConfig, RunConfig, load_config
from diffalign.errors import DiffalignError
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.base import Objective
from diffalign.sources import SOURCES, source_of
from diffalign.sources.base import ErrorInputs, fits


def test_registry_keys_are_the_sources_names_and_every_objective_fits_each_of_its_sources():
    assert all(cls.name == key for key, cls in SOURCES.items())
    for name, cls in OBJECTIVES.items():
        assert issubclass(cls, Objective) and cls.sources, name
        for key in cls.sources:
            fits(name, cls, SOURCES[key]())  # raises if the source lacks an argument the objective requires


def test_a_source_that_lacks_an_argument_is_refused_naming_it():
    @dataclass
    class NeedsMargin(Objective):
        sources = ("round_pairs",)

        def __call__(self, err, ref_err, margin):
            return err, {}

    with pytest.raises(DiffalignError, match="takes margin, which source 'round_pairs' does not give"):
        fits("needs_margin", NeedsMargin, SOURCES["round_pairs"]())


def test_inputs_go_to_the_objective_by_name():
    """KTO gets desirable and z by name from a set source's inputs; DPO gets only what it takes."""
    inputs = ErrorInputs(torch.ones(2), torch.zeros(2), desirable=torch.tensor([True, False]), z=torch.tensor(0.0))
    assert set(inputs.for_objective(OBJECTIVES["kto"])) == {"err", "ref_err", "label", "desirable", "z"}
    assert set(inputs.for_objective(OBJECTIVES["dpo"])) == {"err", "ref_err", "label"}
    loss, _ = OBJECTIVES["kto"](beta=1.0)(**inputs.for_objective(OBJECTIVES["kto"]))
    assert loss.shape == (2,)


@pytest.mark.parametrize(
    "program,overrides,message",
    [
        ("train", ["objective.name=grpo"], "objective 'grpo' trains on the model's own samples"),
        ("online", ["objective.name=mapo"], "online: objective 'mapo' cannot train on-line"),
        ("online", ["objective.name=kto", "pairing.split=all_pairs"], "pairing.split 'all_pairs' does not fit"),
        ("online", ["objective.name=d3po", "sampling.eta=0"], "sampling.eta must be > 0 for d3po"),
        ("online", ["objective.name=grpo", "online.kl_weight=0.1"], r"has a KL term of its own \(objective.beta\)"),
        ("online", ["objective.name=nft", "sampling.images_per_prompt=1"], "images_per_prompt must be >= 2 for nft"),
        ("online", ["objective.name=dro", "sampling.guidance=3"], "sampling.guidance must be <= 1 for dro"),
    ],
)
def test_misfit_configs_are_one_line_errors_before_any_model(program, overrides, message):
    schema = RunConfig if program == "train" else OnlineConfig
    with pytest.raises(DiffalignError, match=message) as err:
        source_of(load_config(schema, None, overrides), program)
    assert "\n" not in str(err.value)


def test_xt_source_is_checked_when_the_config_loads():
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="objective.xt_source"):
        load_config(RunConfig, None, ["objective.name=dpo", "objective.xt_source=ddim_inversoin"])
