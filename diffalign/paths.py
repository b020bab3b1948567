"""Where the shipped assets live (the repo is installed editable: `pip install -e .`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
TOY_MODEL = ASSETS / "toy_model"
TOY_FLOW_MODEL = ASSETS / "toy_flow_model"  # its rectified-flow twin (assets/make_toy_flow_model.py)
TOY_DATA = ASSETS / "toy_data"
TOY_TRAIN = TOY_DATA / "train.parquet"
TOY_HELDOUT = TOY_DATA / "heldout_prompts.txt"
CONFIGS = REPO / "configs"
