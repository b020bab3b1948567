"""Wan 2.1 / 2.2 text-to-video: a 3-D DiT (WanTransformer3DModel) on 16-channel video latents, trained by rectified
flow; Wan 2.2 A14B splits the steps between two such experts.

Every Wan quirk lives here (diffusers 0.42 `pipelines/wan/pipeline_wan.py`, cited by line):
- x0 is a *video* latent (N, 16, f, h, w), f = (frames - 1) / 4 + 1 (the VAE compresses time 4x and space 8x:
  `prepare_latents`, l. 341-348); an image is a one-frame video (f = 1), which is how Wan itself trains on images,
  so offline image pairs work unchanged. `num_frames` (pixel frames, 4k + 1; `model.num_frames`) sets the on-line size;
- the VAE (AutoencoderKLWan) has per-channel `latents_mean` / `latents_std` instead of one scaling factor: x0 =
  (z - mean) / std, and decode inverts it (l. 664-672); it is loaded in fp32 like the other families' VAEs;
- prompts: UMT5 last hidden states of up to 512 tokens (`__call__`'s max_sequence_length), the padding positions set
  to zero (`_get_t5_prompt_embeds`, l. 188-191);
- true classifier-free guidance with a negative prompt: the pipeline runs the transformer twice, the negative prompt
  "" unless given (l. 256, 620-638); guidance 5.0 by default;
- prediction_type "flow": the velocity eps - x0 at x_t = (1 - sigma) x0 + sigma eps, the transformer called with
  timestep sigma * 1000 (the scheduler's `timesteps`, l. 613);
- the shift: the folder's scheduler is UniPCMultistepScheduler on flow sigmas with `flow_shift` (3.0 for 480p, 5.0
  for 720p: the WanPipeline docstring); diffalign's training schedule and its on-line sampler are
  FlowMatchEulerDiscreteScheduler with the same shift (the flow SDE sampler needs Euler steps; `generate` keeps the
  pipeline's own UniPC);
- Wan 2.2 A14B: `transformer` (high noise) runs the steps with t >= boundary_ratio * 1000 and `transformer_2` (low
  noise) the rest (l. 586, 597-603); `denoise` and the samplers switch the same way, row by row. A LoRA trains one
  expert (`model.expert: high | low`), as the peers do (Flow-Factory `target_components: transformer |
  transformer_2`; DiffSynth-Studio's `--min/max_timestep_boundary`): that expert is the family's `denoiser` (its
  LoRA, reference and old adapters, checkpoint and file), the other runs frozen on its own steps, and the training
  timesteps are narrowed to the trained expert's range (`expert_timesteps`), so every draw reaches the LoRA. The file
  records the expert (`diffalign_expert`); a low-noise LoRA loads into `transformer_2` (diffusers:
  `load_lora_weights(..., load_into_transformer_2=True)`), and two expert LoRAs load together for generation.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

from diffalign.errors import DiffalignError
from diffalign.likelihood import Schedule
from diffalign.models.base import Family
from diffalign.models.sd import _one_line, check_components

# Self-attention (attn1) and cross-attention (attn2) projections and the feed-forward: Flow-Factory's Wan default
# (src/flow_factory/models/wan/wan2_t2v.py `default_target_modules`).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TARGET_MODULES = [*ATTENTION, "ffn.net.0.proj", "ffn.net.2"]
MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens, WanPipeline.__call__'s default
NATIVE_RESOLUTION = 480  # Wan 2.1 T2V 1.3B: 480p (832 x 480); square here
NUM_FRAMES = 81  # WanPipeline's default: 21 latent frames


def flow_shift(scheduler_config) -> float:
    """The folder's shift: UniPC on flow sigmas keeps it in `flow_shift`, FlowMatchEuler in `shift`."""
    if scheduler_config.get("use_flow_sigmas", False):
        return float(scheduler_config["flow_shift"])
    return float(scheduler_config["shift"])


class WanFamily(Family):
    """Wan 2.1 / 2.2 text-to-video checkpoint (WanPipeline folder or hub id)."""

    max_sequence_length = MAX_SEQUENCE_LENGTH  # model.max_sequence_length overrides it

    name = "wan"
    lora_prefix = "transformer"
    lora_presets = {"attention": ATTENTION, "attention+ffn": LORA_TARGET_MODULES}
    lora_target_modules = LORA_TARGET_MODULES
    prediction_type = "flow"
    lora_writer = WanPipeline
    lora_key_style = "peft"  # WanPipeline.load_lora_weights reads transformer.<module>.lora_A/B
    sdpa_processor = None  # WanAttnProcessor already uses torch SDPA
    components = ["transformer", "scheduler", "vae", "text_encoder", "tokenizer"]

    def __init__(self, pipe: WanPipeline, vae_config: dict, dtype: torch.dtype):
        self.pipe, self.dtype, self.denoiser = pipe, dtype, pipe.transformer
        self.experts = pipe.transformer_2 is not None
        ratio = pipe.config.boundary_ratio
        if self.experts and ratio is None:
            raise ValueError(f"{self.name}: transformer_2 without a boundary_ratio in model_index.json")
        self.boundary = None if ratio is None else float(ratio) * 1000  # scheduler timestep of the switch
        self.vae_scale_factor = int(vae_config["scale_factor_spatial"])
        self.temporal_factor = int(vae_config["scale_factor_temporal"])
        self.latent_channels = int(vae_config["z_dim"])
        self.latents_mean = torch.tensor(vae_config["latents_mean"]).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(vae_config["latents_std"]).view(1, -1, 1, 1, 1)
        self.num_frames = NUM_FRAMES
        # Training schedule: FlowMatchEuler with the folder's shift, never set_timesteps'd
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=flow_shift(pipe.scheduler.config)
        )
        self.schedule = Schedule(self.scheduler, self.prediction_type)
        self.resolution = NATIVE_RESOLUTION

    @classmethod
    def load(cls, path: str, dtype: torch.dtype = torch.float32, load_encoders: bool = True, vae_path=None):
        """Load from a local folder or hub id; load_encoders=False skips the VAE and UMT5 (latent cache)."""
        check_components(path, [c for c in cls.components if load_encoders or c not in ("vae", "text_encoder")])
        source = (
            dict(pretrained_model_name_or_path=vae_path)
            if vae_path
            else dict(pretrained_model_name_or_path=path, subfolder="vae")
        )
        try:  # one line naming the source
            vae_config = dict(AutoencoderKLWan.load_config(**source))
            extra = {"vae": AutoencoderKLWan.from_pretrained(**source, dtype=torch.float32)} if load_encoders else {}
            if not load_encoders:
                extra.update(vae=None, text_encoder=None)
            pipe = WanPipeline.from_pretrained(path, dtype=dtype, **extra)
        except (OSError, ValueError) as err:
            raise OSError(f"{path}: cannot load WanPipeline ({_one_line(err)})") from err
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, vae_config, dtype)

    def check_trainable(self) -> None:
        if self.experts and not self.expert:
            raise DiffalignError(
                f"{self.name}: a Wan 2.2 two-expert folder (transformer + transformer_2): set model.expert=high or "
                "low, the expert the LoRA trains (one at a time, as Flow-Factory)"
            )

    def modules(self) -> dict[str, torch.nn.Module]:
        """{"high": transformer, "low": transformer_2} of a two-expert folder."""
        return {"high": self.pipe.transformer, "low": self.pipe.transformer_2}

    def choose_expert(self, expert: str) -> None:
        if not self.experts:
            raise DiffalignError(f"model.expert={expert}: this Wan folder has one transformer (no transformer_2)")
        self.expert, self.denoiser = expert, self.modules()[expert]

    def expert_timesteps(self) -> tuple[int, int] | None:
        """Training indices whose model timestep (sigma * 1000) is on the trained expert's side of the boundary."""
        if not self.expert:
            return None
        t = torch.arange(self.schedule.num_train_timesteps)
        high = (self.schedule.model_timestep(t) >= self.boundary).nonzero().flatten()  # a contiguous run of t
        lo, hi = int(high.min()), int(high.max()) + 1
        if self.expert == "high":
            return lo, hi
        return (0, lo) if lo > 0 else (hi, self.schedule.num_train_timesteps)

    def denoising_modules(self) -> tuple[torch.nn.Module, ...]:
        return tuple(self.modules().values()) if self.experts else (self.denoiser,)

    def lora_module(self, expert: str) -> torch.nn.Module:
        """A two-expert folder: the expert the file was trained on ("" = high, the `transformer`)."""
        return self.modules()[expert or "high"] if self.experts else self.denoiser

    def set_resolution(self, resolution: int) -> None:
        """The square size of on-line samples (the shift does not depend on it)."""
        self.resolution = int(resolution)

    def flow_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """Euler on the pipeline's flow sigmas with its shift: WanPipeline run with FlowMatchEulerDiscreteScheduler
        (shift = flow_shift) samples on this grid (diffusers' tests/pipelines/wan do the same)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def latent_shape(self, height=None, width=None) -> tuple[int, ...]:
        """(C, f, h, w) of one video of `num_frames` frames at height x width px."""
        frames = (self.num_frames - 1) // self.temporal_factor + 1
        h = (height or self.resolution) // self.vae_scale_factor
        return (self.latent_channels, frames, h, (width or self.resolution) // self.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, 512, D_umt5)} via the pipeline (padding positions zero)."""
        embeds, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.pipe.text_encoder.device,
        )
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(N, 3, H, W) images (one-frame videos) or (N, 3, F, H, W) videos in [-1, 1] -> x0 (N, 16, f, h, w) =
        (z - latents_mean) / latents_std, fp32 (posterior mean)."""
        video = images[:, :, None] if images.ndim == 4 else images  # (N, 3, H, W) -> (N, 3, 1, H, W)
        vae = self.pipe.vae
        parts = []
        for chunk in video.split(batch_size):
            z = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mode().float()
            parts.append((z - self.latents_mean.to(z.device)) / self.latents_std.to(z.device))
        return torch.cat(parts)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """x0 (N, 16, f, h, w) -> videos (N, 3, F, 8h, 8w) in [-1, 1], fp32 (the pipeline's decode, l. 664-672)."""
        vae = self.pipe.vae
        parts = []
        for chunk in x0.split(batch_size):
            z = chunk.float() * self.latents_std.to(chunk.device) + self.latents_mean.to(chunk.device)
            parts.append(vae.decode(z.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1))
        return torch.cat(parts)

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 16, f, h, w), t (N,) (integer training t, or a sampler's sigma * 1000) -> velocity (N, 16, f, h, w).

        Wan 2.2: rows with scheduler timestep >= the boundary go to `transformer`, the others to `transformer_2`."""
        timestep = self.schedule.model_timestep(t).to(xt.device)  # (N,) sigma * 1000
        embeds = cond["prompt_embeds"].to(self.dtype)
        trained = self.denoiser if module is None else module

        def run(net, rows):
            return net(
                hidden_states=xt[rows].to(self.dtype),
                timestep=timestep[rows],
                encoder_hidden_states=embeds[rows],
                return_dict=False,
            )[0]

        if self.boundary is None:
            return run(trained, slice(None))
        nets = {**self.modules(), self.expert or "high": trained}  # the trained expert through `module`
        is_high = timestep >= self.boundary  # (N,) bool
        out = torch.empty(xt.shape, dtype=self.dtype, device=xt.device)
        for net, rows in ((nets["high"], is_high), (nets["low"], ~is_high)):
            if rows.any():
                out[rows] = run(net, rows)
        return out

    @torch.no_grad()
    def sample_latents(self, prompts, seeds, steps: int = 50, guidance: float = 5.0, height=None, width=None):
        """x0 (N, 16, f, h, w) sampled by WanPipeline (its own scheduler and negative prompt ""); one CPU generator
        per video."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if self.pipe.vae is None:
            raise RuntimeError(f"{self.name}: loaded with load_encoders=False, cannot generate")
        return self.pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height or self.resolution,
            width=width or self.resolution,
            num_frames=self.num_frames,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            max_sequence_length=self.max_sequence_length,
            output_type="latent",
        ).frames

    def generate(self, prompts, seeds, steps: int = 50, guidance: float = 5.0, height=None, width=None):
        """-> (N, 3, F, H, W) videos in [0, 1] (the scorers and guards read tensors; diffalign.rewards.frames reduces
        frame scores). Defaults are WanPipeline's (50 steps, CFG 5.0)."""
        return (self.decode(self.sample_latents(prompts, seeds, steps, guidance, height, width)) + 1) / 2
