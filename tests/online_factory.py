"""One small on-line round on a tiny shipped model, as the method tests run it: the arguments shared by every such
test (2 prompts x 2 images, LoRA rank 4, toy reward, no monitors, no eval, one round), each test adding its own."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_round(tmp_path: Path, objective: str, *extra: str, model: str = "sd3") -> list[str]:
    """Overrides for `diffalign online` (later keys win: `extra` sets the sampler, guidance, steps, ...); the run
    writes to tmp_path / "run"."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\n")
    return [
        f"objective.name={objective}",
        f"model.path={REPO / 'assets' / 'tiny' / model}",
        "lora.rank=4",
        "lora.alpha=4",
        f"sampling.prompts={prompts}",
        "sampling.prompts_per_round=2",
        "sampling.images_per_prompt=2",
        "sampling.shared_noise=false",
        "train.steps_per_round=1",
        "train.batch_size=2",
        "train.tensorboard=false",
        f"train.output_dir={tmp_path / 'run'}",
        "reward.scorer=toy_aesthetic",
        "reward.monitor=[]",
        "online.rounds=1",
        "eval.prompts=",
        *extra,
    ]
