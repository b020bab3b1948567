"""Bad inputs through the CLI (the corpus in tests/bad_inputs): a one-line error naming the item, exit code 2 and
nothing already written lost; or, where the user opted in (data.skip_bad_rows=true), a counted skip; or, for odd
but valid inputs, a normal run. Plus disk full during a checkpoint save, and safe loading (no pickle without an
explicit opt-in, and then only torch.load(weights_only=True))."""

import json
import logging
import re
import time
from pathlib import Path

import pytest
import torch
from bad_inputs import CASES, TRAIN, rows
from data_factory import write_parquet
from diffalign.pipelines.cli import main
from safetensors.torch import load_file

from diffalign.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(err: str) -> str:
    """The single `diffalign: error:` line of stderr (no traceback anywhere)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("diffalign: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", CASES)
def test_corpus_case(name, tmp_path, capsys, caplog):
    case = CASES[name](tmp_path)
    before = _snapshot(tmp_path)
    started = time.time()
    with caplog.at_level(logging.WARNING):
        rc = main(case.argv)
    out, err = capsys.readouterr()
    if case.error is None:  # odd but valid: converted / truncated / counted, and trained
        assert rc == 0, err[-3000:]
        assert "saved LoRA to" in out
        if "warning" in case.notes:
            assert case.notes["warning"] in caplog.text
            assert "duplicate_ids 1" in out  # the "data: 4 pairs (duplicate_ids 1)" line
    else:
        assert rc == 2, (out + err)[-3000:]
        line = _one_line_error(err)
        assert case.error in line, line
        assert time.time() - started < 60  # fails fast (the hub id case must not retry downloads)
    after = _snapshot(tmp_path)
    assert all(after.get(p) == data for p, data in before.items())  # nothing already written is lost or changed

    if case.skip:  # opted in: the row is skipped, counted and reported, and training goes on
        rc = main([*case.argv, "data.skip_bad_rows=true", f"train.output_dir={tmp_path / 'skipping'}"])
        out, err = capsys.readouterr()
        assert rc == 0, err[-3000:]
        metrics = [json.loads(line) for line in (tmp_path / "skipping" / "metrics.jsonl").read_text().splitlines()]
        skipped_at_open = "data: 3 pairs (bad 1)" in out  # labels, prompt, zero-size: the cheap checks
        skipped_at_decode = metrics[-1]["skipped_rows"] == 1 and "1 bad rows skipped" in out  # undecodable image
        assert skipped_at_open != skipped_at_decode, out


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one_then_resumes(tmp_path, monkeypatch, capsys):
    import diffalign.checkpoint as checkpoint

    src = write_parquet(tmp_path / "pairs.parquet", rows())
    run = tmp_path / "run"
    argv = [*TRAIN, f"data.source={src}", f"train.output_dir={run}", "train.max_steps=6", "train.checkpoint_every=2"]
    real_save = checkpoint._save_tensors

    def disk_full_at_step_4(tensors, path):
        if "step-000004" in str(path):
            raise OSError(28, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "_save_tensors", disk_full_at_step_4)
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.endswith(
        f"{run / 'checkpoints' / 'step-000004'}: checkpoint not written (No space left on device); "
        "complete checkpoints kept: step-000002"
    )
    ckpt = run / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-000002"] and not list(ckpt.glob("*.tmp-*"))
    intact = _snapshot(ckpt / "step-000002")
    assert load_file(str(ckpt / "step-000002" / "trainable.safetensors"))  # readable

    monkeypatch.setattr(checkpoint, "_save_tensors", real_save)  # space freed: resume
    assert main([*argv, "--resume", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows 3-4 of the failed run were dropped, not duplicated
    assert _snapshot(ckpt / "step-000002") == intact  # read, never rewritten


def test_bad_data_on_resume_leaves_the_run_untouched(tmp_path, capsys):
    src = write_parquet(tmp_path / "pairs.parquet", rows())
    run = tmp_path / "run"
    argv = [*TRAIN, f"data.source={src}", f"train.output_dir={run}", "train.max_steps=4", "train.checkpoint_every=2"]
    assert main(argv) == 0
    before = _snapshot(run)
    src.write_bytes(src.read_bytes()[:-300])  # the data got truncated since
    assert main([*argv, "--resume", "latest"]) == 2
    assert "unreadable parquet" in _one_line_error(capsys.readouterr().err)
    assert _snapshot(run) == before


# ------------------------------------------------------------------------------------------------ safe loading


def test_scorer_weights_in_a_pickle_need_the_opt_in_and_then_load_weights_only(tmp_path, capsys):
    from diffalign.rewards.embeddings import load_weights

    path = tmp_path / "scorer.pt"
    torch.save({"layers.0.weight": torch.ones(2, 2)}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path} is a torch pickle: pass allow_pickle=True")):
        load_weights(path)
    assert torch.equal(load_weights(path, allow_pickle=True)["layers.0.weight"], torch.ones(2, 2))

    evil = tmp_path / "evil.pt"
    torch.save({"w": _RunsCode()}, evil)  # a pickle that would call print() when unpickled
    with pytest.raises(Exception, match="Weights only load failed"):
        load_weights(evil, allow_pickle=True)
    assert "pwned" not in capsys.readouterr().out


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


PACKAGE = [p for folder in ("diffalign", "pipelines") for p in sorted((REPO / folder).rglob("*.py"))]


def test_no_pickle_in_the_package_and_torch_load_only_weights_only():
    offenders = []
    for path in PACKAGE:
        text = path.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            offenders.append(f"{path}: imports a pickle module")
        for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call.group(0):
                offenders.append(f"{path}: {call.group(0)}")
        for call in re.finditer(r"torch\.save\(|np\.load\([^)]*allow_pickle=True|\.to_pickle\(|pickle\.dump", text):
            offenders.append(f"{path}: writes or reads a pickle ({call.group(0)})")
    assert not offenders, "\n".join(offenders)
    assert any("torch.load(" in p.read_text() for p in PACKAGE)  # the scan sees the one opt-in call


def test_every_file_a_run_writes_is_safetensors_json_yaml_png_or_tensorboard(tmp_path):
    src = write_parquet(tmp_path / "pairs.parquet", rows())
    run = tmp_path / "run"
    argv = [
        *TRAIN,
        f"data.source={src}",
        f"train.output_dir={run}",
        "train.checkpoint_every=1",
        "train.tensorboard=true",
        "train.validate_every=2",
        "train.validation_prompts=[a cat]",
    ]
    assert main(argv) == 0
    allowed = (".safetensors", ".json", ".jsonl", ".yaml", ".yml", ".png")  # .yml: tensorboard's hparams
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in written) and any(p.suffix == ".safetensors" for p in written)
    odd = [p for p in written if p.suffix not in allowed and not p.name.startswith("events.out.tfevents.")]
    assert not odd, odd
