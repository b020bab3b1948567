"""End to end through the CLI on the tiny real SD1.5 / SDXL pipelines: train from raw parquet and from the cache,
save a LoRA that plain diffusers loads, LoRA changes the outputs, resume continues the run exactly, generate."""

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffalign.data import PreferencePairs, build_cache, load_preferences, model_inputs
from diffalign.data.cache import CachedPairs
from diffalign.likelihood import Schedule, denoising_errors, pair_noise, pair_timesteps
from diffalign.lora import add_lora, reference_mode
from diffalign.models import load_family
from diffalign.objectives import DiffusionDPO
from diffalign.objectives.base import Objective

REPO = Path(__file__).resolve().parents[1]
TINY = {"sd": REPO / "assets/tiny/sd15", "sdxl": REPO / "assets/tiny/sdxl"}
PIPES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", make_rows(12, seed=3))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(config: str, *overrides: str, resume: str = "") -> int:
    args = ["train", str(REPO / config), *overrides]
    return main(args + (["--resume", resume] if resume else []))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_train_raw_then_plain_diffusers_loads_the_lora(family, pairs_file, tmp_path):
    run = tmp_path / "run"
    config = f"configs/tiny/{'sd15' if family == 'sd' else 'sdxl'}_dpo.yaml"
    rc = _train(config, f"model.path={TINY[family]}", f"data.source={pairs_file}", f"train.output_dir={run}")
    assert rc == 0
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)  # policy == reference at LoRA init
    record = json.loads((run / "run.json").read_text())
    assert record["versions"]["diffusers"] and "git_sha" in record
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["alpha"] == 8.0
    assert any((run / "logs").rglob("events.out.tfevents*"))

    pipe = PIPES[family].from_pretrained(TINY[family])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(run / "lora")
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(base - tuned).max() > 1e-4  # the trained LoRA changes the outputs

    # lora_alpha (8) != rank (4) survived: the reloaded scale equals the trained one
    fam = load_family(str(TINY[family]))
    from diffalign.lora import load_lora

    load_lora(fam, run / "lora")
    layer = next(m for n, m in fam.denoiser.named_modules() if n.endswith("to_q") and hasattr(m, "scaling"))
    assert math.isclose(next(iter(layer.scaling.values())), 2.0)


def test_cache_command_then_train_from_cache_without_encoders(pairs_file, tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    common = [f"model.path={TINY['sdxl']}", f"data.source={pairs_file}", f"data.cache_dir={cache}"]
    assert main(["cache", str(REPO / "configs/tiny/sdxl_dpo.yaml"), *common]) == 0
    assert (cache / "index.json").is_file()
    assert _train("configs/tiny/sdxl_dpo.yaml", *common, f"train.output_dir={run}") == 0
    assert "VAE and text encoders not loaded" in capsys.readouterr().out
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_continues_step_count_and_losses_exactly(pairs_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [f"model.path={TINY['sd']}", f"data.source={pairs_file}", "train.max_steps=5", "train.checkpoint_every=2"]
    assert _train("configs/tiny/sd15_dpo.yaml", *common, f"train.output_dir={a}") == 0
    full = _metrics(a)
    # b: the same run "killed" after its step-4 checkpoint: keep only what existed then, then resume
    shutil.copytree(a / "checkpoints", b / "checkpoints")
    shutil.rmtree(b / "checkpoints" / "step-000002")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:4]))
    assert _train("configs/tiny/sd15_dpo.yaml", *common, f"train.output_dir={b}", resume="latest") == 0
    resumed = _metrics(b)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert resumed[4]["loss"] == pytest.approx(full[4]["loss"], abs=1e-6)
    assert resumed[4]["reward_margin"] == pytest.approx(full[4]["reward_margin"], abs=1e-5)


@pytest.mark.numerics
def test_cached_and_uncached_paths_give_the_same_loss(pairs_file, tmp_path):
    family = load_family(str(TINY["sdxl"]))
    rows = load_preferences(str(pairs_file))
    pairs = PreferencePairs(rows, 64, seed=0)
    build_cache(family, pairs, tmp_path / "cache", model_path=str(TINY["sdxl"]), progress=False)
    cached = CachedPairs(tmp_path / "cache", seed=0)
    from diffalign.data import collate

    raw_batch, cached_batch = collate([pairs[i] for i in range(4)]), collate([cached[i] for i in range(4)])
    add_lora(family.denoiser, 4, 4.0, family.lora_target_modules)
    with torch.no_grad():  # make the policy differ from the reference
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    schedule = Schedule(family.scheduler, family.prediction_type)
    losses, errs = [], []
    for batch in (raw_batch, cached_batch):
        x0, cond, label = model_inputs(family, batch)
        g = torch.Generator().manual_seed(7)
        t, eps = pair_timesteps(4, 1000, g), pair_noise(x0, g)
        errors = denoising_errors(family.denoise, schedule, x0, cond, t, eps, lambda: reference_mode(family.denoiser))
        loss, _ = DiffusionDPO(beta=5000.0)(errors.err, errors.ref_err, label)
        losses.append(loss)
        errs.append(torch.cat([errors.err, errors.ref_err]))
    assert not torch.allclose(losses[0], torch.full_like(losses[0], math.log(2)))
    # the errors agree to float rounding (the UNet may round differently on the cache's tensors, ~1 ulp = 1e-7) ...
    assert torch.allclose(errs[0], errs[1], rtol=0, atol=1e-6), (errs[0] - errs[1]).abs().max()
    # ... which beta/2 = 2500 amplifies in the loss: a few ulp of margin -> up to ~1e-3 (measured 2.4e-4)
    assert torch.allclose(losses[0], losses[1], atol=1e-3), (losses[0] - losses[1]).abs().max()


def test_generate_with_lora_writes_images_manifest_and_grid(pairs_file, tmp_path):
    run, out, base_out = tmp_path / "run", tmp_path / "gen", tmp_path / "gen_base"
    assert (
        _train(
            "configs/tiny/sd15_dpo.yaml",
            f"model.path={TINY['sd']}",
            f"data.source={pairs_file}",
            f"train.output_dir={run}",
        )
        == 0
    )
    common = [f"model.path={TINY['sd']}", "prompt=a photo of a cat, red", "images_per_prompt=3", "steps=2"]
    assert main(["generate", *common, f"loras=[{run / 'lora'}:1.0]", f"output_dir={out}"]) == 0
    assert main(["generate", *common, f"output_dir={base_out}"]) == 0
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in manifest] == [0, 1, 2] and manifest[0]["prompt"] == "a photo of a cat, red"
    assert manifest[0]["loras"][0]["scale"] == 1.0
    assert (out / "grid.png").is_file() and (out / "00002.png").is_file()
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(d / "00000.png"), dtype=float) for d in (out, base_out))
    assert np.abs(a - b).max() > 0


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    assert main(["train", "train.max_step=3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert main(["train", "--resum", "latest"]) == 2
    assert "unknown option --resum" in capsys.readouterr().err
    assert main(["train", "model.path=org/not-a-model", f"train.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffalign: error: org/not-a-model:")


def _lora(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def lora_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all LoRA tensors."""
    return float(sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(a[k].norm() ** 2 for k in a) ** 0.5)


def test_batch_times_accumulation_equivalence(pairs_file, tmp_path):
    """4 pairs x 1 micro-step == 2 pairs x 2 micro-steps: same pairs, same keyed noise, same mean gradient (the
    premise of tests/test_multiprocess.py, where 2 processes x 2 pairs must equal this too).

    Not bitwise: conv kernels round differently at batch 2 and 4, beta/2 = 1000 amplifies that, and AdamW's first
    steps (update ~ lr * sign(g)) flip on near-zero gradient entries. Measured: losses within 6e-5, LoRA relative
    distance 1.3e-6; feeding different pairs (batch 2, no accumulation) gives 5e-3..4e-2 and 1e-2."""
    common = [f"model.path={TINY['sd']}", f"data.source={pairs_file}", "train.max_steps=3", "train.tensorboard=false"]
    one, accum = tmp_path / "one", tmp_path / "accum"
    assert _train("configs/tiny/sd15_dpo.yaml", *common, "train.batch_size=4", f"train.output_dir={one}") == 0
    assert (
        _train(
            "configs/tiny/sd15_dpo.yaml",
            *common,
            "train.batch_size=2",
            "train.grad_accum=2",
            f"train.output_dir={accum}",
        )
        == 0
    )
    for a, b in zip(_metrics(one), _metrics(accum)):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-4)
    assert _metrics(one)[2]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # it trained
    assert lora_distance(_lora(one), _lora(accum)) < 1e-4


def test_resume_latest_without_a_checkpoint_starts_at_step_0(pairs_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    killed = '{"step": 1, "loss": 9.0}\n{"step": 2, "lo'  # a run killed before its first checkpoint
    (run / "metrics.jsonl").write_text(killed)
    args = [f"model.path={TINY['sd']}", f"data.source={pairs_file}", f"train.output_dir={run}"]
    assert _train("configs/tiny/sd15_dpo.yaml", *args, resume="latest") == 0
    assert "no checkpoint under" in capsys.readouterr().out
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)


@dataclass
class NonFiniteOn(Objective):
    """Diffusion-DPO whose loss is NaN on chosen calls (1-based): a stand-in for a diverging step, registered in
    OBJECTIVES for the test like any other objective."""

    beta: float = 2000.0
    nan_calls: list = field(default_factory=list)
    nan_from: int = 0
    calls: int = 0
    needs_reference: ClassVar[bool] = True
    paired: ClassVar[bool] = True
    xt_source: ClassVar[str] = "noise"
    sources: ClassVar[tuple[str, ...]] = ("pairs",)

    def __call__(self, err, ref_err, label):
        self.calls += 1
        loss, metrics = DiffusionDPO(beta=self.beta)(err, ref_err, label)
        if self.calls in self.nan_calls or 0 < self.nan_from <= self.calls:
            loss = loss * float("nan")
        return loss, metrics


def test_non_finite_steps_are_skipped_counted_and_five_in_a_row_stop_the_run(
    pairs_file, tmp_path, monkeypatch, capsys
):
    from diffalign.objectives import OBJECTIVES

    monkeypatch.setitem(OBJECTIVES, "nonfinite", NonFiniteOn)
    common = [
        f"model.path={TINY['sd']}",
        f"data.source={pairs_file}",
        "objective.name=nonfinite",
        "train.max_steps=6",
        "train.tensorboard=false",
    ]
    run = tmp_path / "skips"
    assert _train("configs/tiny/sd15_dpo.yaml", *common, "objective.nan_calls=[2, 3]", f"train.output_dir={run}") == 0
    rows = _metrics(run)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 2, 2]
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[3]["loss"])
    assert "2 non-finite steps skipped" in capsys.readouterr().out

    run = tmp_path / "diverged"
    assert _train("configs/tiny/sd15_dpo.yaml", *common, "objective.nan_from=2", f"train.output_dir={run}") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffalign: error:")]
    assert len(err) == 1
    assert "non-finite loss or gradients for 5 steps in a row, the last at step 6 (pair indices [" in err[0]
    assert not (run / "lora").exists()


@pytest.mark.parametrize("name", ["d3po", "dro"])
def test_train_sends_on_policy_objectives_to_online(name, tmp_path, capsys):
    """D3PO and Diffusion-DRO learn from the model's own samples: `diffalign train` refuses them, writing nothing."""
    run = tmp_path / "run"
    assert main(["train", f"objective.name={name}", f"train.output_dir={run}"]) == 2  # the YAML's beta: dpo's
    err = capsys.readouterr().err
    assert f"objective '{name}' trains on the model's own samples: run `diffalign online`" in err
    assert not run.exists()
