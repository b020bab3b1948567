"""AI-feedback relabelling: argmax and SmPO labels from scorer scores, w/l swap, through the trainer."""

import json
import math
from pathlib import Path

import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main

from diffalign.data import load_preferences
from diffalign.data.relabel import Relabeled, relabel
from diffalign.errors import DiffalignError
from diffalign.objectives.smpo import smpo_preference

REPO = Path(__file__).resolve().parents[1]


def test_argmax_and_smpo_labels():
    scores = {0: [2.0, 1.0], 1: [0.0, 3.0], 2: [1.0, 1.0]}
    arg = relabel(scores, "argmax")
    assert arg == {0: (False, 1.0), 1: (True, 1.0), 2: (False, 0.5)}
    sm = relabel(scores, "smpo")  # lo/hi from the data: 0 and 3
    assert sm[1][0] is True
    assert math.isclose(sm[1][1], 1 / (1 + math.exp(-(3 - 0) / 3)), rel_tol=1e-6)  # sigmoid(1) = 0.7311
    assert math.isclose(sm[2][1], 0.5)
    fixed = relabel(scores, "smpo", lo=0.0, hi=10.0)
    assert math.isclose(fixed[0][1], float(smpo_preference(torch.tensor(2.0), torch.tensor(1.0), 0.0, 10.0)))
    with pytest.raises(DiffalignError, match="label_mode must be one of"):
        relabel(scores, "pickscore")


def test_relabeled_swaps_every_w_l_field():
    item = {"index": 4, "pixels_w": 1, "pixels_l": 2, "size_info_w": "a", "size_info_l": "b", "label": 1.0}
    data = Relabeled([dict(item)], {4: (True, 0.7)})
    out = data[0]
    assert (out["pixels_w"], out["pixels_l"], out["size_info_w"], out["size_info_l"]) == (2, 1, "b", "a")
    assert out["label"] == 0.7


@pytest.mark.parametrize("cached", [False, True])
def test_train_with_scorer_labels_writes_scores_once(tmp_path, cached):
    pairs = write_parquet(tmp_path / "pairs.parquet", make_rows(8, seed=1))
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [
        "train",
        str(REPO / "configs/tiny/sd15_dpo.yaml"),
        f"model.path={REPO / 'assets/tiny/sd15'}",
        f"data.source={pairs}",
        "data.label_scorer=toy_aesthetic",
        "data.label_mode=smpo",
        "train.max_steps=2",
        f"train.output_dir={run}",
    ]
    if cached:  # the scores are saved in the cache folder, before the cache is built there
        args.append(f"data.cache_dir={cache}")
    assert main(args) == 0
    where = (cache if cached else run) / "scores-toy_aesthetic.json"
    saved = json.loads(where.read_text())
    kept = len(load_preferences(str(pairs)))  # ties dropped
    assert saved["scorer"] == "toy_aesthetic" and len(saved["scores"]) == kept > 0
    if cached:
        assert (cache / "index.json").is_file()
        mtime = where.stat().st_mtime_ns
        assert main(args + [f"train.output_dir={tmp_path / 'again'}"]) == 0  # scores and cache both reused
        assert where.stat().st_mtime_ns == mtime
