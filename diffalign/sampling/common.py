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


def guided_prediction(family, xt: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float) -> torch.Tensor:
    """CFG model prediction (fp32): pred = uncond + w (cond - uncond); w <= 1 is the plain conditional model.

    xt (N, C, h, w); t scalar or (N,); cond from `encode_guided` ((2N, ...) when w > 1). Differentiable.
    """
    n = xt.shape[0]
    use_cfg = guidance > 1.0
    x = torch.cat([xt, xt]) if use_cfg else xt  # (2N or N, C, h, w)
    t_batch = torch.as_tensor(t, device=xt.device).expand(x.shape[0])  # (2N or N,)
    pred = family.denoise(x.to(family.denoiser.dtype), t_batch, cond).float()
    if not use_cfg:
        return pred
    pred_cond, pred_uncond = pred[:n], pred[n:]  # (2N, ...) -> 2 x (N, ...)
    return pred_uncond + guidance * (pred_cond - pred_uncond)


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
