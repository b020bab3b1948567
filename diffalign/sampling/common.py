"""What every on-line sampler shares: initial noise per seed, classifier-free guidance on any family, the noise
window's indices and the `Trajectory` a sampler returns (latents, timesteps, per-step log-probs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def resolve_window(window, steps: int) -> tuple[int, int]:
    """A noise window [start, end) of `steps` steps as indices; end <= 0 counts from the last step."""
    start, end = window
    return start, end if end > 0 else steps + end


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU generator per image so image i depends only on seeds[i]: -> (N, *shape) fp32 on CPU.

    Repeating a seed gives several images the same x_T (D3PO pairs, DRAGON groups)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def concat_cond(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack two conditioning dicts along the batch: each (N, ...) -> (2N, ...)."""
    if a.keys() != b.keys():
        raise ValueError(f"conditioning keys differ: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in a}


def encode_guided(family, prompts: list[str], guidance: float) -> dict[str, torch.Tensor]:
    """cond (N, ...), or [cond; uncond] (2N, ...) when guidance > 1 (the "" prompt is the unconditional one)."""
    cond = family.encode_prompts(list(prompts))
    if guidance > 1.0:
        cond = concat_cond(cond, family.encode_prompts([""] * len(prompts)))
    return cond


@dataclass
class EncodedPrompts:
    """A round's prompts encoded once: each distinct prompt's conditioning (U, ...) and, for CFG, the "" prompt's
    (1, ...), on the text encoder's device; the training steps select rows instead of running the text encoders
    again (Flow-GRPO keeps the embeddings it sampled with and encodes the negative prompt once per run, as
    `family.encode_empty` does)."""

    cond: dict[str, torch.Tensor]  # (U, ...) one row per distinct prompt
    index: torch.Tensor  # (N,) chain -> its row of cond
    uncond: dict[str, torch.Tensor] | None  # (1, ...) the "" prompt; None without CFG

    @classmethod
    @torch.no_grad()
    def encode(cls, family, prompts: list[str], with_uncond: bool) -> EncodedPrompts:
        distinct = list(dict.fromkeys(prompts))
        row = {p: i for i, p in enumerate(distinct)}
        uncond = family.encode_empty() if with_uncond else None
        index = torch.tensor([row[p] for p in prompts])
        return cls(family.encode_prompts(distinct), index, uncond)

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning of chains idx (B,): each (B, ...), as `family.encode_prompts` of their prompts gives."""
        at = self.index[idx.cpu()]
        return {k: v[at.to(v.device)] for k, v in self.cond.items()}

    def guided(self, idx: torch.Tensor, guidance: float) -> dict[str, torch.Tensor]:
        """cond (B, ...), or [cond; uncond] (2B, ...) when guidance > 1: what `encode_guided` gives."""
        cond = self.rows(idx)
        if guidance <= 1.0:
            return cond
        if self.uncond is None:
            raise ValueError("EncodedPrompts.guided: encoded without the unconditional prompt (with_uncond=False)")
        return concat_cond(cond, {k: v.expand(len(idx), *v.shape[1:]) for k, v in self.uncond.items()})


def guided_prediction(family, xt: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float) -> torch.Tensor:
    """CFG model prediction (fp32): pred = uncond + w (cond - uncond); w <= 1 is the plain conditional model.

    xt (N, C, h, w); t scalar or (N,); cond from `encode_guided` ((2N, ...) when w > 1). Differentiable.
    """
    n = xt.shape[0]
    use_cfg = guidance > 1.0
    x = torch.cat([xt, xt]) if use_cfg else xt  # (2N or N, C, h, w)
    t_batch = torch.as_tensor(t, device=xt.device).expand(x.shape[0])  # (2N or N,)
    # family.dtype, the frozen weights' dtype: diffusers' `denoiser.dtype` walks every module per call (with the LoRA
    # layers, ~8 ms on the tiny SD3, once per sampling step and per training forward)
    pred = family.denoise(x.to(family.dtype), t_batch, cond).float()
    if not use_cfg:
        return pred
    pred_cond, pred_uncond = pred[:n], pred[n:]  # (2N, ...) -> 2 x (N, ...)
    return family.cfg(pred_cond, pred_uncond, guidance)  # uncond + w (cond - uncond); Qwen-Image rescales it


@dataclass
class Trajectory:
    """A batch of sampled denoising chains, kept on CPU in fp32.

    latents[k] is the input x_t of step k and latents[k + 1] its output x_{t-1}: latents[0] = x_T, latents[-1] = x0.
    """

    latents: torch.Tensor  # (S+1, N, C, h, w)
    timesteps: torch.Tensor  # (S,) t of step k: long (DDIM), or float sigma * T (flow sampler)
    log_probs: torch.Tensor | None  # (S, N) log p(latents[k+1] | latents[k]); None when eta == 0
    eta: float  # DDIM eta, or the flow sampler's noise level a
    guidance: float
    predictions: torch.Tensor | None = None  # (S, N, C, h, w) the (guided) model prediction at step k, if kept
    final: torch.Tensor | None = None  # (N, C, h, w) x0 when the recorded steps stop before it (an SDE window)

    @property
    def x0(self) -> torch.Tensor:
        return self.latents[-1] if self.final is None else self.final

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def select(self, idx: torch.Tensor) -> Trajectory:
        """The chains `idx` (M,) of the batch."""
        lp = None if self.log_probs is None else self.log_probs[:, idx]
        preds = None if self.predictions is None else self.predictions[:, idx]
        final = None if self.final is None else self.final[idx]
        return Trajectory(self.latents[:, idx], self.timesteps, lp, self.eta, self.guidance, preds, final)

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        """Concatenate batches of chains sampled with the same settings along N."""
        first = parts[0]
        lps = None if first.log_probs is None else torch.cat([p.log_probs for p in parts], 1)
        preds = None if first.predictions is None else torch.cat([p.predictions for p in parts], 1)
        latents = torch.cat([p.latents for p in parts], 1)  # (S+1, N_i, ...) -> (S+1, N, ...)
        final = None if first.final is None else torch.cat([p.final for p in parts])
        return Trajectory(latents, first.timesteps, lps, first.eta, first.guidance, preds, final)
