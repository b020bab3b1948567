"""A corpus of bad config values, one row each: the command, its overrides, and words the error must contain.

Every row must stop with exit code 2 and one `diffalign: error:` line (no traceback), before anything is written:
the output folder already holds a file, and after the run it holds exactly that file, unchanged. Most rows fail
when the config loads (no model is read); the rows marked `model` fail right after the tiny model loads
(`lora.target_modules`, sizes that are no multiple of the latent factor).
"""

from pathlib import Path

import pytest
from diffalign.pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_SD = str(REPO / "assets" / "tiny" / "sd15")

CORPUS = [
    # train
    ("train", ["train.lr=-1"], "train.lr=-1.0: must be > 0"),
    ("train", ["train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    ("train", ["train.max_steps=0"], "train.max_steps=0: must be >= 1"),
    ("train", ["train.grad_accum=0"], "train.grad_accum=0: must be >= 1"),
    ("train", ["train.max_steps=ten"], "train.max_steps='ten': expected an integer"),
    ("train", ["lora.rank=0"], "lora.rank=0: must be >= 1"),
    ("train", ["lora.alpha=-8"], "lora.alpha=-8.0: must be > 0"),
    ("train", ["lora.target_modules=[to_q"], "lora.target_modules=[to_q: cannot be read; expected a list"),
    ("train", ["objective.beta=-5"], "objective.beta=-5.0: must be > 0 (a KL strength"),
    ("train", ["objective.name=kto", "objective.beta=0"], "objective.beta=0.0: must be > 0"),
    ("train", ["objective.name=smpo", "objective.gama=10"], "smpo has no 'gama'; did you mean 'gamma'?"),
    ("train", ["objective.name=sft", "objective.beta=1"], "'objective.beta': sft has no 'beta'"),
    ("train", ["objective.name=dpoo"], "objective.name='dpoo': must be one of dpo,"),
    ("train", ["data.empty_prompt_prob=1.5"], "data.empty_prompt_prob=1.5: must be >= 0 and <= 1"),
    ("train", ["train.mixed_precision=fp8"], "train.mixed_precision='fp8': must be one of no, bf16, fp16"),
    ("train", ["train.lr_schedule=cosin"], "did you mean 'cosine'?"),
    ("train", ["data.label_scorer=pickscor"], "did you mean 'pickscore'?"),
    ("train", ["train.max_step=1"], "unknown config key 'train.max_step'; did you mean 'max_steps'?"),
    ("train", ["model.dtype=fp16"], "model.dtype='fp16': must be one of float32, bfloat16, float16"),
    pytest.param(
        "train",
        [f"model.path={TINY_SD}", "lora.target_modules=[to_q,to_kk]"],
        "lora.target_modules: 'to_kk' names no Linear/Conv layer of the sd UNet2DConditionModel; closest names: to_k",
        id="train-target-module",
    ),
    pytest.param(
        "train",
        [f"model.path={TINY_SD}", "model.resolution=60"],
        f"model.resolution=60: must be a multiple of 8 for {TINY_SD}",
        id="train-resolution",
    ),
    # online
    ("online", ["pairing.fraction=0.9"], "pairing.fraction=0.9: must be > 0 and <= 0.5"),
    ("online", ["objective.clip=2"], "objective.clip=2.0: must be > 0 and < 1"),
    ("online", ["objective.beta=-0.1"], "objective.beta=-0.1: must be > 0"),
    ("online", ["pairing.split=pairs_all"], "pairing.split='pairs_all': must be one of all_pairs, best_worst"),
    ("online", ["online.rounds=0"], "online.rounds=0: must be >= 1"),
    ("online", ["reward.scorer=pickscor"], "did you mean 'pickscore'?"),
    ("online", ["train.lr=0"], "train.lr=0.0: must be > 0"),
    # generate
    ("generate", ["prompt=a cat", "images_per_prompt=0"], "images_per_prompt=0: must be >= 1"),
    ("generate", ["prompt=a cat", "guidance=-1"], "guidance=-1.0: must be >= 0"),
    ("generate", ["prompt=a cat", "steps=0"], "steps=0: must be >= 1"),
    pytest.param(
        "generate",
        ["prompt=a cat", f"model.path={TINY_SD}", "height=100"],
        f"height=100: must be a multiple of 8 for {TINY_SD}",
        id="generate-height",
    ),
    # score
    ("score", ["images=x", "scorers=[toy_aestetic]"], "'toy_aestetic' is not known; must be one of"),
    ("score", ["images=x", "scorer_args={a: 1"], "scorer_args={a: 1: cannot be read; expected a mapping"),
    ("score", ["images=x", "batch_size=0"], "batch_size=0: must be >= 1"),
    # compare
    ("compare", ["base=x", "aligned=y", "grid_pairs=0"], "grid_pairs=0: must be >= 1"),
    ("compare", ["base=x", "aligned=y", "scorers=nope"], "'nope' is not known"),
    # export
    ("export", ["src=x", "out=y.safetensors", "format=ckpt"], "format='ckpt': must be one of kohya, diffusers"),
    ("export", ["src=x", "out=y.safetensors", "fromat=kohya"], "unknown config key 'fromat'; did you mean 'format'?"),
]

OUTPUT_KEY = {"train": "train.output_dir", "online": "train.output_dir", "export": "out"}


def _case_id(case) -> str:
    return f"{case[0]}-{'-'.join(case[1])}" if isinstance(case, tuple) else None


@pytest.mark.parametrize("command, overrides, words", CORPUS, ids=[_case_id(c) for c in CORPUS])
def test_bad_config_value(command, overrides, words, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("written by an earlier run")
    target = [] if command == "export" else [f"{OUTPUT_KEY.get(command, 'output_dir')}={out}"]
    resume = ["--resume", "latest"] if command in ("train", "online") else []  # may write into the folder
    rc = main([command, *overrides, *target, *resume])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error: ")]  # (progress bars aside)
    assert len(lines) == 1, err
    assert words in lines[0], lines[0]
    assert [p.name for p in out.rglob("*")] == ["keep.txt"] and (out / "keep.txt").read_text().startswith("written")


def test_the_corpus_covers_every_command():
    commands = {(c.values if hasattr(c, "values") else c)[0] for c in CORPUS}
    assert {"train", "online", "generate", "score", "compare", "export"} <= commands and len(CORPUS) >= 20


def test_sizes_are_checked_before_the_weights_load(tmp_path, capsys):
    """A folder with the config files but no weights: the size error comes first, so nothing is loaded."""
    import shutil

    folder = tmp_path / "configs_only"
    for sub in ("", "vae", "transformer"):
        (folder / sub).mkdir(exist_ok=True)
    shutil.copy(REPO / "assets/tiny/sd3/model_index.json", folder)
    for sub in ("vae", "transformer"):
        shutil.copy(REPO / f"assets/tiny/sd3/{sub}/config.json", folder / sub)
    assert main(["generate", "prompt=a cat", f"model.path={folder}", "width=72", f"output_dir={tmp_path / 'o'}"]) == 2
    assert f"width=72: must be a multiple of 16 for {folder} (its latent factor; e.g. 64)" in capsys.readouterr().err
