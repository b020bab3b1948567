"""Measure what benchmarks/memory.py estimates: peak memory and step time of one DPO-LoRA step (1 pair, policy +
adapters-off reference forward, backward, AdamW) per family and setting, with random weights (nothing downloaded).

    python benchmarks/memory_measure.py --device cuda                      # all families x fp32 bf16 bf16+ckpt int8+ckpt
    python benchmarks/memory_measure.py --device cpu --families sd15 --settings bf16+ckpt --res-div 8 --steps 1

The quantized setting measured is int8+ckpt (torchao `quantize_` with Int8WeightOnlyConfig on the Linear layers, what
diffusers' TorchAoConfig applies at load; model.quantize=int8). nf4 is not measured here (bitsandbytes quantizes at
load from a checkpoint). Peak = torch.cuda.max_memory_allocated over the timed steps, after the model is built; on CPU
the peak is not measured (null). --res-div shrinks the latents (smoke tests on CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from memory import FAMILIES, RANK, SETTINGS, UNITS  # noqa: F401

from diffalign.lora import add_lora, reference_mode

MEASURED = ["fp32", "bf16", "bf16+ckpt", "int8+ckpt"]


def _inputs(name: str, dtype, device, res_div: int) -> dict:
    kw = FAMILIES[name][3](2, dtype)
    out = {}
    for key, value in kw.items():
        if isinstance(value, dict):
            out[key] = {k: torch.randn(v.shape, dtype=v.dtype, device=device) for k, v in value.items()}
            continue
        if key == "img_shapes":  # Qwen-Image's latent grid per image, shrunk with hidden_states
            out[key] = [[(f, h // res_div, w // res_div) for f, h, w in shapes] for shapes in value]
            continue
        shape = list(value.shape)
        if res_div > 1 and key in ("sample", "hidden_states"):
            if value.ndim == 4:
                shape[2] //= res_div
                shape[3] //= res_div
            else:
                shape[1] //= res_div * res_div
        if key == "img_ids":
            shape[0] //= res_div * res_div
        if value.is_floating_point() and key not in ("timestep", "guidance", "txt_ids", "img_ids"):
            out[key] = torch.randn(shape, dtype=value.dtype, device=device)
        else:
            out[key] = torch.full(shape, 0.5 if value.is_floating_point() else 500, dtype=value.dtype, device=device)
    return out


def measure(name: str, setting: str, device: str, steps: int, warmup: int, res_div: int) -> dict:
    _, cls, config, _, suffixes, _ = FAMILIES[name]
    dtype, quant, ckpt = SETTINGS[setting]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the weights dtype
    try:
        with torch.device(device):
            model = cls(**config).eval()
    finally:
        torch.set_default_dtype(default)
    if quant == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    params = add_lora(model, RANK, RANK, suffixes)
    if ckpt:
        model.enable_gradient_checkpointing()
        model.train()
    inputs = _inputs(name, dtype, device, res_div)
    opt = torch.optim.AdamW(params, lr=1e-5)
    cuda = device.startswith("cuda")
    times = []
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad(), reference_mode(model):
            ref = model(**inputs, return_dict=False)[0].float()
        out = model(**inputs, return_dict=False)[0].float()
        err = (out - ref.roll(1, dims=0)).pow(2).flatten(1).mean(1)  # a stand-in target; the cost is the same
        loss = -F.logsigmoid(-(err[0] - err[1]) * 100.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if cuda else None
    del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    return {"peak_gb": peak, "step_s": sorted(times)[len(times) // 2]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--settings", nargs="+", default=MEASURED, choices=MEASURED)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--res-div", type=int, default=1)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    results = {}
    for name in args.families:
        for setting in args.settings:
            try:
                row = measure(name, setting, args.device, args.steps, args.warmup, args.res_div)
            except torch.OutOfMemoryError:
                row = {"peak_gb": float("inf"), "step_s": None}
                torch.cuda.empty_cache()
            results.setdefault(name, {})[setting] = row
            peak = "n/a" if row["peak_gb"] is None else f"{row['peak_gb']:.1f} GB"
            step = "n/a" if row["step_s"] is None else f"{row['step_s']:.2f} s"
            print(f"{FAMILIES[name][0]:<20} {setting:<10} peak {peak:>9}  step {step}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
