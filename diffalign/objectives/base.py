"""What every objective declares, once, with its default: the programs read these attributes and never probe.

An objective is a small dataclass on this base: its fields are its hyper-parameters (the `objective` config
section), its class attributes say what the trainer must feed it, and `__call__` takes tensors by name (the fields
of its source's inputs, diffalign/sources/base.py) and returns a per-sample loss and metrics.
"""

from __future__ import annotations

import inspect
from typing import ClassVar


class Objective:
    needs_reference: ClassVar[bool] = True
    """The trainer runs a reference forward (LoRA off, or the "ref" adapter) and passes its errors / log-probs."""
    paired: ClassVar[bool] = True
    """Rows come as stacked [w; l] pairs sharing t and eps (else each sample draws its own)."""
    xt_source: ClassVar[str] = "noise"
    """Where x_t comes from: a key of diffalign.inversion.XT_SOURCES, or "trajectory" / "predictions" for the
    on-line sources that bring their own (a dataclass field on the objectives that let the user choose)."""
    timesteps: ClassVar[str] = "schedule"
    """Forward-noising sources (nft, awm): where each visit's t comes from, "schedule" (the training schedule) or
    "sampler" (the round's sampling grid); a dataclass field on the objectives that let the user choose (NFT)."""
    sources: ClassVar[tuple[str, ...]] = ()
    """What it learns from: keys of diffalign.sources.SOURCES, the first one of a program is the one it uses."""
    own_kl: ClassVar[str] = ""
    """The field holding its own KL weight (GRPO: beta, NFT: kl_weight): online.kl_weight is then refused."""
    batch_baseline: ClassVar[bool] = False
    """Diffusion-KTO's z: the trainer passes the implicit reward's mean over every process's batch."""
    soft_labels: ClassVar[bool] = False
    """Weighs pairs by a scorer's smoothed preference p (SmPO): the trainer checks data.label_mode."""

    @classmethod
    def arguments(cls) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) names of `__call__`'s tensor arguments, matched to its source's inputs by name."""
        params = list(inspect.signature(cls.__call__).parameters.values())[1:]  # drop self
        required = tuple(p.name for p in params if p.default is inspect.Parameter.empty)
        return required, tuple(p.name for p in params if p.default is not inspect.Parameter.empty)
