"""PixArt-Σ: a DiT (PixArtTransformer2DModel) on SD-style 4-channel VAE latents, conditioned on T5, epsilon prediction.

Every PixArt quirk lives here:
- prompts go through the pipeline's `encode_prompt`: T5 last hidden states (N, 300, 4096) plus their attention mask
  (N, 300), both kept in cond (the transformer's cross-attention masks the padding). clean_caption=False, as the
  official PixArt-Σ training code tokenizes raw captions (diffusers' caption cleaning also needs bs4 + ftfy);
- the transformer predicts learned sigma: out_channels = 2 * in_channels = 8 is [eps; variance]; `denoise` keeps
  the eps half, as the pipeline does before its scheduler step (DPO trains the eps half only);
- the training schedule is DDPM with the folder's betas (linear 1e-4 .. 2e-2, 1000 steps), "leading" spacing;
- diffusers 0.42 gives PixArtTransformer2DModel no PeftAdapterMixin, so this family loads the same weights into
  `PixArtTransformer` = the same class + diffusers' PeftAdapterMixin (add_adapter, disable_adapters,
  load_lora_adapter, set_adapters, fuse_lora), which diffalign.lora uses for every family;
- generation runs PixArtSigmaPipeline with use_resolution_binning=False (the size asked for, as the SD pipelines).

Plain diffusers has no PixArt LoRA loader; a saved LoRA ("transformer."-prefixed keys + adapter config in the
safetensors metadata) loads with peft: `inject_adapter_in_model(LoraConfig(**config), pipe.transformer)` then
`set_peft_model_state_dict(pipe.transformer, weights)` (see tests/test_dit_families.py).
"""

from __future__ import annotations

import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders import PeftAdapterMixin

from diffalign.models.base import Family
from diffalign.models.sd import LORA_TARGET_MODULES, _one_line, check_components, generate_images, load_pipe

MAX_SEQUENCE_LENGTH = 300  # T5 tokens, PixArt-Σ's default (α: 120)
PIPE_KWARGS = dict(clean_caption=False, use_resolution_binning=False)


class PixArtTransformer(PixArtTransformer2DModel, PeftAdapterMixin):
    """PixArtTransformer2DModel with diffusers' LoRA adapter methods; same config, weights and forward."""


class PixArtFamily(Family):
    """PixArt-Σ checkpoint (PixArtSigmaPipeline folder or hub id)."""

    max_sequence_length = MAX_SEQUENCE_LENGTH  # T5 tokens; model.max_sequence_length overrides it

    name = "pixart"
    lora_prefix = "transformer"
    lora_presets = {"attention": LORA_TARGET_MODULES}  # no convolutions in the blocks (only the patch embed)
    lora_target_modules = LORA_TARGET_MODULES  # self- (attn1) and cross-attention (attn2) of every block
    lora_writer = StableDiffusion3Pipeline  # no PixArt LoRA loader: the SD3 writer writes the "transformer." file
    lora_key_style = "peft"
    components = ["transformer", "scheduler", "vae", "text_encoder", "tokenizer"]

    def __init__(self, pipe: PixArtSigmaPipeline, vae_config: dict, dtype: torch.dtype):
        # The folder's DPM-Solver spacing "linspace" only matters to inversion grids (InPO / SmPO), whose
        # DDIMInverseScheduler takes "leading" or "trailing"; "leading" as in the SD folders those methods used.
        self.init_ddpm(pipe, pipe.transformer, vae_config, dtype, timestep_spacing="leading")
        out_channels = self.denoiser.config.out_channels
        if out_channels not in (self.latent_channels, 2 * self.latent_channels):
            raise ValueError(
                f"{self.name}: transformer out_channels {out_channels} for {self.latent_channels} latents"
            )
        self.learned_sigma = out_channels == 2 * self.latent_channels

    @classmethod
    def load(cls, path: str, dtype: torch.dtype = torch.float32, load_encoders: bool = True, vae_path=None):
        """Load from a local folder or hub id; load_encoders=False skips the VAE and the T5 encoder."""
        check_components(path, ["transformer"])
        try:
            transformer = PixArtTransformer.from_pretrained(path, subfolder="transformer", dtype=dtype)
        except (OSError, ValueError) as err:
            raise OSError(f"{path}: cannot load the PixArt transformer ({_one_line(err)})") from err
        pipe, vae_config = load_pipe(
            PixArtSigmaPipeline, path, cls.components, dtype, load_encoders, vae_path, transformer=transformer
        )
        return cls(pipe, vae_config, dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """list[str] (N) -> {"prompt_embeds": (N, 300, D), "prompt_attention_mask": (N, 300) long}, via the pipeline."""
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.pipe.text_encoder.device,
            clean_caption=PIPE_KWARGS["clean_caption"],
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """xt (N, 4, h, w), t (N,) -> eps prediction (N, 4, h, w); "size_info" is ignored."""
        pred = (self.denoiser if module is None else module)(
            xt.to(self.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(self.dtype),
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},  # as PixArtSigmaPipeline
            return_dict=False,
        )[0]
        if self.learned_sigma:
            pred = pred.chunk(2, dim=1)[0]  # (N, 2C, h, w) -> (N, C, h, w): eps, dropping the variance half
        return pred

    def generate(self, prompts, seeds, steps: int = 20, guidance: float = 4.5, height=None, width=None):
        """-> list[PIL.Image], one per prompt; the pipeline runs the same transformer, so attached LoRAs are active.
        Defaults are the PixArt-Σ pipeline's (20 DPM-Solver steps, CFG 4.5)."""
        return generate_images(
            self, prompts, seeds, steps, guidance, height, width, max_sequence_length=self.max_sequence_length,
            **PIPE_KWARGS,
        )  # fmt: skip
