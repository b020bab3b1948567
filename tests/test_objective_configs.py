"""Every shipped YAML loads into RunConfig and builds its objective the way the trainer does."""

from pathlib import Path

import pytest
import yaml

from diffalign.config import RunConfig, load_config
from diffalign.engine.common import build_objective
from diffalign.objectives import OBJECTIVES


def _is_offline_run_config(path: Path) -> bool:
    """configs/accelerate/* are accelerate's format; configs with a top-level `online:` are `diffalign online`'s."""
    return "accelerate" not in path.parts and "online" not in (yaml.safe_load(path.read_text()) or {})


CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if _is_offline_run_config(p)
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_objective(path):
    cfg = load_config(RunConfig, path)
    objective = build_objective(cfg.objective)
    assert isinstance(objective, OBJECTIVES[cfg.objective.name])
    # the YAML's objective keys reach the objective as typed values (the loader refuses keys it does not have)
    raw = (yaml.safe_load(path.read_text()) or {}).get("objective", {})
    for key, value in raw.items():
        if key not in ("name", "allow_negative_beta"):
            assert getattr(objective, key) == value, (path.name, key)


def test_every_new_objective_has_an_sdxl_config():
    """Offline objectives as `diffalign train` configs; on-policy ones (DRO, D3PO) as `diffalign online` configs."""
    from diffalign.config import OnlineConfig

    sdxl = sorted((Path(__file__).resolve().parents[1] / "configs").glob("sdxl_*.yaml"))
    names = {
        (load_config(RunConfig, p) if p in CONFIGS else load_config(OnlineConfig, p)).objective.name for p in sdxl
    }
    assert {"inpo", "smpo", "kto", "mapo", "dro", "sft", "d3po"} <= names
