"""Configs: dataclass schemas + YAML files that hold only non-defaults + dotted ``a.b=value`` overrides.

Unknown keys fail loudly with the closest valid key ("did you mean ..."); values are checked against the
field's type. No exec/eval: override values are parsed as YAML scalars/lists.

The schemas for the programs (training, generation) live here so the YAML files under configs/ have one home;
library functions never take a config object, only flat typed arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffalign.errors import DiffalignError


class ConfigError(DiffalignError, ValueError):
    """A config file or override is wrong; the message names the key (and the file)."""


# --------------------------------------------------------------------------------------------------------------
# Schemas


@dataclass
class ModelConfig:
    path: str = "toy"
    """Hub id or local diffusers folder; "toy" is the shipped toy model under assets/toy_model."""
    family: str = "auto"
    """Model family (sd, sdxl, toy, ...); "auto" reads model_index.json."""
    dtype: str = "float32"
    """Weights dtype of the frozen base (float32, bfloat16, float16); LoRA params stay float32."""
    vae_path: str = ""
    """Optional replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)."""
    resolution: int = 0
    """Training resolution in pixels; 0 = the family's native size."""
    quantize: str = "none"
    """Frozen denoiser quantized under the LoRA: none, int8 (torchao), fp8 (torchao), nf4 (bitsandbytes; CUDA)."""


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 8.0
    """LoRA alpha (scale = alpha / rank); saved in the adapter metadata so it survives reloading."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module name suffixes that get adapters."""
    init: str = "gaussian"
    """peft init_lora_weights (gaussian: B = 0, so the policy equals the reference at step 0)."""


@dataclass
class DataConfig:
    source: str = "toy"
    """Parquet file/folder, JSONL file, HF dataset id or local dataset folder; "toy" = the shipped toy pairs."""
    split: str = "train"
    """Split for HF datasets."""
    streaming: bool = False
    """Stream an HF dataset instead of downloading it (Pick-a-Pic v2 is ~335 GB)."""
    drop_ties: bool = True
    """Drop pairs with label_0 == 0.5 (the Diffusion-DPO paper drops them)."""
    skip_bad_rows: bool = False
    """Skip and count undecodable rows instead of stopping with an error."""
    hflip: bool = False
    """Random horizontal flip of each image."""
    max_pairs: int = 0
    """Use at most this many pairs (0 = all)."""
    empty_prompt_prob: float = 0.0
    """Probability of replacing the caption by "" (the official DPO code uses 0.2)."""
    cache_dir: str = ""
    """Encode VAE latents + text embeddings once to this folder and train from it ("" = no cache)."""
    num_workers: int = 0
    """DataLoader workers."""
    label_scorer: str = ""
    """Relabel every pair with this scorer (diffalign.rewards.SCORERS), scored once ("" = the dataset's labels)."""
    label_mode: str = "argmax"
    """With label_scorer: "argmax" (AI feedback, Diffusion-DPO Sec. 5.4) or "smpo" (smoothed p for SmPO)."""
    score_min: float = 0.0
    """SmPO score normalisation lower bound (score_min == score_max: use the scores' min and max)."""
    score_max: float = 0.0
    """SmPO score normalisation upper bound."""


@dataclass
class ObjectiveConfig:
    name: str = "dpo"
    """Key in diffalign.objectives.OBJECTIVES."""
    beta: float | None = None
    """The paper's beta (Diffusion-DPO: 5000 for SDXL, 2000-5000 for SD1.5); unset = the objective's default."""
    sft_weight: float | None = None
    """Weight of an extra SFT (winner denoising error) term; unset = the objective's default."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further objective-specific keyword arguments."""


@dataclass
class EstimatorConfig:
    timesteps: str = "uniform"
    """Timestep sampling: uniform or logit_normal (flow models)."""
    t_min: int = 0
    """Smallest training timestep index."""
    t_max: int = 0
    """Largest training timestep index + 1 (0 = num_train_timesteps)."""


@dataclass
class TrainConfig:
    output_dir: str = ""
    """Where checkpoints, logs, the final LoRA and the run record go ("" = runs/<objective>-<model>-<time>);
    an existing run folder is only reused with --resume."""
    seed: int = 0
    """Global seed."""
    max_steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Pairs per process per micro-step."""
    grad_accum: int = 1
    """Gradient accumulation micro-steps per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_8bit: bool = False
    """Use bitsandbytes 8-bit AdamW (GPU, extra `bnb`)."""
    lr_schedule: str = "constant_with_warmup"
    """diffusers.optimization schedule name."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    mixed_precision: str = "no"
    """accelerate mixed precision: no, bf16, fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    xformers: bool = False
    """Use xformers attention (GPU only; SDPA is the default)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    log_every: int = 10
    """Log scalars every N steps."""
    validate_every: int = 0
    """Generate validation images every N steps (0 = off)."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts for validation images."""
    tensorboard: bool = True
    """Log to tensorboard under output_dir/logs."""
    wandb: bool = False
    """Also log to Weights & Biases (if installed)."""


@dataclass
class EvalConfig:
    prompts: str = "toy"
    """Held-out prompts for the base-vs-aligned comparison after training: a .txt file (one per line), "toy" for
    the toy world's held-out set, or "" to skip."""
    scorers: list[str] = field(default_factory=lambda: ["toy_aesthetic", "toy_fidelity"])
    """Scorer names (diffalign.rewards.SCORERS); the first is the reward the win rate is reported for."""
    images_per_prompt: int = 2
    """Seeds per prompt (seed = prompt index * images_per_prompt + k, same for base and aligned)."""
    steps: int = 20
    """Sampling steps."""
    guidance: float = 0.0
    """Classifier-free guidance scale (0 = the model family's default: toy 1.5, SD 7.5, SDXL 5.0, SD3 7.0)."""
    max_prompts: int = 0
    """Use at most this many prompts (0 = all)."""


@dataclass
class RunConfig:
    """Everything `diffalign train` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------------------
# Loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one value to the annotated type; raise ConfigError naming `where`."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {typ}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, failing on unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in types_:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, list(types_))}")
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value or {}, path)
        else:
            kwargs[key] = _coerce(value, typ, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply `a.b=value` strings to a nested dict (validated against `cls` afterwards)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node, typ = data, cls
        for i, key in enumerate(keys):
            valid = _field_types(typ) if dataclasses.is_dataclass(typ) else None
            if valid is not None and key not in valid:
                prefix = ".".join(keys[:i])
                name = f"{prefix}.{key}" if prefix else key
                raise ConfigError(f"unknown config key '{name}'{_suggest(key, list(valid))}")
            if i == len(keys) - 1:
                node[key] = yaml.safe_load(raw) if raw != "" else ""
            else:
                node = node.setdefault(key, {})
                typ = valid[key] if valid is not None else None
                if typ is not None and not dataclasses.is_dataclass(typ):
                    raise ConfigError(f"config key '{'.'.join(keys[: i + 1])}' has no sub-keys")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Read an optional YAML file, apply dotted overrides, validate into `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, list(overrides or []), cls)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclass
class GenerateConfig:
    """Everything `diffalign generate` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loras: list[str] = field(default_factory=list)
    """LoRA folders or files, each optionally with a scale: "runs/x/lora:0.8"."""
    fuse: bool = False
    """Fuse the LoRAs into the base weights before sampling (faster; the fused weights are not saved)."""
    prompt: str = ""
    """One prompt (may contain commas)."""
    prompts_file: str = ""
    """A text file with one prompt per line (blank lines skipped)."""
    images_per_prompt: int = 1
    """Images per prompt; seeds are seed, seed+1, ... in prompt order."""
    seed: int = 0
    """First seed."""
    steps: int = 20
    """Sampling steps."""
    guidance: float = 0.0
    """Classifier-free guidance scale (0 = the model family's default: toy 1.5, SD 7.5, SDXL 5.0, SD3 7.0)."""
    height: int = 0
    """Image height in pixels (0 = the model's native size)."""
    width: int = 0
    """Image width in pixels (0 = the model's native size)."""
    batch_size: int = 8
    """Images per sampling batch."""
    output_dir: str = ""
    """Where images, manifest.jsonl and grid.png go ("" = outputs/generate-<time>)."""


@dataclass
class ScoreConfig:
    """Everything `diffalign score` reads."""

    images: str = ""
    """An image folder (with a manifest.jsonl, or with prompt / prompts_file) or a manifest.jsonl file."""
    prompt: str = ""
    """One prompt for every image of a folder without a manifest."""
    prompts_file: str = ""
    """Prompts for a folder without a manifest: one line per image, in sorted file-name order."""
    scorers: list[str] = field(default_factory=list)
    """Scorer names (diffalign.rewards.SCORERS)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of each scorer's `load`, by scorer name: {clip_score: {model: PATH, device: cuda}}."""
    batch_size: int = 32
    """Images per scorer call (set-level scorers such as vendi score each batch as one set)."""
    output_dir: str = ""
    """Where scores.jsonl and summary.json go ("" = runs/score-<time>)."""


@dataclass
class CompareConfig:
    """Everything `diffalign compare` reads."""

    base: str = ""
    """The base model's images: a folder with a manifest.jsonl, or the manifest itself."""
    aligned: str = ""
    """The aligned model's images, same prompts and seeds as `base` (paired by (prompt, seed))."""
    scorers: list[str] = field(default_factory=list)
    """Scorer names (diffalign.rewards.SCORERS)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of each scorer's `load`, by scorer name: {clip_score: {model: PATH, device: cuda}}."""
    batch_size: int = 32
    """Images per scorer call."""
    grid_pairs: int = 8
    """Pairs shown in the side-by-side grid (base row over aligned row)."""
    output_dir: str = ""
    """Where report.json, report.png, pairs.png, pairs.jsonl and report.html go ("" = runs/compare-<time>)."""


@dataclass
class RoundsConfig:
    """The on-policy loop of `diffalign online`: what to sample, how to score and split it, how much to train."""

    output_dir: str = ""
    """Where round logs, grids, checkpoints, the LoRA and the eval go ("" = runs/online-<objective>-<time>)."""
    seed: int = 0
    """Global seed (prompt order, x_T seeds, sampling noise, training noise)."""
    rounds: int = 10
    """Rounds of sample -> score -> pairs -> train."""
    prompts: str = "toy"
    """Training prompts: a .txt file (one per line) or "toy" = the toy world's prompts not in the held-out set."""
    prompts_per_round: int = 16
    """Prompt groups sampled per round (P)."""
    images_per_prompt: int = 2
    """Images per prompt group (G); D3PO's groups share x_T (official: 2 per x_T; 7 for human labels)."""
    shared_noise: bool = True
    """All images of a group start from the same x_T (D3PO); DRAGON groups may use independent x_T."""
    steps: int = 20
    """Sampling steps for the round's demonstrations (may be fewer than eval.steps: DRAGON Fig. 3)."""
    guidance: float = 0.0
    """CFG scale when sampling (and in D3PO's training forward); 0 = the family's default (toy 1.5, SDXL 5.0).
    Official D3PO / SPO: 5.0, DRO buffer: 1.0."""
    eta: float = 1.0
    """DDIM eta of the demonstrations (> 0 needed for D3PO's log-probs)."""
    sample_batch: int = 64
    """Images per sampler call."""
    reward: str = "toy_aesthetic"
    """Scorer (diffalign.rewards.SCORERS) that labels the round; distribution-level ones score the round as a set."""
    reward_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the scorer's `load` (e.g. exemplars: PATH for fd_exemplar / loglik_exemplar)."""
    exemplars: str = ""
    """"toy_vivid": exemplar set of high-saturation toy renders scored with the toy colour-statistics encoder."""
    exemplar_count: int = 256
    """Images in the toy_vivid exemplar set."""
    monitor: list[str] = field(default_factory=lambda: ["toy_fidelity"])
    """Extra scorers logged per round (not trained on): the reward-hacking check."""
    split: str = "all_pairs"
    """Pair / set rule (diffalign.online.pairs): all_pairs (D3PO), best_worst (DRAGON-DPO), top_bottom (DRAGON-KTO)."""
    min_gap: float = 0.0
    """Pairs need a reward gap above this (smaller gaps count as ties and are skipped)."""
    fraction: float = 0.25
    """top_bottom: share of the round that is desirable (and the same share undesirable)."""
    labels_file: str = ""
    """Human pair choices (JSON, see diffalign.online.pairs.pairs_from_labels) instead of the reward; ties skipped."""
    train_steps: int = 4
    """Optimizer steps per round (K)."""
    batch_size: int = 8
    """Pairs (or samples, unpaired) per optimizer step."""
    trajectory_steps: int = 0
    """D3PO / DRO: trajectory steps per optimizer step, gradients accumulated (0 = all, as official D3PO)."""
    lr: float = 3e-4
    """AdamW learning rate of the LoRA."""
    weight_decay: float = 1e-4
    """AdamW weight decay (official D3PO: 1e-4)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    ref_refresh: int = 0
    """Reference model: 0 = the frozen base (adapters off); N = a copy of the policy taken every N rounds."""
    experts: str = "toy"
    """DRO: preference source whose winners are the experts ("toy" = the toy parquet)."""
    max_experts: int = 500
    """DRO: use at most this many experts (official K = 500)."""
    expert_scorer: str = ""
    """DRO: "" = the preferred image of each pair; a scorer name = the max_experts best images of all pairs by it
    (official: top-K Pick-a-Pic images by PickScore or HPSv2)."""
    keep_checkpoints: int = 2
    """Round checkpoints kept."""
    tensorboard: bool = True
    """Log scalars and the round grid to tensorboard under output_dir/logs."""
    grad_accum: int = 1
    """Micro-batches of batch_size per process per optimizer step (each over trajectory_steps steps for D3PO/DRO)."""
    mixed_precision: str = "no"
    """accelerate mixed precision of sampling and training: no, bf16, fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    xformers: bool = False
    """Use xformers attention (GPU only; SDPA is the default)."""


@dataclass
class OnlineConfig:
    """Everything `diffalign online` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(name="d3po"))
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    online: RoundsConfig = field(default_factory=RoundsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ExportConfig:
    """Everything `diffalign export` reads."""

    src: str = ""
    """The LoRA to convert: a diffusers LoRA folder or file (format=kohya) or a kohya .safetensors file
    (format=diffusers)."""
    out: str = ""
    """Where to write it: a .safetensors file (kohya: required), or a folder for format=diffusers."""
    format: str = "kohya"
    """Target format: kohya (lora_unet_*.lora_down/lora_up/alpha keys for kohya tools, A1111, ComfyUI) or diffusers."""
    model: str = ""
    """Base model (folder or hub id) whose UNet config maps SGM block names (input_blocks ..., kohya's SDXL files)
    to diffusers names; only read for format=diffusers, and only needed for such files."""
