"""Random LoRAs on tiny families, exported through `diffalign export format=kohya`: the export read-back tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffalign.pipelines.cli import main
from safetensors import safe_open

from diffalign.lora import add_lora, save_lora


def random_lora(fam, targets: list[str], rank: int = 4, alpha: int = 8, seed: int = 1) -> None:
    """A LoRA of `rank` / `alpha` on `targets` with random lora_B (std 0.1), so that it changes the network."""
    add_lora(fam.denoiser, rank, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def export_kohya(fam, tmp_path: Path, *read: str) -> tuple[Path, Path, set[str], list[torch.Tensor]]:
    """Save fam's LoRA and export it: (the LoRA folder, the exported file, its keys, the tensors named in `read`)."""
    lora = save_lora(fam, tmp_path / "lora").parent
    out = tmp_path / "comfy.safetensors"
    assert main(["export", f"src={lora}", f"out={out}", "format=kohya"]) == 0
    with safe_open(str(out), framework="pt") as f:
        return lora, out, set(f.keys()), [f.get_tensor(k) for k in read]


def assert_reads_back(pipe, family_cls, fam, lora: Path, exported: Path, inputs: tuple) -> None:
    """diffusers' `pipe.load_lora_weights` reads the diffusers-format LoRA folder and the exported file into the same
    network: equal denoiser outputs on `inputs` (xt, t, cond), and equal to diffalign's own LoRA'd family `fam`."""
    pipe.load_lora_weights(str(lora), adapter_name="diffusers")
    pipe.load_lora_weights(str(exported), adapter_name="comfy")
    plain = family_cls(pipe, pipe.vae.config, torch.float32)
    xt, t, cond = inputs
    with torch.no_grad():
        pipe.set_adapters("diffusers")
        expected = plain.denoise(xt, t, cond)
        pipe.set_adapters("comfy")
        torch.testing.assert_close(plain.denoise(xt, t, cond), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(expected, fam.denoise(xt, t, cond), rtol=0, atol=1e-6)
