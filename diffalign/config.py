"""Configs: dataclass schemas + YAML files that hold only non-defaults + dotted ``a.b=value`` overrides.

Each field has a one-line docstring (the help text of `diffalign <command> --help`) and declares what it accepts
next to its default (`Annotated[float, POSITIVE]`, `OneOf(...)`, from diffalign.checks). diffalign.schema loads
and checks them; unknown keys fail loudly with the closest valid key ("did you mean ..."). The objective section's
keys besides `name` are the fields of the chosen objective's dataclass (`objective: {name: smpo, gamma: 10}`),
typed and checked like every other field.

The schemas for the programs (training, generation) live here so the YAML files under configs/ have one home;
library functions never take a config object, only flat typed arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from diffalign import schema
from diffalign.checks import AT_LEAST_1, NON_EMPTY, NON_NEGATIVE, POSITIVE, PROBABILITY, OneOf, Range
from diffalign.confighelp import describe
from diffalign.objectives import OBJECTIVES
from diffalign.rewards import BASE_RELATIVE, SCORERS
from diffalign.sampling import SAMPLERS
from diffalign.schema import ConfigError, apply_overrides, from_dict, save_config, to_dict

__all__ = ["ConfigError", "apply_overrides", "describe", "from_dict", "load_config", "save_config", "to_dict"]

FAMILY_NAMES = (
    "auto",
    "sd",
    "sdxl",
    "sd3",
    "pixart",
    "flux",
    "zimage",
    "qwenimage",
    "flux2",
    "toy",
    "wan",
)  # "auto" + diffalign.models.FAMILIES (a test keeps them equal)
SCORER = OneOf(SCORERS)
# where no base image is at hand (a round's samples, a preference pair, a served request): no BASE_RELATIVE scorer
UNPAIRED_SCORER = OneOf(SCORERS, exclude=BASE_RELATIVE)
# drift next to the reward in a report: a scorer (base-relative or not), the set-level fd / cmmd to the base's own
# images, or "auto": the toy drift scorers on toy-world prompts, else fd, cmmd, saturation, hf_energy (engine/drift.py)
DRIFT = OneOf(SCORERS, extra=("fd", "cmmd", "auto"))
LR_SCHEDULES = OneOf(
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant"
)


# --------------------------------------------------------------------------------------------------------------
# Schemas


@dataclass
class ModelConfig:
    path: str = "toy"
    """Hub id or local diffusers folder; "toy" is the shipped toy model under assets/toy_model, "toy_flow" its
    flow-matching twin under assets/toy_flow_model."""
    family: Annotated[str, OneOf(*FAMILY_NAMES)] = "auto"
    """Model family (sd, sdxl, toy, ...); "auto" reads model_index.json."""
    dtype: Annotated[str, OneOf("float32", "bfloat16", "float16")] = "float32"
    """Weights dtype of the frozen base (float32, bfloat16, float16); LoRA params stay float32."""
    vae_path: str = ""
    """Optional replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)."""
    resolution: Annotated[int, NON_NEGATIVE] = 0
    """Training resolution in pixels, a multiple of the family's latent factor; 0 = the family's native size."""
    quantize: Annotated[str, OneOf("none", "int8", "fp8", "nf4")] = "none"
    """Frozen denoiser quantized under the LoRA: none, int8 (torchao), fp8 (torchao), nf4 (bitsandbytes; CUDA)."""
    max_sequence_length: Annotated[int, NON_NEGATIVE] = 0
    """Text tokens of the prompt encoding (T5 for SD3, FLUX, PixArt; Qwen2.5-VL for Qwen-Image; Qwen3 / Mistral for
    FLUX.2); 0 = the pipeline's default (SD3 256, FLUX, FLUX.2 and Qwen-Image 512, PixArt-Σ 300). Flow-GRPO's SD3
    recipe uses 128; the CLIP-only families refuse it."""
    num_frames: Annotated[int, NON_NEGATIVE] = 0
    """Video families (wan): frames per sampled video, 4k + 1 (5 -> 2 latent frames); 0 = the family's (Wan 81)."""
    expert: Annotated[str, OneOf("high", "low", allow_empty=True)] = ""
    """Wan 2.2 A14B (two experts): the one the LoRA trains, high (`transformer`, the steps with t >= the boundary)
    or low (`transformer_2`); the other runs frozen on its own steps, and training draws t in the chosen expert's
    range only. "" = a one-transformer folder (required there)."""


@dataclass
class LoraConfig:
    rank: Annotated[int, AT_LEAST_1] = 8
    """LoRA rank r."""
    alpha: Annotated[float, POSITIVE] = 8.0
    """LoRA alpha (scale = alpha / rank); saved in the adapter metadata so it survives reloading."""
    preset: Annotated[str, OneOf("attention", "attention+conv", allow_empty=True)] = ""
    """Named target set of the model family: "attention" or "attention+conv" (LoCon: adds the UNet resnet convs,
    UNet families only); "" = the family default (toy: attention+conv; sd, sdxl, sd3, pixart: attention)."""
    target_modules: list[str] = field(default_factory=list)
    """Module name suffixes that get adapters; [] = the preset's (set either this or preset, not both)."""
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
    max_pairs: Annotated[int, NON_NEGATIVE] = 0
    """Use at most this many pairs (0 = all)."""
    empty_prompt_prob: Annotated[float, PROBABILITY] = 0.0
    """Probability of replacing the caption by "" (the official DPO code uses 0.2)."""
    cache_dir: str = ""
    """Encode VAE latents + text embeddings once to this folder and train from it ("" = no cache)."""
    cache_dtype: Annotated[str, OneOf("float32", "bfloat16", "float16", allow_empty=True)] = ""
    """Storage dtype of cached latents and text cond: float32, bfloat16 or float16 ("" = model.dtype)."""
    cache_shard_size: Annotated[int, AT_LEAST_1] = 512
    """Pairs (and unique captions) per cache shard: each process's unit of work, and what a killed build redoes."""
    num_workers: Annotated[int, NON_NEGATIVE] = 0
    """DataLoader workers."""
    label_scorer: Annotated[str, OneOf(SCORERS, exclude=BASE_RELATIVE, allow_empty=True)] = ""
    """Relabel every pair with this scorer (diffalign.rewards.SCORERS), scored once ("" = the dataset's labels)."""
    label_mode: Annotated[str, OneOf("argmax", "smpo")] = "argmax"
    """With label_scorer: "argmax" (AI feedback, Diffusion-DPO Sec. 5.4) or "smpo" (smoothed p for SmPO)."""
    score_min: float = 0.0
    """SmPO score normalisation lower bound (score_min == score_max: use the scores' min and max)."""
    score_max: float = 0.0
    """SmPO score normalisation upper bound."""


@dataclass
class ObjectiveConfig:
    """The objective and its hyper-parameters; the keys besides `name` and `allow_negative_beta` are the fields of
    the chosen objective's dataclass (diffalign/objectives/<name>.py), e.g. `objective: {name: smpo, gamma: 10}`."""

    VARIANTS: ClassVar[dict[str, type]] = OBJECTIVES

    name: Annotated[str, OneOf(OBJECTIVES)] = "dpo"
    """Key in diffalign.objectives.OBJECTIVES; its fields (listed below by name) are the other keys here."""
    allow_negative_beta: bool = False
    """For sign tests only: accept beta < 0 for a KL-strength beta (it trains toward the rejected images)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The chosen objective's keys as set in the YAML or overrides (filled by the loader; not a key itself)."""


@dataclass
class EstimatorConfig:
    timesteps: Annotated[str, OneOf("uniform", "logit_normal")] = "uniform"
    """Timestep sampling: uniform or logit_normal (flow models)."""
    t_min: Annotated[int, NON_NEGATIVE] = 0
    """Smallest training timestep index."""
    t_max: Annotated[int, NON_NEGATIVE] = 0
    """Largest training timestep index + 1 (0 = num_train_timesteps)."""


@dataclass
class OptimConfig:
    """The `train` section's keys both programs share: what the one Run reads (optimizer, schedule, precision, run
    folder, trackers, checkpoints kept, held-out curve)."""

    output_dir: str = ""
    """Where checkpoints, logs, the final LoRA and the run record go ("" = runs/run-<time>, on-line
    runs/online-<objective>-<time>); an existing run folder is only reused with --resume."""
    seed: int = 0
    """Global seed (on-line: prompt order, x_T seeds, sampling noise, training noise)."""
    batch_size: Annotated[int, AT_LEAST_1] = 8
    """Pairs (or samples, unpaired) per process per micro-step."""
    grad_accum: Annotated[int, AT_LEAST_1] = 1
    """Gradient accumulation micro-steps per optimizer step (on-line: each over trajectory_steps steps)."""
    lr: Annotated[float, POSITIVE] = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    """AdamW weight decay."""
    adam_8bit: bool = False
    """Use bitsandbytes 8-bit AdamW (GPU, extra `bnb`)."""
    lr_schedule: Annotated[str, LR_SCHEDULES] = "constant_with_warmup"
    """diffusers.optimization schedule name, over all optimizer steps (on-line: rounds x steps_per_round)."""
    warmup_steps: Annotated[int, NON_NEGATIVE] = 0
    """Linear warmup steps."""
    max_grad_norm: Annotated[float, NON_NEGATIVE] = 1.0
    """Gradient clipping (0 = off)."""
    mixed_precision: Annotated[str, OneOf("no", "bf16", "fp16")] = "no"
    """accelerate mixed precision: no, bf16, fp16 (on-line: of sampling and training)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    xformers: bool = False
    """Use xformers attention (GPU only; SDPA is the default)."""
    compile: Annotated[str, OneOf("none", "blocks", "model")] = "none"
    """torch.compile the denoiser in place (diffalign/engine/compiling.py): none, blocks (each repeated block:
    the shortest compile) or model (the whole forward: the longest compile). The first steps pay for compiling (tens
    of seconds on a CPU, minutes for a big model), the later ones run faster."""
    keep_checkpoints: Annotated[int, AT_LEAST_1] = 2
    """How many checkpoints to keep."""
    validate_every: Annotated[int, NON_NEGATIVE] = 50
    """Every N steps (on-line: rounds), and at 0 (the base), a learning-curve point: the mean of each eval scorer
    on 16 eval prompts with fixed seeds (diffalign/engine/curves.py), drawn in eval/curves.png; 0 = off."""
    tensorboard: bool = True
    """Log to tensorboard under output_dir/logs."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login)."""


@dataclass
class TrainConfig(OptimConfig):
    """`diffalign train`'s optimisation: the shared keys plus the step count and what happens every N steps."""

    max_steps: Annotated[int, AT_LEAST_1] = 300
    """Optimizer steps."""
    checkpoint_every: Annotated[int, NON_NEGATIVE] = 0
    """Save a resumable checkpoint every N steps (0 = none; SIGTERM / SIGINT still save one)."""
    log_every: Annotated[int, AT_LEAST_1] = 10
    """Log scalars every N steps."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts for validation images, every validate_every steps."""


@dataclass
class EvalConfig:
    prompts: str = "toy"
    """Held-out prompts for the base-vs-aligned comparison after training: a .txt file (one per line), "toy" for
    the toy world's held-out set, or "" to skip."""
    scorers: Annotated[list[str], SCORER, NON_EMPTY] = field(default_factory=lambda: ["toy_aesthetic", "toy_fidelity"])
    """Scorer names (diffalign.rewards.SCORERS); the first is the reward the win rate is reported for."""
    images_per_prompt: Annotated[int, AT_LEAST_1] = 2
    """Seeds per prompt (seed = prompt index * images_per_prompt + k, same for base and aligned)."""
    steps: Annotated[int, AT_LEAST_1] = 20
    """Sampling steps."""
    guidance: Annotated[float, NON_NEGATIVE] = 0.0
    """Classifier-free guidance scale (0 = the model family's default: toy 1.5, SD 7.5, SDXL 5.0, SD3 7.0)."""
    max_prompts: Annotated[int, NON_NEGATIVE] = 0
    """Use at most this many prompts (0 = all)."""
    curve_seeds: Annotated[int, AT_LEAST_1] = 1
    """Learning curves (validate_every): seeds per prompt at each point, 16 prompts x this many images."""
    drift: Annotated[list[str], DRIFT] = field(default_factory=lambda: ["auto"])
    """Drift reported next to the reward, aligned vs the base's image on the same prompt and seed: scorers, fd / cmmd
    (the set against the base's own images), or auto: the toy drift scorers on toy prompts, else fd, cmmd,
    saturation, hf_energy; [] = none."""
    drift_encoder: str = "pixels"
    """Embedding of fd / cmmd drift: pixels (8x8 pooled), toy_stats or a CLIP model id/path."""


@dataclass
class MonitorConfig:
    """One guard monitor (a value of `guards.monitors`, keyed by the monitor's name)."""

    kind: Annotated[
        str, OneOf("scorer", "vendi", "fd", "cmmd", "saturation", "hf_energy", "sharpness", "frame_consistency")
    ] = "scorer"
    """scorer (a gold reward), vendi (diversity of same-prompt samples), fd / cmmd (drift to the base model's own
    samples on the same prompts and seeds), saturation, hf_energy (grid artifacts), sharpness (blur),
    frame_consistency (videos: mean embedding change between consecutive frames, with `encoder`)."""
    scorer: Annotated[str, OneOf(SCORERS, allow_empty=True)] = ""
    """kind scorer: the scorer (diffalign.rewards.SCORERS); use one other than the training reward."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """kind scorer: keyword arguments of the scorer's `load`."""
    encoder: str = "pixels"
    """vendi, fd, cmmd: embedding: pixels (8x8 pooled), toy_stats (toy colour statistics) or a CLIP model id/path."""
    rule: Annotated[str, OneOf("max_drop", "max_rise")] = "max_drop"
    """max_drop: trips when base - value > limit; max_rise: trips when value - base > limit."""
    limit: Annotated[float, NON_NEGATIVE] = 0.0
    """The allowed change from the base model's value (a fraction of |base| when relative)."""
    relative: bool = False
    """Read limit as a fraction of the base value's magnitude (0.1 = 10%)."""


@dataclass
class GuardsConfig:
    """Reward-hacking guards (diffalign.guards): monitors on held-out prompts with fixed seeds, each with a rule
    relative to the base model's value; the run stops when one trips and keeps the best passing LoRA."""

    every: Annotated[int, NON_NEGATIVE] = 0
    """Evaluate the monitors every N optimizer steps (train) or rounds (online), and at the end; 0 = off."""
    monitors: dict[str, dict] = field(default_factory=dict)
    """{name: {kind: scorer|vendi|fd|cmmd|saturation|hf_energy|sharpness, rule: max_drop|max_rise, limit, relative,
    scorer (kind scorer), scorer_args, encoder: pixels|toy_stats|CLIP id (vendi, fd, cmmd)}} (MonitorConfig)."""
    prompts: str = "toy"
    """Held-out prompts: a .txt file (one per line) or "toy" = the toy world's held-out set."""
    max_prompts: Annotated[int, AT_LEAST_1] = 8
    """Use the first N prompts."""
    images_per_prompt: Annotated[int, AT_LEAST_1] = 4
    """Fixed seeds per prompt (vendi needs >= 2): seed = seed + prompt index * images_per_prompt + k."""
    seed: int = 12345
    """First seed of the guard images (apart from the training seeds)."""
    steps: Annotated[int, AT_LEAST_1] = 20
    """Sampling steps of the guard images."""
    guidance: Annotated[float, NON_NEGATIVE] = 0.0
    """CFG scale (0 = the family's default)."""
    reward: Annotated[str, OneOf(SCORERS, exclude=BASE_RELATIVE, allow_empty=True)] = ""
    """Scorer that ranks passing evaluations for the kept LoRA ("" = online.reward, or eval.scorers[0] for train)."""
    keep_best: bool = True
    """Save as lora/ the best passing evaluation by the reward (false: the last weights, unless a guard tripped)."""


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
    guards: GuardsConfig = field(default_factory=GuardsConfig)


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
    images_per_prompt: Annotated[int, AT_LEAST_1] = 1
    """Images per prompt; seeds are seed, seed+1, ... in prompt order."""
    seed: int = 0
    """First seed."""
    steps: Annotated[int, AT_LEAST_1] = 20
    """Sampling steps."""
    guidance: Annotated[float, NON_NEGATIVE] = 0.0
    """Classifier-free guidance scale (0 = the model family's default: toy 1.5, SD 7.5, SDXL 5.0, SD3 7.0)."""
    height: Annotated[int, NON_NEGATIVE] = 0
    """Image height in pixels (0 = the model's native size)."""
    width: Annotated[int, NON_NEGATIVE] = 0
    """Image width in pixels (0 = the model's native size)."""
    batch_size: Annotated[int, AT_LEAST_1] = 8
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
    scorers: Annotated[list[str], SCORER] = field(default_factory=list)
    """Scorer names (diffalign.rewards.SCORERS)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of each scorer's `load`, by scorer name: {clip_score: {model: PATH, device: cuda}}."""
    base: str = ""
    """The base model's images on the same prompts and seeds (folder with a manifest.jsonl, or the manifest), paired
    by (prompt, seed): what the base-relative scorers (toy_background_shift, ...) measure against."""
    batch_size: Annotated[int, AT_LEAST_1] = 32
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
    scorers: Annotated[list[str], SCORER] = field(default_factory=list)
    """Scorer names (diffalign.rewards.SCORERS)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of each scorer's `load`, by scorer name: {clip_score: {model: PATH, device: cuda}}."""
    batch_size: Annotated[int, AT_LEAST_1] = 32
    """Images per scorer call."""
    grid_pairs: Annotated[int, AT_LEAST_1] = 8
    """Pairs on the side-by-side sheet (base | aligned): the largest changes of the first scorer, both ways."""
    drift: Annotated[list[str], DRIFT] = field(default_factory=lambda: ["auto"])
    """Drift reported next to the scores, aligned vs the base image of each pair: scorers, fd / cmmd (the set
    against the base's images), or auto: the toy drift scorers on toy prompts, else fd, cmmd, saturation, hf_energy;
    [] = none."""
    drift_encoder: str = "pixels"
    """Embedding of fd / cmmd drift: pixels (8x8 pooled), toy_stats or a CLIP model id/path."""
    output_dir: str = ""
    """Where report.json, report.png, pairs.png, pairs.jsonl and report.html go ("" = runs/compare-<time>)."""


@dataclass
class OnlineTrainConfig(OptimConfig):
    """`diffalign online`'s optimisation: the shared keys (on-line defaults) plus the steps each round trains."""

    lr: Annotated[float, POSITIVE] = 3e-4
    """Peak learning rate (AdamW) of the LoRA."""
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4
    """AdamW weight decay (official D3PO: 1e-4)."""
    lr_schedule: Annotated[str, LR_SCHEDULES] = "constant"
    """diffusers.optimization schedule name, over rounds x steps_per_round optimizer steps."""
    validate_every: Annotated[int, NON_NEGATIVE] = 0
    """Every N rounds, and at round 0 (the base), a learning-curve point: the mean of each eval scorer on 16 eval
    prompts with fixed seeds, drawn in eval/curves.png next to the round reward and loss; 0 = off."""
    steps_per_round: Annotated[int, AT_LEAST_1] = 4
    """Optimizer steps per round (K)."""
    checkpoint_every: Annotated[int, NON_NEGATIVE] = 1
    """Save a resumable checkpoint every N rounds (0 = none; SIGTERM / SIGINT between rounds still save one, and a
    signal mid-round resumes from the last saved round)."""
    grid_every: Annotated[int, NON_NEGATIVE] = 1
    """Write the round's grid (rounds/round-XXXX.png, what a person labels from) and its tensorboard images every N
    rounds (0 = never; the round log is written every round)."""
    trajectory_steps: Annotated[int, NON_NEGATIVE] = 0
    """D3PO / DRO / GRPO: trajectory steps per optimizer step, gradients accumulated (0 = all, as official D3PO)."""


@dataclass
class SamplingConfig:
    """What each on-line round samples, and how."""

    prompts: str = "toy"
    """Training prompts: a .txt file (one per line) or "toy" = the toy world's prompts not in the held-out set."""
    prompts_per_round: Annotated[int, AT_LEAST_1] = 16
    """Prompt groups sampled per round (P)."""
    images_per_prompt: Annotated[int, AT_LEAST_1] = 2
    """Images per prompt group (G); D3PO's groups share x_T (official: 2 per x_T; 7 for human labels). GRPO with G = 1:
    advantages over the round's mean and std (Flow-GRPO's batch normalisation)."""
    shared_noise: bool = True
    """All images of a group start from the same x_T (D3PO); DRAGON groups may use independent x_T."""
    steps: Annotated[int, AT_LEAST_1] = 20
    """Sampling steps for the round's demonstrations (may be fewer than eval.steps: DRAGON Fig. 3)."""
    guidance: Annotated[float, NON_NEGATIVE] = 0.0
    """CFG scale when sampling (and in D3PO's training forward); 0 = the family's default (toy 1.5, SDXL 5.0).
    Official D3PO / SPO: 5.0, DRO buffer: 1.0."""
    eta: Annotated[float, NON_NEGATIVE] = 1.0
    """DDIM eta of the demonstrations, or the noise level a of the flow sampler (Flow-GRPO: 0.7); > 0 needed for
    per-step log-probs (D3PO, GRPO)."""
    sampler: Annotated[str, OneOf(SAMPLERS, allow_empty=True)] = ""
    """On-line sampler (diffalign.sampling): "" = the family's own (ddim for DDPM families, flow_sde for flow ones);
    flow_cps: coefficients-preserving sampling on a flow family (Flow-GRPO's CPS configs: eta 0.8)."""
    sde_window: list[int] = field(default_factory=list)
    """[start, end) steps that get the sampler's noise and are recorded and trained (Flow-GRPO-Fast); outside it the
    deterministic step (flow: the ODE; DDIM: eta 0). [] = every step but the last; end <= 0 counts from the last."""
    sde_window_size: Annotated[int, NON_NEGATIVE] = 0
    """Flow-GRPO-Fast: a noise window of this many steps at a random start each round (keyed on seed and round),
    inside sde_window_range; 0 = the fixed sde_window."""
    sde_window_range: list[int] = field(default_factory=list)
    """[lo, hi): where the random window lies, start drawn from lo..hi - size (Flow-GRPO-Fast: (0, 10) with size 2
    for 10 steps; flux_fast: (0, steps // 2) with size 3). [] = every step but the last."""
    sde_window_shift_every: Annotated[int, NON_NEGATIVE] = 0
    """MixGRPO: the sde_window_size window slides instead of being drawn: it starts at sde_window_range's lo and
    moves sde_window_stride steps every this many rounds up to its hi (their max_timesteps, steps - 2), then back
    to lo (MixGRPO: 25 rounds, stride 1, size 4, range [0, 23] for 25 steps); 0 = Flow-GRPO-Fast's random start."""
    sde_window_stride: Annotated[int, AT_LEAST_1] = 1
    """MixGRPO: steps the sliding window moves at each shift (their prog_overlap_step)."""
    sample_batch: Annotated[int, AT_LEAST_1] = 64
    """Images per sampler call."""


@dataclass
class RewardConfig:
    """How each round is scored, and what is only watched."""

    scorer: Annotated[str, UNPAIRED_SCORER] = "toy_aesthetic"
    """Scorer (diffalign.rewards.SCORERS) that labels the round; distribution-level ones score the round as a set."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the scorer's `load` (e.g. exemplars: PATH for fd_exemplar / loglik_exemplar)."""
    exemplars: str = ""
    """"toy_vivid": exemplar set of high-saturation toy renders scored with the toy colour-statistics encoder."""
    exemplar_count: Annotated[int, AT_LEAST_1] = 256
    """Images in the toy_vivid exemplar set."""
    monitor: Annotated[list[str], UNPAIRED_SCORER] = field(default_factory=lambda: ["toy_fidelity"])
    """Extra scorers logged per round (not trained on): the reward-hacking check."""
    frame_reduce: Annotated[str, OneOf("mean", "min", "last")] = "mean"
    """Videos (wan): each frame is scored as an image and the scores reduce to one per video by mean, min or last."""
    overlap: bool = True
    """Score each sampled chunk (sampling.sample_batch images) while the next is sampled; set-level scorers
    (distributional, multi with normalize) always score the whole round after it."""


@dataclass
class PairingConfig:
    """Which rows a scored round gives: pairs, desirable / undesirable sets, or the chains GRPO trains on."""

    split: Annotated[str, OneOf("all_pairs", "best_worst", "top_bottom")] = "all_pairs"
    """Pair / set rule (diffalign.online.pairing): all_pairs (D3PO), best_worst (DRAGON-DPO), top_bottom (DRAGON-KTO)."""
    min_gap: Annotated[float, NON_NEGATIVE] = 0.0
    """Pairs need a reward gap above this (smaller gaps count as ties and are skipped)."""
    fraction: Annotated[float, Range(gt=0, le=0.5)] = 0.25
    """top_bottom: share of the round that is desirable (and the same share undesirable)."""
    labels_file: str = ""
    """Human pair choices (JSON, see diffalign.online.pairing.pairs_from_labels) instead of the reward; ties skipped."""
    drop_zero_advantages: bool = True
    """GRPO: train only on chains with A != 0, as Flow-GRPO does (false: keep them; with A = 0 only the KL acts)."""


@dataclass
class RoundsConfig:
    """The on-policy loop itself: how many rounds, the reference, the engine's KL, DRO's experts."""

    rounds: Annotated[int, AT_LEAST_1] = 10
    """Rounds of sample -> score -> rows -> train."""
    ref_refresh: Annotated[int, NON_NEGATIVE] = 0
    """Reference model: 0 = the frozen base (adapters off); N = a copy of the policy taken every N rounds."""
    kl_weight: Annotated[float, NON_NEGATIVE] = 0.0
    """Weight of a KL to the reference added to objectives without one of their own (D3PO, DRAGON, DRO), logged as
    train/kl; 0 = off. GRPO (objective.beta) and NFT (objective.kl_weight) have their own and refuse it."""
    experts: str = "toy"
    """DRO: preference source whose winners are the experts ("toy" = the toy parquet)."""
    max_experts: Annotated[int, AT_LEAST_1] = 500
    """DRO: use at most this many experts (official K = 500)."""
    expert_scorer: Annotated[str, OneOf(SCORERS, exclude=BASE_RELATIVE, allow_empty=True)] = ""
    """DRO: "" = the preferred image of each pair; a scorer name = the max_experts best images of all pairs by it
    (official: top-K Pick-a-Pic images by PickScore or HPSv2)."""


# Keys of the one-section on-line config before it was split by concern: an old key is a one-line error naming
# its new place (diffalign.schema reads this table).
MOVED_KEYS = {
    **{f"online.{k}": f"train.{k}" for k in (
        "output_dir", "seed", "batch_size", "grad_accum", "lr", "weight_decay", "adam_8bit", "lr_schedule",
        "warmup_steps", "max_grad_norm", "mixed_precision", "gradient_checkpointing", "xformers", "keep_checkpoints",
        "validate_every", "tensorboard", "wandb", "trajectory_steps",
    )},
    "online.train_steps": "train.steps_per_round",
    **{f"online.{k}": f"sampling.{k}" for k in (
        "prompts", "prompts_per_round", "images_per_prompt", "shared_noise", "steps", "guidance", "eta", "sampler",
        "sde_window", "sde_window_size", "sde_window_range", "sde_window_shift_every", "sde_window_stride",
        "sample_batch",
    )},
    "online.reward": "reward.scorer",
    "online.reward_args": "reward.args",
    **{f"online.{k}": f"reward.{k}" for k in ("exemplars", "exemplar_count", "monitor")},
    **{f"online.{k}": f"pairing.{k}" for k in ("split", "min_gap", "fraction", "labels_file", "drop_zero_advantages")},
}  # fmt: skip


@dataclass
class OnlineConfig:
    """Everything `diffalign online` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(name="d3po"))
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    train: OnlineTrainConfig = field(default_factory=OnlineTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    online: RoundsConfig = field(default_factory=RoundsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)


@dataclass
class ExportConfig:
    """Everything `diffalign export` reads."""

    src: str = ""
    """The LoRA to convert: a diffusers LoRA folder or file (format=kohya) or a kohya .safetensors file
    (format=diffusers)."""
    out: str = ""
    """Where to write it: a .safetensors file (kohya: required), or a folder for format=diffusers."""
    format: Annotated[str, OneOf("kohya", "diffusers")] = "kohya"
    """Target format: kohya (lora_unet_*.lora_down/lora_up/alpha keys for kohya tools, A1111, ComfyUI) or diffusers."""
    model: str = ""
    """Base model (folder or hub id) whose UNet config maps SGM block names (input_blocks ..., kohya's SDXL files)
    to diffusers names; only read for format=diffusers, and only needed for such files."""


@dataclass
class ServeRewardConfig:
    """Everything `diffalign serve-reward` reads."""

    scorer: Annotated[str, UNPAIRED_SCORER] = ""
    """The scorer to serve (diffalign.rewards.SCORERS)."""
    scorer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of its `load` ({model: PATH, device: cuda})."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 = every interface: set a token, DIFFALIGN_REWARD_TOKEN or token_file)."""
    port: Annotated[int, Range(ge=0, le=65535)] = 8765
    """TCP port (0 = any free port, printed at start)."""
    max_images: Annotated[int, AT_LEAST_1] = 256
    """Most images one request may carry."""
    max_request_mb: Annotated[float, POSITIVE] = 512.0
    """Largest request body, in MiB."""
    max_batch: Annotated[int, AT_LEAST_1] = 64
    """Most images of several requests scored in one scorer call (a larger request is scored alone)."""
    max_wait_ms: Annotated[float, NON_NEGATIVE] = 10.0
    """How long the first waiting request waits for others to join its batch, in milliseconds."""
    max_queue: Annotated[int, AT_LEAST_1] = 64
    """Requests that may wait to be scored; more answer 503 with Retry-After."""
    read_timeout: Annotated[float, POSITIVE] = 30.0
    """Seconds a client may take to send a request's headers, and at most between two pieces of its body (408)."""
    token_file: str = ""
    """File holding the token clients must send (Authorization: Bearer); "" = DIFFALIGN_REWARD_TOKEN, if set."""
    shutdown_timeout: Annotated[float, POSITIVE] = 60.0
    """On SIGTERM / Ctrl-C: seconds to finish the requests in flight (new ones are refused) before stopping."""


def load_config(cls: type, path=None, overrides: list[str] | None = None):
    """diffalign.schema.load_config, with the keys that moved (MOVED_KEYS) refused in one line naming their place."""
    return schema.load_config(cls, path, overrides, moved=MOVED_KEYS)
