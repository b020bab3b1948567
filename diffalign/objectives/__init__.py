"""Preference objectives: one small dataclass per method, chosen by one dict.

Every objective is called as `loss, metrics = objective(err, ref_err, label)` with per-sample denoising errors
from diffalign.likelihood (`err`, `ref_err`: (2B,) stacked [w; l]; `ref_err` is None when `needs_reference` is
False) and `label` (B,) = P(w preferred). It returns a per-pair loss (B,) and a dict of per-pair metrics; it never
sees the model, the config or the accelerator.
"""

from diffalign.objectives.dpo import DiffusionDPO

OBJECTIVES = {
    "dpo": DiffusionDPO,
}
