"""benchmarks/memory.py's accounting (no weights, meta device) and memory_measure.py's step at tiny latent size.
Scripts, not speed tests: no timing asserts; the published parameter counts check that the configs are the real ones."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory  # noqa: E402


def test_accounting_of_flux_and_sd15():
    results = memory.main(["--families", "sd15", "flux", "--shards", "8"])
    flux, sd15 = results["flux"], results["sd15"]
    assert 11.8e9 < flux["params"] < 12.0e9  # FLUX.1-dev: "12 B"
    assert 0.85e9 < sd15["params"] < 0.87e9  # SD1.5 UNet: 860 M
    for r in (flux["rows"], sd15["rows"]):
        assert r["fp32"]["weights_gb"] == pytest.approx(2 * r["bf16"]["weights_gb"])
        assert r["nf4+ckpt"]["weights_gb"] < r["int8+ckpt"]["weights_gb"] < r["bf16+ckpt"]["weights_gb"]
        assert r["bf16+ckpt"]["activations_gb"] < r["bf16"]["activations_gb"] < r["fp32"]["activations_gb"]
        assert len({row["lora_states_gb"] for row in r.values()}) == 1
    # --shards 8: per GPU = 1/8 of the weights and LoRA state + all activations + two gathered blocks
    row = flux["rows"]["bf16+ckpt"]
    gathered = row["fsdp_gb"] - row["weights_gb"] / 8 - row["lora_states_gb"] / 8 - row["activations_gb"]
    assert 0 < gathered < row["weights_gb"] / 10  # two of FLUX's 57 blocks, the largest (double-stream) ones
    assert row["fsdp_gb"] < row["total_gb"] / 2
    assert "fsdp_gb" not in flux["rows"]["nf4+ckpt"]  # a quantized base is not sharded


@pytest.mark.slow
def test_measured_step_runs_on_cpu_at_tiny_latents():
    import memory_measure

    results = memory_measure.main(
        [
            "--device",
            "cpu",
            "--families",
            "sd15",
            "--settings",
            "int8+ckpt",
            "--res-div",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
        ]
    )
    row = results["sd15"]["int8+ckpt"]
    assert row["peak_gb"] is None and row["step_s"] > 0


def test_accounting_of_flux2_klein_4b_and_dev():
    results = memory.main(["--families", "flux2_klein_4b", "flux2_dev"])
    assert 3.85e9 < results["flux2_klein_4b"]["params"] < 3.90e9  # FLUX.2-klein-4B: "4B"
    assert 32.1e9 < results["flux2_dev"]["params"] < 32.3e9  # FLUX.2-dev: "32B"
    for r in (results["flux2_klein_4b"]["rows"], results["flux2_dev"]["rows"]):
        assert r["nf4+ckpt"]["total_gb"] < r["int8+ckpt"]["total_gb"] < r["bf16+ckpt"]["total_gb"]
