"""Quantized frozen base under the LoRA (model.quantize) on the tiny FLUX pipeline, on CPU with torchao int8:
the transformer's linears hold int8 (or fp8) weights, the LoRA trains on top, the reference is the same quantized network with
adapters off, and the saved LoRA loads onto the unquantized base. Backends that cannot run here fail in one line."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from data_factory import make_rows, write_parquet
from diffalign.pipelines.cli import main
from safetensors import safe_open

from diffalign.errors import DiffalignError
from diffalign.lora import add_lora, load_lora, reference_mode
from diffalign.models import load_family
from diffalign.quantize import QUANTIZE, check_backend

pytest.importorskip("torchao", reason="the int8 backend is the optional extra diffalign[quantize]")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny" / "flux"


@pytest.mark.parametrize("kind, tensor", [("int8", "Int8Tensor"), ("fp8", "Float8Tensor")])
def test_quantized_base_holds_quantized_weights_and_adapters_off_is_the_quantized_base(kind, tensor):
    fam = load_family(str(TINY), dtype=torch.bfloat16, quantize=kind)
    weight = fam.denoiser.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == tensor and fam.pipe.text_encoder_2.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    xt, t, cond = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([20, 600]), fam.encode_prompts(["a", "cat"])
    with torch.no_grad():
        base = fam.denoise(xt, t, cond)
    params = add_lora(fam.denoiser, 4, 8, fam.lora_target_modules)
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        tuned = fam.denoise(xt, t, cond)
        with reference_mode(fam.denoiser):
            reference = fam.denoise(xt, t, cond)
    assert torch.equal(reference, base) and not torch.equal(tuned, base)
    fam.denoise(xt, t, cond).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.shape[0] == 4)  # lora_A


def test_dpo_on_an_int8_base_then_the_lora_loads_onto_the_unquantized_base(tmp_path):
    pairs = write_parquet(tmp_path / "pairs.parquet", make_rows(8, seed=3))
    run = tmp_path / "run"
    args = [f"data.source={pairs}", f"train.output_dir={run}", "model.quantize=int8", "model.dtype=bfloat16"]
    assert main(["train", str(REPO / "configs/tiny/flux_dpo.yaml"), *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert math.isclose(rows[0]["loss"], math.log(2), abs_tol=1e-6)  # policy == the quantized reference at init
    file = run / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert saved and all(v.dtype == torch.float32 for v in saved.values())  # adapters only, no quantized weights
    plain = load_family(str(TINY))  # unquantized fp32 base
    xt, t, cond = torch.randn(1, 16, 8, 8), torch.tensor([500]), plain.encode_prompts(["a cat"])
    with torch.no_grad():
        base = plain.denoise(xt, t, cond)
        load_lora(plain, run / "lora")
        tuned = plain.denoise(xt, t, cond)
    assert (tuned - base).abs().max() > 1e-6
    loaded = {n: p for n, p in plain.denoiser.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)


@pytest.mark.parametrize("kind", ["nf4"])
def test_backend_that_cannot_train_here_names_backend_and_device(kind):
    backend = QUANTIZE[kind]
    installed = importlib.util.find_spec(backend.package) is not None
    expected = "cannot train on device cpu" if installed else "is not installed"
    with pytest.raises(DiffalignError, match=rf"model.quantize={kind}: backend {backend.package} .*{expected}") as err:
        check_backend(kind, "cpu")
    assert "cpu" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DiffalignError, match=f"backend {backend.package}"):
        load_family(str(TINY), quantize=kind)  # the family load refuses before reading any weights


def test_bad_quantize_values_and_unsupported_family_give_one_line(tmp_path, capsys):
    with pytest.raises(DiffalignError, match="model.quantize must be one of none, int8, fp8, nf4, not 'int3'"):
        check_backend("int3", "cpu")
    assert check_backend("none", "cpu") is None
    with pytest.raises(
        DiffalignError,
        match=r"^model.quantize=int8: backend torchao cannot train on device mps \(needs cpu or cuda\)$",
    ):
        check_backend("int8", "mps")
    pairs = write_parquet(tmp_path / "pairs.parquet", make_rows(4, seed=3))
    args = [f"data.source={pairs}", f"train.output_dir={tmp_path / 'run'}", "model.quantize=int8"]
    assert main(["train", str(REPO / "configs/tiny/sdxl_dpo.yaml"), *args]) == 2
    assert "model.quantize: family 'sdxl' has no quantized base yet" in capsys.readouterr().err
