"""The toy world through the user-facing commands: generate with the shipped toy model, score, compare."""

import json

import pytest
from diffalign.pipelines.cli import main

from diffalign.paths import TOY_MODEL
from diffalign.rewards import TOY_DRIFT

pytestmark = pytest.mark.skipif(not (TOY_MODEL / "model_index.json").is_file(), reason="toy model not built")

PROMPTS = ["a large red circle at the center", "a small blue square at the top left"]


def test_generate_score_compare_on_the_toy_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert (
            main(
                [
                    "generate",
                    "model.path=toy",
                    f"prompts_file={prompts}",
                    "images_per_prompt=2",
                    "steps=10",
                    f"output_dir={out}",
                ]
            )
            == 0
        )
    assert main(["score", f"images={a}", "scorers=[toy_aesthetic,toy_fidelity]", f"output_dir={tmp_path / 's'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 <= r["toy_fidelity"] <= 1 for r in rows)
    assert (
        main(["compare", f"base={a}", f"aligned={b}", "scorers=[toy_aesthetic]", f"output_dir={tmp_path / 'c'}"]) == 0
    )
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["scorers"]["toy_aesthetic"]["win_rate"] == 0.5  # same model, same seeds: all ties
    assert list(report["drift"]) == list(TOY_DRIFT)  # toy prompts: the toy drift scorers, and no drift at all
    assert all(r["mean_delta"] == 0.0 and r["win_rate"] == 0.5 for r in report["drift"].values())
    assert (tmp_path / "c" / "report.html").is_file() and (tmp_path / "c" / "report.png").is_file()
