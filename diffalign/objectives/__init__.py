"""Preference objectives: one small dataclass per method, chosen by one dict.

Every objective is called as `loss, metrics = objective(err, ref_err, label)` with per-sample denoising errors
from diffalign.likelihood (`err`, `ref_err`: (2B,) stacked [w; l]; `ref_err` is None when `needs_reference` is
False) and `label` (B,) = P(w preferred). It returns a per-pair loss (B,) and a dict of per-pair metrics; it never
sees the model, the config or the accelerator.
"""

from diffalign.objectives.awm import AWM
from diffalign.objectives.d3po import D3PO
from diffalign.objectives.dgpo import DGPO
from diffalign.objectives.dpo import DiffusionDPO
from diffalign.objectives.dro import DiffusionDRO
from diffalign.objectives.flow_dppo import FlowDPPO
from diffalign.objectives.grpo import GRPO
from diffalign.objectives.grpo_guard import GRPOGuard
from diffalign.objectives.inpo import InPO
from diffalign.objectives.kto import DiffusionKTO
from diffalign.objectives.mapo import MaPO
from diffalign.objectives.nft import DiffusionNFT
from diffalign.objectives.sft import SFT
from diffalign.objectives.smpo import SmPO

OBJECTIVES = {
    "dpo": DiffusionDPO,
    "inpo": InPO,
    "smpo": SmPO,
    "kto": DiffusionKTO,
    "mapo": MaPO,
    "dro": DiffusionDRO,
    "sft": SFT,
    "d3po": D3PO,
    "grpo": GRPO,
    "grpo_guard": GRPOGuard,
    "flow_dppo": FlowDPPO,
    "nft": DiffusionNFT,
    "awm": AWM,
    "dgpo": DGPO,
}
