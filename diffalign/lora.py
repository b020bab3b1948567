"""LoRA on the denoiser: add trainable adapters, run the reference model (adapters off), save, load, combine, export.

Files are diffusers-format `pytorch_lora_weights.safetensors` ("unet." or "transformer."-prefixed keys, the family's
`lora_prefix`, in its `lora_key_style`, written by its `lora_writer` pipeline class) with the adapter config (rank, alpha, targets) in the safetensors metadata, so
`pipe.load_lora_weights(dir)` in plain diffusers restores the same outputs. Without that metadata diffusers reloads
alpha as the rank (peft reads a missing lora_alpha as r), so a run with alpha != rank would change scale.

Kohya format (UNet families sd / sdxl; what kohya sd-scripts, A1111 and ComfyUI read and write): one file with keys
`lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` and a scalar `.alpha` per module
(scale = alpha / rank). `export_kohya` writes it with diffusers' `convert_state_dict_to_kohya` plus the real alphas
(that converter writes alpha = rank); `load_lora` and `import_kohya` read it with diffusers' own kohya converter
(`lora_state_dict`, as `pipe.load_lora_weights` does), including SDXL files with SGM block names (input_blocks ...).
Text-encoder parts (lora_te*) are refused: diffalign adapts the denoiser only. FLUX LoRAs use kohya's / ComfyUI's
BFL module names (`lora_unet_double_blocks_<i>_img_attn_qkv`, ...), converted by diffalign.lora_flux.

A LoRA made for another family (a FLUX LoRA on an SDXL base, or the other way round) is refused with a one-line error
that names both (`lora_family`).
"""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_unet_state_dict_to_peft,
)
from diffusers.utils.peft_utils import get_peft_kwargs
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffalign import lora_comfy, lora_flux, lora_flux2, lora_wan
from diffalign.errors import DiffalignError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# (down, up) key suffixes: diffusers' `convert_state_dict_to_diffusers` writes "lora.down/up"; peft writes "lora_A/B"
LORA_KEY_PAIRS = [(".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight")]
METADATA_KEY = "diffalign"  # our own metadata (run config, base model, ...) as one JSON string
FAMILY_METADATA_KEY = "diffalign_family"  # the family name of the base the LoRA was trained on
EXPERT_METADATA_KEY = "diffalign_expert"  # Wan 2.2 A14B: the expert it trained ("high" / "low"); absent otherwise
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the packed adapter config ("unet.r", ...)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # diffusers' test for a kohya file


def add_lora(denoiser, rank: int, alpha: float, target_modules: list[str], init: str | bool = "gaussian"):
    """Freeze `denoiser` and attach a LoRA adapter named "default"; returns the trainable (fp32) LoRA params.

    With init="gaussian" (A random, B = 0) the adapted model's output equals the base output exactly.
    """
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    denoiser.add_adapter(config)
    cast_training_params(denoiser, dtype=torch.float32)  # LoRA params train in fp32 even on an fp16/bf16 base
    return [p for p in denoiser.parameters() if p.requires_grad]


def add_adapter_copy(denoiser, name: str) -> dict[str, torch.nn.Parameter]:
    """Add adapter `name`, a frozen fp32 copy of "default" (same config and weights); "default" stays active.

    For the on-line adapters that are copied or averaged but never trained: the reference refreshed from the policy
    (online.ref_refresh) and DiffusionNFT's old policy (diffalign.online.old_policy). peft creates them in the base's
    dtype; on a bf16 base an EMA update smaller than half a bf16 ulp of the old weight would then be rounded away
    (DiffusionNFT keeps its old adapter in fp32). Returns its parameters by name ("...lora_A.<name>.weight", ...).
    """
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
        warnings.simplefilter("ignore", UserWarning)
        denoiser.add_adapter(copy.deepcopy(denoiser.peft_config["default"]), adapter_name=name)
    denoiser.set_adapter("default")  # re-marks "default" trainable and the new adapter frozen
    params = {n: p for n, p in denoiser.named_parameters() if f".{name}." in n}
    default = {n: p for n, p in denoiser.named_parameters() if ".default." in n}
    with torch.no_grad():
        for n, p in params.items():
            p.data = default[n.replace(f".{name}.", ".default.")].detach().float().clone()
            p.requires_grad_(False)
    return params


def lora_targets(family, preset: str = "", target_modules: list[str] | tuple = ()) -> list[str]:
    """The module names LoRA attaches to: `target_modules` if given, else the family's named `preset`, else the
    family's default (`family.lora_target_modules`). Raises `LoraError` naming the family for an unknown preset."""
    if target_modules and preset:
        raise LoraError(f"lora: set preset ('{preset}') or target_modules ({list(target_modules)}), not both")
    if target_modules:
        return list(target_modules)
    if not preset:
        return list(family.lora_target_modules)
    if preset not in family.lora_presets:
        known = ", ".join(family.lora_presets)
        raise LoraError(f"lora.preset: model family '{family.name}' has no preset '{preset}' (known: {known})")
    return list(family.lora_presets[preset])


@contextmanager
def reference_mode(denoiser):
    """Inside the block the denoiser is the base model (all adapters off); they are re-enabled on exit, even after an
    exception. peft re-marks the active adapters' params as trainable on enable, so training continues unchanged."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


@contextmanager
def adapter_mode(denoiser, adapter: str):
    """Inside the block only `adapter` is active; "default" (the trained policy) is active again on exit."""
    denoiser.set_adapter(adapter)
    try:
        yield denoiser
    finally:
        denoiser.set_adapter("default")


def copy_policy_to_ref(policy: dict, ref: dict) -> None:
    """ref adapter <- current policy adapter ("...lora_A.default.weight" -> "...lora_A.ref.weight")."""
    with torch.no_grad():
        for n, p in policy.items():
            ref[n.replace(".default.", ".ref.")].copy_(p)


def lora_state_dict(denoiser, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers key format (no "unet." prefix; the writer adds it).

    diffusers' converter renames only attention projections (to_q ... "lora.down"); other targets (resnet convs,
    time_emb_proj) would keep peft's "lora_A" names, and a file with both kinds loads only one kind in diffusers
    (it picks the format from the keys). So every key is written as "lora.down" / "lora.up"."""
    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=adapter_name))
    renamed = {}
    for key, value in weights.items():
        for peft_suffix, diffusers_suffix in (
            (".lora_A.weight", ".lora.down.weight"),
            (".lora_B.weight", ".lora.up.weight"),
        ):
            if key.endswith(peft_suffix):
                key = key.removesuffix(peft_suffix) + diffusers_suffix
        renamed[key] = value
    return renamed


KEY_STYLES = {
    "diffusers": lora_state_dict,  # diffusers' UNet layout: "lora.down" / "lora.up" keys
    "peft": lambda denoiser, adapter_name: get_peft_model_state_dict(denoiser, adapter_name=adapter_name),
}  # a family's `lora_key_style`; its `lora_writer` (a diffusers pipeline class) writes the file


def lora_weights(family, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights by the keys of the family's LoRA file (DTensors when the denoiser is sharded)."""
    return KEY_STYLES[family.lora_key_style](family.denoiser, adapter_name)


def save_lora(family, out_dir, metadata: dict | None = None, adapter_name: str = "default", weights=None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` (diffusers format + adapter config); returns the file.

    `metadata` (JSON-serializable) is stored under the "diffalign" safetensors metadata key; see `read_metadata`.
    `weights`: `lora_weights` already gathered (an FSDP2 run's, diffalign.engine.sharding.full_tensors).
    """
    config = family.denoiser.peft_config[adapter_name].to_dict()
    weights = lora_weights(family, adapter_name) if weights is None else weights
    path = _write_diffusers(family.lora_writer, family.lora_prefix, weights, config, out_dir)
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        file_metadata = dict(f.metadata())
    file_metadata[FAMILY_METADATA_KEY] = family.name
    if family.expert:
        file_metadata[EXPERT_METADATA_KEY] = family.expert
    if metadata:
        file_metadata[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str)
    save_file(tensors, str(path), metadata=file_metadata)
    return path


def _write_diffusers(writer, prefix: str, weights: dict, config: dict, out) -> Path:
    """`writer.save_lora_weights` into a folder (-> folder/pytorch_lora_weights.safetensors) or a .safetensors file."""
    out = Path(out)
    folder, name = (out.parent, out.name) if out.suffix == ".safetensors" else (out, WEIGHT_NAME)
    kwargs = {f"{prefix}_lora_layers": weights, f"{prefix}_lora_adapter_metadata": config}
    writer.save_lora_weights(folder, weight_name=name, **kwargs)
    return folder / name


class LoraError(DiffalignError, ValueError):
    """A LoRA file is unusable or made for another base model; the message names the file."""


def _lora_file(path) -> Path:
    """The .safetensors file of a LoRA folder or path. Pickled LoRAs (.bin/.pt/.ckpt) are refused: a pickle can run
    code when loaded, and diffusers, peft and kohya all write safetensors."""
    path = Path(path)
    path = path / WEIGHT_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA weights file")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRAs load only from .safetensors (pickle files can run code); convert it first")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise LoraError(f"{path}: not a readable .safetensors file ({err})") from None
    return path


def read_metadata(path) -> dict:
    """The `metadata` dict given to `save_lora` ({} if none)."""
    with safe_open(str(_lora_file(path)), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def check_lora_matches(denoiser, path, prefix: str, shapes: dict | None = None) -> None:
    """Raise a one-line error naming the file unless every LoRA pair targets a module of `denoiser` with matching
    shapes (a LoRA made for another base model fails here instead of loading partly or with a long traceback).
    `shapes` ({key: shape}, diffusers keys) replaces the file's own keys, e.g. for a converted kohya file."""
    file = _lora_file(path)
    if shapes is None:
        with safe_open(str(file), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    shapes = {key[len(prefix) + 1 :]: list(shape) for key, shape in shapes.items() if key.startswith(prefix + ".")}
    pairs = [
        (key[: -len(down)], key, key[: -len(down)] + up)
        for key in shapes
        for down, up in LORA_KEY_PAIRS
        if key.endswith(down)
    ]
    if not pairs:
        raise LoraError(f"{file}: no '{prefix}.' LoRA keys (not a diffusers-format LoRA for this model)")
    modules = dict(denoiser.named_modules())
    for name, down, up in pairs:
        module = modules.get(name)
        if module is None:
            raise LoraError(f"{file}: LoRA targets '{name}', which this base model does not have (another base?)")
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        out_dim, in_dim = base.weight.shape[:2]
        a, b = shapes[down], shapes[up]
        if a[1] != in_dim or b[0] != out_dim:
            raise LoraError(
                f"{file}: LoRA for '{name}' is {a[1]}->{b[0]} but the base layer is {in_dim}->{out_dim} (another base?)"
            )


def lora_family(file) -> str:
    """The model family a LoRA file belongs to: the family `save_lora` recorded (FAMILY_METADATA_KEY), else from its
    keys "flux2" (FLUX.2 module names), "flux" (single-stream blocks / BFL names) or "sd/sdxl" (UNet); "" when
    neither tells."""
    with safe_open(str(file), framework="pt") as f:
        keys, recorded = list(f.keys()), (f.metadata() or {}).get(FAMILY_METADATA_KEY, "")
    if recorded:
        return FAMILY_GROUPS.get(recorded, recorded)
    if any("transformer_blocks." in k and any(p in k for p in FLUX2_KEY_PARTS) for k in keys):
        return "flux2"
    if lora_flux.is_flux_kohya(keys) or any(".single_transformer_blocks." in f".{k}" for k in keys):
        return "flux"
    return "sd/sdxl" if any(k.startswith(("unet.", "lora_unet_")) for k in keys) else ""


# module names only FLUX.2's transformer has: the single blocks' fused projections, the double blocks' feed-forwards
FLUX2_KEY_PARTS = (".to_qkv_mlp_proj.", ".attn.to_out.lora_", ".ff.linear_in.", ".ff_context.linear_in.")
FAMILY_GROUPS = {"sd": "sd/sdxl", "sdxl": "sd/sdxl", "flux": "flux"}  # family name -> lora_family() value


def check_lora_family(family, file) -> None:
    """One-line error naming both when the file is a LoRA for another family than `family`."""
    made_for = lora_family(file)
    base = FAMILY_GROUPS.get(family.name, family.name)
    if made_for and made_for != base:
        raise LoraError(f"{file}: a {made_for} LoRA cannot load onto a {family.name} base model")


def lora_expert(file) -> str:
    """The expert a LoRA file was trained on (a Wan 2.2 A14B run's "high" / "low"), "" for the others."""
    with safe_open(str(file), framework="pt") as f:
        return (f.metadata() or {}).get(EXPERT_METADATA_KEY, "")


def _load_adapter(family, path, adapter_name: str):
    """Load the file into its module (`family.lora_module`: the denoiser, or a two-expert family's expert);
    returns that module."""
    file = _lora_file(path)
    check_lora_family(family, file)
    if is_kohya(file) and family.name == "flux":
        with safe_open(str(file), framework="pt") as f:
            weights, alphas = lora_flux.from_kohya({k: f.get_tensor(k) for k in f.keys()}, str(file))
        check_lora_matches(family.denoiser, file, "transformer", {k: v.shape for k, v in weights.items()})
        family.denoiser.load_lora_adapter(
            weights, prefix="transformer", network_alphas=alphas, adapter_name=adapter_name
        )
        return family.denoiser
    if is_kohya(file):
        if family.lora_prefix != "unet":
            raise LoraError(f"{file}: kohya-format LoRAs load into UNet families (sd, sdxl), not '{family.name}'")
        weights, alphas = read_kohya(file, family.denoiser.config)
        check_lora_matches(family.denoiser, file, "unet", {k: v.shape for k, v in weights.items()})
        family.denoiser.load_lora_adapter(weights, prefix="unet", network_alphas=alphas, adapter_name=adapter_name)
        return family.denoiser
    module = family.lora_module(lora_expert(file))  # the denoiser, or the expert a Wan 2.2 LoRA was trained on
    check_lora_matches(module, file, family.lora_prefix)
    module.load_lora_adapter(
        str(file.parent), weight_name=file.name, prefix=family.lora_prefix, adapter_name=adapter_name
    )
    return module


def load_lora(family, path, adapter_name: str = "default", scale: float = 1.0) -> str:
    """Load a LoRA (diffusers folder or file, or a kohya file) into `family.denoiser` (a Wan 2.2 expert LoRA: its
    expert) as the only active adapter there."""
    _load_adapter(family, path, adapter_name).set_adapters([adapter_name], weights=[scale])
    return adapter_name


def load_lora_many(family, loras: list[tuple[str, float]], fuse: bool = False) -> list[str]:
    """Load several LoRAs, active together with per-LoRA scales; returns their adapter names ("lora_0", ...).

    fuse=True merges them (with their scales) into the base weights and removes the adapters: the result is a new
    base model, so a LoRA added afterwards trains on top of it and `reference_mode` gives the fused model.
    """
    names = [f"lora_{i}" for i in range(len(loras))]
    into = {}  # module -> its (names, scales): a Wan 2.2 high- and low-noise LoRA go to their own experts
    for name, (path, scale) in zip(names, loras):
        module = _load_adapter(family, path, name)
        into.setdefault(module, ([], []))
        into[module][0].append(name)
        into[module][1].append(float(scale))
    for module, (own, scales) in into.items():
        module.set_adapters(own, weights=scales)
        if fuse:
            module.fuse_lora(adapter_names=own)
            module.delete_adapters(own)
    return names


# ---------------------------------------------------------------------------------------------------------------
# kohya <-> diffusers


def is_kohya(path: str | Path) -> bool:
    """True when every key of the LoRA file has a kohya prefix (lora_unet_, lora_te*_), as diffusers decides (FLUX
    files included)."""
    with safe_open(str(_lora_file(path)), framework="pt") as f:
        keys = list(f.keys())
    return bool(keys) and all(key.startswith(KOHYA_PREFIXES) for key in keys)


def read_kohya(path: str | Path, unet_config=None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A kohya file -> ({"unet.<module>.lora_A.weight": ...} peft weights, {"unet.<module>.alpha": alpha}), by
    diffusers' converter. `unet_config` (a UNet's `.config`) maps SGM block names (input_blocks ..., kohya's SDXL
    files) to diffusers' module paths."""
    file = _lora_file(path)
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    if any(key.startswith("lora_te") for key in keys):
        raise LoraError(f"{file}: has text-encoder LoRA weights (lora_te*); diffalign loads denoiser LoRAs only")
    if unet_config is None and any(block in key for key in keys for block in ("input_blocks", "output_blocks")):
        raise LoraError(f"{file}: SGM block names (input_blocks/output_blocks) need the base model's UNet config")
    weights, alphas = StableDiffusionPipeline.lora_state_dict(str(file), unet_config=unet_config)
    # diffusers names both in its old attention-processor layout ("attn1.processor.to_q_lora.down.weight"); its
    # UNet->peft map turns them into module paths, so alphas also match modules with their own alpha (alpha_pattern)
    module_alphas = {}
    for key, alpha in (alphas or {}).items():
        module = next(iter(convert_unet_state_dict_to_peft({key.removesuffix(".alpha"): None})))
        module_alphas[module.removesuffix(".lora_A.weight") + ".alpha"] = alpha
    return convert_unet_state_dict_to_peft(weights), module_alphas


def export_kohya(src: str | Path, out: str | Path) -> Path:
    """A diffusers-format UNet (sd, sdxl) or FLUX LoRA (folder or file) -> one kohya .safetensors file `out`.

    Weights are unchanged; each module's `.alpha` is its peft alpha (alpha_pattern, else lora_alpha, from the adapter
    metadata; rank when there is none, as diffusers then loads it), so kohya's alpha / rank equals peft's scale.
    UNet keys are diffusers' `convert_state_dict_to_kohya`; FLUX keys are BFL names (diffalign.lora_flux); Wan keys
    are the original / ComfyUI names with lora_A / lora_B (diffalign.lora_wan); Qwen-Image and Z-Image keys are
    diffusers' names under ComfyUI's `diffusion_model.` (diffalign.lora_comfy).
    """
    file, out = _lora_file(src), Path(out)
    if out.suffix != ".safetensors":
        raise LoraError(f"{out}: a kohya LoRA is one .safetensors file")
    with safe_open(str(file), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        file_metadata = dict(f.metadata() or {})
    prefixes = sorted({key.split(".")[0] for key in tensors})
    made_for = lora_family(file)
    exportable = ("flux", "flux2", "wan", *lora_comfy.MODULES)
    if prefixes != ["unet"] and not (prefixes == ["transformer"] and made_for in exportable):
        what = made_for or "/".join(prefixes) + "."
        raise LoraError(
            f"{file}: kohya export supports UNet LoRAs (sd, sdxl), FLUX, FLUX.2, Wan, Qwen-Image and Z-Image LoRAs, "
            f"not a '{what}' LoRA"
        )
    prefix = prefixes[0]
    packed = json.loads(file_metadata.get(ADAPTER_METADATA_KEY, "{}"))
    config = {key.removeprefix(prefix + "."): value for key, value in packed.items() if key.startswith(prefix + ".")}
    if config.get("use_rslora") or config.get("use_dora"):
        raise LoraError(f"{file}: rsLoRA / DoRA adapters have no kohya equivalent here")
    # "<prefix>.<module>.lora_A.weight", ...
    peft_weights = convert_unet_state_dict_to_peft(tensors) if prefix == "unet" else tensors
    alpha_pattern = config.get("alpha_pattern") or {}
    alphas = {}
    for key in [k for k in peft_weights if k.endswith(".lora_A.weight")]:
        module = key.removeprefix(prefix + ".").removesuffix(".lora_A.weight")
        rank = peft_weights[key].shape[0]
        alphas[module] = alpha_pattern.get(
            get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", rank)
        )
    if made_for == "wan":  # the original / ComfyUI names (diffalign.lora_wan), lora_A / lora_B kept
        try:
            kohya = lora_wan.to_original({k.removeprefix("transformer."): v for k, v in peft_weights.items()}, alphas)
        except lora_wan.WanExportError as err:
            raise LoraError(f"{file}: {err}") from None
    elif made_for in lora_comfy.MODULES:  # diffusers' names under diffusion_model. (diffalign.lora_comfy)
        try:
            bare = {k.removeprefix("transformer."): v for k, v in peft_weights.items()}
            kohya = lora_comfy.to_comfy(made_for, bare, alphas)
        except lora_comfy.ComfyExportError as err:
            raise LoraError(f"{file}: {err}") from None
    elif prefix == "unet":
        kohya = convert_state_dict_to_kohya(peft_weights)  # "lora_unet_<module>.lora_down.weight", ".alpha" = rank
        for module, alpha in alphas.items():
            kohya["lora_unet_" + module.replace(".", "_") + ".alpha"] = torch.tensor(float(alpha))
    else:
        bare = {k.removeprefix("transformer."): v for k, v in peft_weights.items()}
        try:  # FLUX.2: ComfyUI's diffusion_model.<BFL name> layout (diffalign.lora_flux2), scales folded into B
            if made_for == "flux2":
                kohya = lora_flux2.to_comfy(
                    bare, {m: a / bare[m + ".lora_A.weight"].shape[0] for m, a in alphas.items()}
                )
            else:
                kohya = lora_flux.to_kohya(bare, alphas)
        except (lora_flux.FluxKohyaError, lora_flux2.Flux2ComfyError) as err:
            raise LoraError(f"{file}: {err}") from None
    ranks = {int(v.shape[0]) for k, v in kohya.items() if k.endswith(("lora_down.weight", "lora_A.weight"))}
    alpha_values = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    module = "networks.lora" if prefix == "unet" else f"networks.lora_{made_for}"  # lora_flux, lora_wan, ...
    metadata = {"ss_network_module": module}
    if len(ranks) == 1 and len(alpha_values) == 1:
        metadata.update(ss_network_dim=str(ranks.pop()), ss_network_alpha=f"{alpha_values.pop():g}")
    if METADATA_KEY in file_metadata:
        metadata[METADATA_KEY] = file_metadata[METADATA_KEY]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata=metadata)
    return out


def import_kohya(src: str | Path, out: str | Path, unet_config=None) -> Path:
    """A kohya UNet or FLUX LoRA file -> diffusers format (folder, or a .safetensors file) with its adapter config built by
    diffusers' `get_peft_kwargs` (most common r / alpha, per-module rank / alpha patterns); returns it."""
    file = _lora_file(src)
    if not is_kohya(file):
        raise LoraError(f"{file}: not a kohya-format LoRA (keys do not start with {', '.join(KOHYA_PREFIXES)})")
    with safe_open(str(file), framework="pt") as f:
        flux = lora_flux.is_flux_kohya(f.keys())
        tensors = {k: f.get_tensor(k) for k in f.keys()} if flux else None
    prefix, writer = ("transformer", FluxPipeline) if flux else ("unet", StableDiffusionPipeline)
    weights, alphas = lora_flux.from_kohya(tensors, str(file)) if flux else read_kohya(file, unet_config)
    peft_weights = {k.removeprefix(prefix + "."): v for k, v in weights.items()}
    ranks = {f"^{k}": v.shape[1] for k, v in peft_weights.items() if "lora_B" in k and v.ndim > 1}
    module_alphas = {k.removeprefix(prefix + "."): v for k, v in alphas.items()}
    config = LoraConfig(**get_peft_kwargs(ranks, module_alphas, peft_weights, is_unet=True)).to_dict()
    return _write_diffusers(writer, prefix, peft_weights, config, out)
