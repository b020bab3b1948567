"""A quantized frozen base under the LoRA (`model.quantize=nf4|int8|fp8|none`), through diffusers' own backends.

Only the denoiser is quantized (the part that holds the parameters: 12 B of FLUX.1-dev's 17 B with T5); the LoRA
adapters stay fp32 and train on top (peft wraps the quantized linears), and the reference model is the same quantized
network with the adapters off, so policy and reference share one set of quantized weights (as in QLoRA, Dettmers et
al. 2023, arXiv 2305.14314). The saved LoRA holds the adapters only and loads onto an unquantized base.

    kind   backend (package)              weights                   runs on
    int8   torchao  Int8WeightOnlyConfig   int8 per-channel, 1 B     CPU and CUDA
    fp8    torchao  Float8WeightOnlyConfig float8 e4m3, 1 B          CPU and CUDA
    nf4    bitsandbytes 4-bit NF4          4-bit NormalFloat, 0.5 B  CUDA only (diffusers' bitsandbytes quantizer)

int8 and fp8 are tested on CPU (tests/test_quantize.py); on CUDA they are the same code paths but untested here (no
GPU), and nf4 is untested (bitsandbytes needs the GPU). A backend that is not installed, or cannot run on the
training device, gives a one-line error naming the backend and the device.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from diffalign.errors import DiffalignError


@dataclass(frozen=True)
class Backend:
    package: str  # import name of the backend package
    devices: tuple[str, ...]  # torch device types it runs on
    note: str  # what it stores

    def config(self, kind: str, dtype: torch.dtype):
        return BUILDERS[kind](dtype)


def _torchao(name: str):
    def build(dtype):
        from diffusers import TorchAoConfig
        from torchao import quantization

        return TorchAoConfig(getattr(quantization, name)())

    return build


def _nf4(dtype):
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


QUANTIZE = {
    "int8": Backend("torchao", ("cpu", "cuda"), "int8 weight-only"),
    "fp8": Backend("torchao", ("cpu", "cuda"), "float8 e4m3 weight-only"),
    "nf4": Backend("bitsandbytes", ("cuda",), "4-bit NF4"),
}
BUILDERS = {"int8": _torchao("Int8WeightOnlyConfig"), "fp8": _torchao("Float8WeightOnlyConfig"), "nf4": _nf4}


def check_backend(kind: str, device: str | torch.device) -> Backend | None:
    """The backend of `kind` (None for "none"), or a one-line DiffalignError naming the backend and the device."""
    if kind == "none":
        return None
    if kind not in QUANTIZE:
        raise DiffalignError(f"model.quantize must be one of none, {', '.join(QUANTIZE)}, not '{kind}'")
    backend, device = QUANTIZE[kind], torch.device(device).type
    if importlib.util.find_spec(backend.package) is None:
        raise DiffalignError(
            f"model.quantize={kind}: backend {backend.package} is not installed (pip install 'diffalign[quantize]'); "
            f"device {device}"
        )
    if device not in backend.devices:
        where = " or ".join(backend.devices)
        raise DiffalignError(
            f"model.quantize={kind}: backend {backend.package} cannot train on device {device} (needs {where})"
        )
    return backend


def pipeline_quantization(kind: str, component: str, dtype: torch.dtype, device) -> dict:
    """`from_pretrained` keyword arguments quantizing only `component` (the denoiser): {"quantization_config":
    diffusers' PipelineQuantizationConfig}, or {} for "none"."""
    backend = check_backend(kind, device)
    if backend is None:
        return {}
    from diffusers import PipelineQuantizationConfig

    return {"quantization_config": PipelineQuantizationConfig(quant_mapping={component: backend.config(kind, dtype)})}
