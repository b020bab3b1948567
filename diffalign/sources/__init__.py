"""What an objective learns from: one class per source, one file each, one registry.

    source        program  batch                                          objective inputs (sources/base.py)
    pairs         train    collated preference pairs (diffalign.data)      ErrorInputs at x_t of objective.xt_source
    round_pairs   online   {"round", "step", "rows": (B,)} pair rows       ErrorInputs at forward-noised generated x0
    round_sets    online   {"round", "step", "rows": (M,)} set rows        ErrorInputs (+ desirable, z) per sample
    round_groups  online   {"round", "step", "rows": (B,)} prompt groups   GroupErrors: errors of B·G, advantages (DGPO)
    trajectory    online   {"round", "step", "rows": (B,), "k"}           StepLogProbs of both chains (D3PO)
    experts       online   {"round", "step", "rows": (B,), "k"}           ErrorInputs of [expert; policy] (DRO)
    policy_steps  online   {"round", "step", "rows": (B,), "k"}           PolicySteps: log-probs, advantages (GRPO)
    old_policy_steps  online, as policy_steps      OldPolicySteps: + the sampler's step mean and std (GRPO-Guard, Flow-DPPO)
    nft           online   {"round", "step", "rows": (N,)} sample rows    Predictions: v_θ, v_old, v_ref, target
    awm           online, as nft, but the trained policy samples the rounds (the old adapter only anchors a KL)

("step" is the optimizer step within the round, "k" a stored trajectory step.) With `online.kl_weight` > 0 the
round_pairs, round_sets, round_groups, trajectory and experts sources also measure the KL to the reference at their
x_t (`Inputs.kl`), which the step adds to the loss.

An objective lists the sources it can learn from (`sources`); a program takes the first one that belongs to it.
Every random draw of a row (t, eps, inversion noise) comes from a generator keyed on (seed, epoch, pair index)
offline and (seed, round, optimizer step, row) on-line, so the same draw gets the same noise in any process, batch
slot or resumed run, and a row drawn again by a later step of its round gets fresh noise.

Adding a method that learns from something new: its objective file, one source file here and its line below.
"""

from __future__ import annotations

from diffalign.errors import DiffalignError
from diffalign.sources.awm import AWMSource
from diffalign.sources.base import Round, Source, fits
from diffalign.sources.experts import Experts
from diffalign.sources.nft import NFT
from diffalign.sources.old_policy_steps import OldPolicyStepsSource
from diffalign.sources.pairs import Pairs
from diffalign.sources.policy_steps import PolicyStepsSource
from diffalign.sources.round_groups import RoundGroups
from diffalign.sources.round_pairs import RoundPairs
from diffalign.sources.round_sets import RoundSets
from diffalign.sources.trajectory import TrajectorySteps

__all__ = ["SOURCES", "Round", "Source", "objectives_for", "source_for", "source_of"]

SOURCES: dict[str, type[Source]] = {
    "pairs": Pairs,
    "round_pairs": RoundPairs,
    "round_sets": RoundSets,
    "round_groups": RoundGroups,
    "trajectory": TrajectorySteps,
    "experts": Experts,
    "policy_steps": PolicyStepsSource,
    "old_policy_steps": OldPolicyStepsSource,
    "nft": NFT,
    "awm": AWMSource,
}


def source_for(objective_cls, program: str) -> str | None:
    """The first source of the objective that `program` runs (None: the objective does not train there)."""
    return next((s for s in objective_cls.sources if SOURCES[s].program == program), None)


def objectives_for(program: str, objectives: dict) -> list[str]:
    """Names of the objectives `program` accepts, read from their `sources` metadata."""
    return [name for name, cls in objectives.items() if source_for(cls, program)]


def source_of(cfg, program: str) -> Source:
    """The source the config's objective learns from in `program`, its config and contract checked (one line each):
    called right after the config loads, before any model."""
    from diffalign.objectives import OBJECTIVES

    name = cfg.objective.name
    objective_cls = OBJECTIVES[name]
    key = source_for(objective_cls, program)
    if key is None:
        if program == "train":
            raise DiffalignError(
                f"objective '{name}' trains on the model's own samples: run `diffalign online` "
                f"(e.g. configs/toy_{name}.yaml)"
            )
        options = ", ".join(objectives_for(program, OBJECTIVES))
        raise DiffalignError(f"online: objective '{name}' cannot train on-line (options: {options})")
    source = SOURCES[key]()
    fits(name, objective_cls, source)
    if program == "online":
        if cfg.online.kl_weight > 0 and objective_cls.own_kl:
            raise DiffalignError(
                f"online.kl_weight: objective '{name}' has a KL term of its own (objective.{objective_cls.own_kl})"
            )
        if cfg.sampling.sde_window_size and cfg.sampling.sde_window:
            raise DiffalignError("online: set sde_window (fixed) or sde_window_size (random start), not both")
        source.check(cfg)
    return source
