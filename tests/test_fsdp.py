"""FSDP2 (configs/accelerate/fsdp.yaml, the shipped config) with 2 CPU processes over gloo: the same training as one
process with the doubled batch and as DDP, offline (tiny SD3, tiny FLUX) and on-line (GRPO with a "ref" adapter,
DiffusionNFT with its "old" adapter); exact resume after kill -9; each process holds half the frozen base; the LoRA
file loads into plain diffusers.

Why they can match: as in tests/test_multiprocess.py (keyed noise per pair / row, process r trains on its share, the
gradient is averaged over processes: FSDP2 reduce-scatters the mean as DDP all-reduces it). A sharded forward
all-gathers the parameters, so it computes with the same numbers; only batch-2 vs batch-4 kernels round differently.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from safetensors.torch import load_file
from test_multiprocess import _free_port, _launch
from test_train_cli import lora_distance

REPO = Path(__file__).resolve().parents[1]
FSDP = REPO / "configs/accelerate/fsdp.yaml"
LORA_TOL = 1e-4  # measured 4e-6 (SD3 DPO, 2 steps); the different-pairs control of test_multiprocess is 1e-2
ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _fsdp_cmd(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP), "--num_processes", "2",
        "--main_process_port", str(_free_port()), "-m", "diffalign.pipelines.cli", *args,
    ]  # fmt: skip


def _launch_fsdp(*args: str) -> str:
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` with 2 CPU processes; the combined output."""
    proc = subprocess.run(_fsdp_cmd(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _kill_during_save(ckpt_dir: Path, step: int, *args: str) -> None:
    """Launch, wait until checkpoint `step` is being written (the save pauses after its first file), kill -9 the
    launcher and both processes."""
    env = dict(ENV, DIFFALIGN_TEST_SAVE_PAUSE=f"{step}:120")
    proc = subprocess.Popen(_fsdp_cmd(*args), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 500
    while not list(ckpt_dir.glob(f"step-{step:06d}.tmp-*")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the paused save"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _lora(run: Path) -> dict:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def _rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def _memory(run: Path) -> list[dict]:
    return json.loads((run / "summary.json").read_text())["memory"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("fsdp") / "pairs.parquet", make_rows(8, seed=3))


def _offline(model: str, pairs: Path, tmp: Path) -> list[str]:
    return [
        "train", str(REPO / f"configs/tiny/{model}_dpo.yaml"), f"model.path={REPO / 'assets/tiny' / model}",
        f"data.source={pairs}", f"data.cache_dir={tmp / 'cache'}", "train.max_steps=3", "train.checkpoint_every=1",
        "train.tensorboard=false",
    ]  # fmt: skip


@pytest.mark.numerics
@pytest.mark.slow(minutes=2)  # 4 launches of 2 processes + 2 in-process runs: 90 s in CI, ~5 min on 2 shared cores
def test_fsdp_sd3_offline_equals_one_process_and_ddp_resumes_after_kill_and_loads_in_diffusers(pairs, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    args = _offline("sd3", pairs, tmp_path)
    one, ddp, fsdp, killed = (tmp_path / n for n in ("one", "ddp", "fsdp", "killed"))
    assert main([*args, "train.batch_size=4", f"train.output_dir={one}"]) == 0
    _launch(*args, "train.batch_size=2", f"train.output_dir={ddp}")
    output = _launch_fsdp(*args, "train.batch_size=2", f"train.output_dir={fsdp}")
    assert output.count("FSDP2: 2 blocks + root sharded over 2 processes") == 2  # each process says so
    assert output.count("saved LoRA to") == 1 and output.count("[rank 1] memory: frozen base parameters") == 1

    # the same training: the reference pass (adapters off) and the gathered LoRA file included
    assert lora_distance(_lora(one), _lora(fsdp)) < LORA_TOL
    assert lora_distance(_lora(ddp), _lora(fsdp)) < LORA_TOL
    for a, b in zip(_rows(one, "metrics.jsonl"), _rows(fsdp, "metrics.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-4) and a["ref_err_w"] == pytest.approx(b["ref_err_w"])

    # each process holds half of the frozen base's parameter bytes (dim-0 shards, padded), one process all of it
    total = _memory(one)[0]["base_param_bytes"]
    assert [m["rank"] for m in _memory(fsdp)] == [0, 1]
    for m in _memory(fsdp):
        assert m["base_param_bytes_total"] == total and abs(m["base_param_bytes"] / total - 0.5) < 0.05
        assert m["peak_bytes"] > 0 and m["peak_measure"] == "max RSS (CPU)"

    # kill -9 while checkpoint 2 is being written: step 1 is the latest complete one; resume == uninterrupted
    _kill_during_save(killed / "checkpoints", 2, *args, "train.batch_size=2", f"train.output_dir={killed}")
    assert [p.name for p in (killed / "checkpoints").glob("step-*") if "." not in p.name] == ["step-000001"]
    one_proc = tmp_path / "killed-one"  # the same files resume in one process too (a different process count)
    shutil.copytree(killed / "checkpoints" / "step-000001", one_proc / "checkpoints" / "step-000001")
    output = _launch_fsdp(*args, "train.batch_size=2", f"train.output_dir={killed}", "--resume", "latest")
    assert output.count("resumed from") == 1
    assert lora_distance(_lora(fsdp), _lora(killed)) < 1e-6
    assert [r["step"] for r in _rows(killed, "metrics.jsonl")] == [1, 2, 3]
    assert main([*args, "train.batch_size=4", f"train.output_dir={one_proc}", "--resume", "latest"]) == 0
    assert lora_distance(_lora(fsdp), _lora(one_proc)) < LORA_TOL

    # the FSDP2 LoRA file is the usual diffusers file: plain diffusers loads every tensor of it
    pipe = StableDiffusion3Pipeline.from_pretrained(REPO / "assets/tiny/sd3")
    pipe.load_lora_weights(fsdp / "lora")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
    saved = _lora(fsdp)
    assert len(loaded) == len(saved) > 0
    assert sum(v.float().norm() for v in loaded.values()) == pytest.approx(sum(v.norm() for v in saved.values()))


@pytest.mark.numerics
@pytest.mark.slow(minutes=1)  # two launches of 2 processes + one in-process run: ~50 s in CI
def test_fsdp_flux_offline_equals_one_process_and_ddp(pairs, tmp_path):
    """FLUX: two block classes (double- and single-stream), both sharded; no clipping (the unclipped gradient
    norm of sharded gradients is all-reduced for the finiteness check). The LoRA equals the one-process run's and
    the DDP run's, and so do the validation images, which every process of the sharded run draws a share of."""
    import numpy as np
    from PIL import Image

    validation = ["train.validate_every=3", "train.validation_prompts=[a red cat,a blue dog,a green bird]"]
    args = [*_offline("flux", pairs, tmp_path), "train.max_grad_norm=0", *validation]
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    assert main([*args, "train.batch_size=4", f"train.output_dir={one}"]) == 0
    _launch(*args, "train.batch_size=2", f"train.output_dir={ddp}")
    output = _launch_fsdp(*args, "train.batch_size=2", f"train.output_dir={fsdp}")
    assert output.count("FSDP2: 2 blocks + root sharded") == 2
    assert lora_distance(_lora(one), _lora(fsdp)) < LORA_TOL
    assert lora_distance(_lora(ddp), _lora(fsdp)) < LORA_TOL
    grids = [np.asarray(Image.open(run / "validation" / "step-000003.png"), dtype=float) for run in (one, fsdp)]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2  # 8-bit levels


ONLINE = {
    # GRPO with its KL to a "ref" adapter refreshed every round; 6 samples in 3 chunks: in the second sampling step
    # process 1 has none and samples the last one again (lock-step: FSDP2 forwards are collectives)
    "grpo": ["objective.name=grpo", "objective.beta=0.04", "online.ref_refresh=1", "sampling.images_per_prompt=3",
             "sampling.sample_batch=2", "sampling.steps=3", "sampling.guidance=2.0", "sampling.eta=0.7",
             "train.steps_per_round=2"],
    # DiffusionNFT: rounds sampled by the "old" adapter (an EMA of the policy), 4 samples in 2 chunks
    "nft": ["objective.name=nft", "model.resolution=0", "sampling.images_per_prompt=2", "sampling.sample_batch=2",
            "sampling.steps=2", "sampling.eta=0", "sampling.guidance=1.0", "train.steps_per_round=1"],
}  # fmt: skip
# the real setting: a bf16 base, FSDP2's bf16 MixedPrecisionPolicy (fp32 LoRA, AdamW and gradient reduction) vs one
# process under accelerate's bf16 autocast; the first forward is the "old" adapter's sampling (nothing trainable)
ONLINE["nft-bf16"] = [*ONLINE["nft"], "model.dtype=bfloat16", "train.mixed_precision=bf16"]
TOLS = {"grpo": (1e-5, 5e-4, 1e-5), "nft": (1e-5, 5e-4, 1e-5), "nft-bf16": (1e-3, 5e-3, 2e-3)}  # measured 4e-4 (bf16)


@pytest.mark.numerics
@pytest.mark.slow  # one launch of 2 processes + one in-process run: ~90 s on 2 shared cores
@pytest.mark.parametrize("objective", sorted(ONLINE))
def test_fsdp_online_equals_one_process(tmp_path, objective):
    """Two rounds: each process samples its chunk through the sharded model, the round is gathered and scored, each
    step trains on a process's share of the rows; rewards, losses and LoRA equal the one-process run's. GRPO also
    draws a curve point, a guards check every round and the final evaluation, a share per process (3 prompts over 2
    processes: one padded), and its curves, guard checks, kept copy (gathered into the checkpoint) and report equal
    the one-process run's; resumed from round 1's checkpoint it ends with the same LoRA and kept copy."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nred dog\nblue bird\n")
    evaluation = ["eval.prompts=", "train.validate_every=0"]
    if objective == "grpo":  # and the guards: a check every round (3 prompts: one padded), the best copy kept
        evaluation = [f"eval.prompts={prompts}", "eval.images_per_prompt=1", "eval.steps=2",
                      "eval.scorers=[toy_aesthetic]", "eval.drift=[saturation]", "train.validate_every=1",
                      "guards.every=1", f"guards.prompts={prompts}", "guards.images_per_prompt=1", "guards.steps=2",
                      "guards.monitors={sat: {kind: scorer, scorer: saturation, rule: max_rise, limit: 100.0}}"]  # fmt: skip
    args = [
        "online", f"model.path={REPO / 'assets/tiny/sd3'}", "lora.rank=4", "lora.alpha=4", f"sampling.prompts={prompts}",
        "sampling.prompts_per_round=2", "sampling.shared_noise=false", "reward.scorer=toy_aesthetic",
        "reward.monitor=[]", "online.rounds=2", "train.tensorboard=false", *evaluation, *ONLINE[objective],
    ]  # fmt: skip
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert main([*args, "train.batch_size=4", f"train.output_dir={one}"]) == 0
    output = _launch_fsdp(*args, "train.batch_size=2", f"train.output_dir={fsdp}")
    assert output.count("round 2/2") == 1
    reward_tol, loss_tol, lora_tol = TOLS[objective]
    for a, b in zip(_rows(one, "rounds.jsonl"), _rows(fsdp, "rounds.jsonl"), strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=reward_tol)  # sampled through the sharded model
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=loss_tol)
    assert lora_distance(_lora(one), _lora(fsdp)) < lora_tol
    assert {v.dtype for v in _lora(fsdp).values()} == {torch.float32}  # the LoRA trains and is saved in fp32
    if objective == "grpo":  # evaluation and curves drawn through the sharded model, scored on the main process
        curves = [_rows(run, "curves.jsonl") for run in (one, fsdp)]
        assert [r["step"] for r in curves[1]] == [0, 1, 2] and [r["images"] for r in curves[1]] == [3, 3, 3]
        for a, b in zip(*curves, strict=True):
            assert a["toy_aesthetic"] == pytest.approx(b["toy_aesthetic"], abs=1e-4)
        guards = [_rows(run, "guards.jsonl") for run in (one, fsdp)]
        assert [r["round"] for r in guards[1]] == [0, 1, 2]
        for a, b in zip(*guards, strict=True):
            assert a["passed"] == b["passed"] and a["reward"] == pytest.approx(b["reward"], abs=1e-4)
            assert a["sat"] == pytest.approx(b["sat"], abs=1e-4)
        kept = [json.loads((run / "summary.json").read_text())["guards"] for run in (one, fsdp)]
        assert kept[0]["kept_round"] == kept[1]["kept_round"]
        best = [load_file(str(run / "checkpoints/step-000002/guards_best.safetensors")) for run in (one, fsdp)]
        assert best[0].keys() == best[1].keys() and lora_distance(*best) < lora_tol
        assert {tuple(v.shape) for v in best[1].values()} == {tuple(v.shape) for v in best[0].values()}
        resumed = tmp_path / "resumed"  # round 1's checkpoint, its kept copy sharded back on --resume
        shutil.copytree(fsdp / "checkpoints" / "step-000001", resumed / "checkpoints" / "step-000001")
        _launch_fsdp(*args, "train.batch_size=2", f"train.output_dir={resumed}", "--resume", "latest")
        assert lora_distance(_lora(fsdp), _lora(resumed)) < 1e-6
        assert json.loads((resumed / "summary.json").read_text())["guards"] == kept[1]
        reports = [json.loads((run / "eval" / "report.json").read_text()) for run in (one, fsdp)]
        assert reports[1]["images"] == 3 and (fsdp / "eval" / "sheet.png").is_file()
        for key in ("mean_old", "mean_new"):
            assert reports[0]["scorers"]["toy_aesthetic"][key] == pytest.approx(
                reports[1]["scorers"]["toy_aesthetic"][key], abs=1e-4
            )


def test_sharded_run_refuses_what_cannot_be_sharded_and_fsdp1(monkeypatch, tmp_path, capsys):
    """What cannot hold DTensors (8-bit AdamW's state, a quantized base) or is not tested sharded (train.compile)
    is refused with one line, before any model; FSDP1 too."""
    from diffalign.engine.sharding import fsdp_requested
    from diffalign.errors import DiffalignError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(DiffalignError, match="fsdp_version: 2"):
        fsdp_requested()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested()
    args = ["train", str(REPO / "configs/tiny/sd3_dpo.yaml"), f"train.output_dir={tmp_path / 'run'}"]
    assert main([*args, "train.adam_8bit=true"]) == 2  # the CLI's one-line error exit
    assert "train.adam_8bit: not available with FSDP2" in capsys.readouterr().err
    assert main([*args, f"train.output_dir={tmp_path / 'run2'}", "model.quantize=int8"]) == 2
    assert "model.quantize: not available with FSDP2" in capsys.readouterr().err
    assert main([*args, f"train.output_dir={tmp_path / 'run3'}", "train.compile=blocks"]) == 2
    assert "train.compile: not available with FSDP2" in capsys.readouterr().err
