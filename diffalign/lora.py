"""LoRA on the denoiser: add trainable adapters, run the reference model (adapters off), save, load and combine.

Files are diffusers-format `pytorch_lora_weights.safetensors` ("unet."-prefixed peft keys) with the adapter config
(rank, alpha, targets) in the safetensors metadata, so `pipe.load_lora_weights(dir)` in plain diffusers restores the
same outputs. Without that metadata diffusers reloads alpha as the rank (reference/feasibility.md, section 3).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# (down, up) key suffixes: diffusers' `convert_state_dict_to_diffusers` writes "lora.down/up"; peft writes "lora_A/B"
LORA_KEY_PAIRS = [(".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight")]
METADATA_KEY = "diffalign"  # our own metadata (run config, base model, ...) as one JSON string
# family name -> the diffusers pipeline class whose `save_lora_weights` writes that family's file format.
# The pixel-space toy UNet uses the SD layout ("unet." prefix), so plain StableDiffusionPipeline code reads it.
LORA_WRITERS = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "toy": StableDiffusionPipeline}


def add_lora(denoiser, rank: int, alpha: float, target_modules: list[str], init: str | bool = "gaussian"):
    """Freeze `denoiser` and attach a LoRA adapter named "default"; returns the trainable (fp32) LoRA params.

    With init="gaussian" (A random, B = 0) the adapted model's output equals the base output exactly.
    """
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    denoiser.add_adapter(config)
    cast_training_params(denoiser, dtype=torch.float32)  # LoRA params train in fp32 even on an fp16/bf16 base
    return [p for p in denoiser.parameters() if p.requires_grad]


@contextmanager
def reference_mode(denoiser):
    """Inside the block the denoiser is the base model (all adapters off); they are re-enabled on exit, even after an
    exception. peft re-marks the active adapters' params as trainable on enable, so training continues unchanged."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def lora_state_dict(denoiser, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers key format (no "unet." prefix; the writer adds it)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=adapter_name))


def save_lora(family, out_dir, metadata: dict | None = None, adapter_name: str = "default") -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` (diffusers format + adapter config); returns the file.

    `metadata` (JSON-serializable) is stored under the "diffalign" safetensors metadata key; see `read_metadata`.
    """
    writer = LORA_WRITERS[family.name]
    config = family.denoiser.peft_config[adapter_name].to_dict()
    writer.save_lora_weights(
        out_dir,
        unet_lora_layers=lora_state_dict(family.denoiser, adapter_name),
        unet_lora_adapter_metadata=config,
    )
    path = Path(out_dir) / WEIGHT_NAME
    if metadata:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            file_metadata = dict(f.metadata())
        file_metadata[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str)
        save_file(tensors, str(path), metadata=file_metadata)
    return path


def _lora_file(path) -> Path:
    path = Path(path)
    path = path / WEIGHT_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA weights file")
    return path


def read_metadata(path) -> dict:
    """The `metadata` dict given to `save_lora` ({} if none)."""
    with safe_open(str(_lora_file(path)), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def check_lora_matches(denoiser, path, prefix: str) -> None:
    """Raise a one-line error naming the file unless every LoRA pair targets a module of `denoiser` with matching
    shapes (a LoRA made for another base model fails here instead of loading partly or with a long traceback)."""
    file = _lora_file(path)
    with safe_open(str(file), framework="pt") as f:
        shapes = {
            key[len(prefix) + 1 :]: f.get_slice(key).get_shape() for key in f.keys() if key.startswith(prefix + ".")
        }
    pairs = [
        (key[: -len(down)], key, key[: -len(down)] + up)
        for key in shapes
        for down, up in LORA_KEY_PAIRS
        if key.endswith(down)
    ]
    if not pairs:
        raise ValueError(f"{file}: no '{prefix}.' LoRA keys (not a diffusers-format LoRA for this model)")
    modules = dict(denoiser.named_modules())
    for name, down, up in pairs:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{file}: LoRA targets '{name}', which this base model does not have (another base?)")
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        out_dim, in_dim = base.weight.shape[:2]
        a, b = shapes[down], shapes[up]
        if a[1] != in_dim or b[0] != out_dim:
            raise ValueError(
                f"{file}: LoRA for '{name}' is {a[1]}->{b[0]} but the base layer is {in_dim}->{out_dim} (another base?)"
            )


def _load_adapter(family, path, adapter_name: str) -> None:
    file = _lora_file(path)
    check_lora_matches(family.denoiser, file, family.lora_prefix)
    family.denoiser.load_lora_adapter(
        str(file.parent), weight_name=file.name, prefix=family.lora_prefix, adapter_name=adapter_name
    )


def load_lora(family, path, adapter_name: str = "default", scale: float = 1.0) -> str:
    """Load a diffusers-format LoRA (file or folder) into `family.denoiser` as the only active adapter, at `scale`."""
    _load_adapter(family, path, adapter_name)
    family.denoiser.set_adapters([adapter_name], weights=[scale])
    return adapter_name


def load_lora_many(family, loras: list[tuple[str, float]], fuse: bool = False) -> list[str]:
    """Load several LoRAs, active together with per-LoRA scales; returns their adapter names ("lora_0", ...).

    fuse=True merges them (with their scales) into the base weights and removes the adapters: the result is a new
    base model, so a LoRA added afterwards trains on top of it and `reference_mode` gives the fused model.
    """
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        _load_adapter(family, path, name)
    family.denoiser.set_adapters(names, weights=[float(scale) for _, scale in loras])
    if fuse:
        family.denoiser.fuse_lora(adapter_names=names)
        family.denoiser.delete_adapters(names)
    return names
