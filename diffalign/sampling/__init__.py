"""The samplers behind one interface (common.py: noise, guidance, `Trajectory`; ddim.py; flow_sde.py), chosen by
one dict: which sampler a family gets is read from its prediction type.

    ddim      DDPM families (epsilon, v_prediction): DDIM-eta (diffalign.sampling.DDIMSampler)
    flow_sde  flow families (SD3, FLUX, flow toy): Flow-GRPO's SDE, noise level a (diffalign.sampling.flow_sde)
    flow_cps  flow families: coefficients-preserving sampling (CPS, arXiv 2509.05952), noise level a (flow_sde.py)

Both return the same `Trajectory` and give the training step kernel `mean_std(pred, t, xt)` / `log_prob(pred, t,
xt, x_prev)`, so D3PO, GRPO and DRO use either. `sampling.eta` is DDIM's eta on a DDPM family and the noise level a
on a flow family (0: deterministic in both). Both put the noise on a window of steps (`sampling.sde_window`, or
Flow-GRPO-Fast's random `sampling.sde_window_size`, or MixGRPO's window sliding over training,
`sampling.sde_window_shift_every`) and take the others deterministically; only the window's steps
are recorded and trained. The default window is every step but the last, whose Gaussian is too sharp to train on
(DDIM on the toy's cosine schedule: std eta · 0.006 at the last step against 0.2-1.0 at the others; Flow-GRPO takes
its last step deterministically for the same reason). Asking a family for a sampler it has no maths for (a flow
model through DDIM) is a one-line DiffalignError, never silent garbage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffalign.errors import DiffalignError
from diffalign.sampling.common import (  # noqa: F401  (the package's public names)
    EncodedPrompts,
    Trajectory,
    concat_cond,
    encode_guided,
    guided_prediction,
    initial_noise,
    resolve_window,
)
from diffalign.sampling.ddim import (  # noqa: F401
    DDIMSampler,
    inference_scheduler,
    sample,
    sample_trajectories,
    step_log_prob,
    step_mean_std,
)
from diffalign.sampling.flow_sde import FlowCPSSampler, FlowSDESampler, cps_step, sample_flow, sde_step  # noqa: F401


def ddim_sampler(family, steps: int, eta: float, window) -> DDIMSampler:
    scheduler = inference_scheduler(family, eta)
    scheduler.set_timesteps(steps, device=family.device)
    return DDIMSampler(scheduler, eta, tuple(window) if window else (0, -1))


def flow_sampler(family, steps: int, eta: float, window) -> FlowSDESampler:
    return FlowSDESampler.for_family(family, steps, eta, tuple(window) if window else (0, -1))


def cps_sampler(family, steps: int, eta: float, window) -> FlowCPSSampler:
    return FlowCPSSampler.for_family(family, steps, eta, tuple(window) if window else (0, -1))


@dataclass(frozen=True)
class SamplerKind:
    build: Callable  # (family, steps, eta or noise level, window [start, end) or None) -> sampler
    prediction_types: tuple[str, ...]  # the families' prediction types it has the maths for


SAMPLERS = {
    "ddim": SamplerKind(ddim_sampler, ("epsilon", "v_prediction")),
    "flow_sde": SamplerKind(flow_sampler, ("flow",)),
    "flow_cps": SamplerKind(cps_sampler, ("flow",)),
}


def window_range(size: int, span, steps: int) -> tuple[int, int]:
    """Flow-GRPO-Fast's [lo, hi) for a random window of `size` steps ([] = every step but the last); a one-line
    error when it does not fit the steps."""
    lo, hi = (span[0], span[1]) if span else (0, steps - 1)
    if len(span) not in (0, 2) or not 0 <= lo < hi <= steps or not 0 < size <= hi - lo:
        raise DiffalignError(
            f"sampling.sde_window_size {size} in sampling.sde_window_range {[lo, hi]}: needs 0 <= lo < lo + size <= hi "
            f"<= the {steps} steps"
        )
    return lo, hi


def random_window(size: int, span: tuple[int, int], gen: torch.Generator) -> tuple[int, int]:
    """[start, start + size) with start uniform on lo..hi - size (flow_grpo train_sd3_fast: randint(lo, hi - size))."""
    lo, hi = span
    start = lo + int(torch.randint(hi - size - lo + 1, (1,), generator=gen))
    return start, start + size


def sliding_window(r: int, size: int, every: int, stride: int, span: tuple[int, int]) -> tuple[int, int]:
    """MixGRPO's progressive window at round r (0-based): [start, min(start + size, hi)), start lo for the first
    `every` rounds, then lo + stride, ..., while start <= hi, then back to lo (Tencent-Hunyuan/MixGRPO
    fastvideo/utils/grpo_states.py `GRPOTrainingStates.update_iteration`, sample_strategy "progressive" with
    prog_overlap and roll_back; hi is their max_timesteps = steps - 2). A function of r alone: a resume redoes it.
    At start = hi the window is empty, as theirs (that round samples the ODE and trains nothing)."""
    lo, hi = span
    start = lo + ((r // every) % ((hi - lo) // stride + 1)) * stride  # positions lo, lo + stride, ... <= hi
    return start, min(start + size, hi)


def build_sampler(family, name: str, steps: int, eta: float, window=None):
    """The sampler `name` ("" = the family's own) for `steps` steps; a one-line error where the family lacks it."""
    own = [k for k, kind in SAMPLERS.items() if family.prediction_type in kind.prediction_types]
    if not name:
        if not own:
            raise DiffalignError(
                f"family '{family.name}' (prediction type '{family.prediction_type}') has no on-line sampler "
                f"(samplers: {', '.join(f'{k} for {v.prediction_types}' for k, v in SAMPLERS.items())})"
            )
        name = own[0]
    if name not in SAMPLERS:
        raise DiffalignError(f"sampling.sampler '{name}' unknown (options: {', '.join(SAMPLERS)})")
    if name not in own:
        raise DiffalignError(
            f"family '{family.name}' (prediction type '{family.prediction_type}') has no '{name}' sampler "
            f"(its samplers: {', '.join(own) or 'none'})"
        )
    if window:
        start, end = resolve_window(window, steps) if len(window) == 2 else (0, 0)
        if not 0 <= start < end <= steps:
            raise DiffalignError(f"sampling.sde_window {list(window)} must be [start, end) within the {steps} steps")
    return SAMPLERS[name].build(family, steps, eta, window)
