"""Distribution metrics on embeddings, as functions of tensors: Fréchet distance, Gaussian log-likelihood, CMMD,
Vendi, and per-sample (leave-one-out) contributions to each, which make set metrics usable as per-sample rewards
(DRAGON, Bai et al. 2025, arXiv 2504.15217). Embeddings are (N, D); all maths runs in float64.

Below the maths: the registered scorers that apply it to (images, prompts) against an `ExemplarSet`
(embeddings.py), whose statistics are computed once and cached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.rewards.embeddings import (  # noqa: F401  (gaussian_stats: the FD's statistics, kept importable here)
    ClipEncoder,
    ExemplarSet,
    OpenClipEncoder,
    gaussian_stats,
    read_exemplars,
)
from diffalign.rewards.preprocess import Images


def _sym_sqrt(a: torch.Tensor) -> torch.Tensor:
    """Square root of symmetric PSD (..., D, D) by eigen-decomposition; negative round-off eigenvalues -> 0."""
    evals, evecs = torch.linalg.eigh((a + a.mT) / 2)
    return (evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)) @ evecs.mT


def trace_sqrt_product(cov1: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """tr sqrt(cov1 · cov2) for PSD covs (..., D, D) -> (...).

    cov1·cov2 is not symmetric, but it is similar to the symmetric PSD s·cov2·s with s = sqrt(cov1), so its
    eigenvalues are real and >= 0: tr sqrt(cov1 cov2) = Σ sqrt(eig(s cov2 s)). Only `eigh` of symmetric
    matrices, no complex `sqrtm` (scipy's sqrtm returns small imaginary parts that FID code has to drop).
    """
    s = _sym_sqrt(cov1.double())
    m = s @ cov2.double() @ s
    return torch.linalg.eigvalsh((m + m.mT) / 2).clamp(min=0).sqrt().sum(-1)  # (..., D) -> (...)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """FD between N(mu1, cov1) and N(mu2, cov2): ||mu1 - mu2||² + tr cov1 + tr cov2 - 2 tr sqrt(cov1 cov2).

    Batched over leading dims of mu1 (..., D) / cov1 (..., D, D); returns (...).
    """
    mu1, mu2, cov1, cov2 = mu1.double(), mu2.double(), cov1.double(), cov2.double()
    tr = cov1.diagonal(dim1=-2, dim2=-1).sum(-1) + cov2.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (mu1 - mu2).square().sum(-1) + tr - 2 * trace_sqrt_product(cov2, cov1)


def fd_leave_one_out(x: torch.Tensor, mu_ref: torch.Tensor, cov_ref: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Per-sample contribution to the FD of set x against (mu_ref, cov_ref): FD(x) - FD(x without sample i).

    Positive = sample i pulls the set away from the reference. Leave-one-out statistics by rank-1 downdate:
    with d_i = x_i - mu, mu_{-i} = mu - d_i/(N-1) and scatter_{-i} = scatter - N/(N-1) d_i d_iᵀ.

    Args:
        x: (N, D), N >= 3.
    Returns:
        (N,) float64.
    """
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"leave-one-out FD needs at least 3 samples, got {n}")
    mu, cov = gaussian_stats(x)
    d = x.double() - mu  # (N, D)
    full = frechet_distance(mu, cov, mu_ref, cov_ref)
    mu_loo = mu - d / (n - 1)  # (N, D)
    out = []
    s = _sym_sqrt(cov_ref.double())  # sqrt of the reference once; FD's trace term is symmetric in its arguments
    tr_ref = cov_ref.double().diagonal().sum()
    for i in range(0, n, chunk):
        di = d[i : i + chunk]  # (c, D)
        cov_loo = ((n - 1) * cov - n / (n - 1) * di[:, :, None] * di[:, None, :]) / (n - 2)  # (c, D, D)
        m = s @ cov_loo @ s
        tr_sqrt = torch.linalg.eigvalsh((m + m.mT) / 2).clamp(min=0).sqrt().sum(-1)  # (c, D) -> (c,)
        tr = cov_loo.diagonal(dim1=-2, dim2=-1).sum(-1) + tr_ref
        out.append((mu_loo[i : i + chunk] - mu_ref.double()).square().sum(-1) + tr - 2 * tr_sqrt)
    return full - torch.cat(out)


def oas_covariance(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Oracle-Approximating Shrinkage covariance of (N, D) samples -> ((D, D) float64, shrinkage rho in [0, 1]).

    Sigma = (1 - rho) S + rho (tr S / D) I, with S the maximum-likelihood covariance (1/N) and
    rho = min(1, (tr S² + tr² S) / ((N + 1)(tr S² - tr² S / D)))       (Chen, Wiesel, Eldar & Hero 2010,
    "Shrinkage algorithms for MMSE covariance estimation", IEEE TSP 58(10), eq. 23; as sklearn.covariance.oas).

    Why: an exemplar set usually has fewer images than embedding dimensions (8 in the tests, 256 toy renders vs
    768-d CLIP), so S is singular. A tiny ridge leaves directions with near-zero variance, in which a float32
    rounding change of an embedding (a different MKL/oneDNN kernel, a different batch around the image) moves the
    log-likelihood by whole nats. OAS picks the shrinkage from the data, is defined for N < D, and bounds the
    condition number of Sigma, so the likelihood becomes a smooth function of the embedding.
    """
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    xc = x.double() - x.double().mean(0)
    s = xc.T @ xc / n  # (D, N) @ (N, D) -> (D, D), MLE
    mu = s.diagonal().mean()  # tr S / D
    alpha = s.square().mean()  # tr S² / D²
    den = (n + 1) * (alpha - mu.square() / d)
    rho = 1.0 if den <= 0 else min(float((alpha + mu.square()) / den), 1.0)
    return (1 - rho) * s + rho * mu * torch.eye(d, dtype=s.dtype, device=s.device), rho


def gaussian_log_likelihood(x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """log N(x_i; mu, cov + ridge · (tr cov / D) · I) per row: (N, D) -> (N,) float64.

    The ridge is relative to the mean variance, so it means the same for any embedding scale. It only keeps the
    Cholesky factorisation safe; pass a well-conditioned `cov` (`oas_covariance`) when cov comes from fewer
    samples than dimensions.
    """
    d = x.shape[-1]
    cov = cov.double()
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype, device=cov.device)
    chol = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(chol, (x.double() - mu.double()).T, upper=False)  # (D, N)
    logdet = 2 * chol.diagonal().log().sum()
    return -0.5 * (z.square().sum(0) + logdet + d * math.log(2 * math.pi))


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-||a_i - b_j||² / (2 sigma²)): (N, D), (M, D) -> (N, M) float64."""
    a, b = a.double(), b.double()
    sq = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T  # (N, M)
    return torch.exp(-sq.clamp(min=0) / (2 * sigma**2))


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float = 10.0, unbiased: bool = True) -> torch.Tensor:
    """Squared MMD with a Gaussian RBF kernel between samples x (N, D) and y (M, D) -> scalar.

    unbiased: drop the diagonals of k(x, x) and k(y, y) (Gretton et al. 2012, eq. 3); False gives the biased
    V-statistic (eq. 5) that the google-research CMMD code computes.
    """
    kxx, kyy, kxy = rbf_kernel(x, x, sigma), rbf_kernel(y, y, sigma), rbf_kernel(x, y, sigma)
    return _self_term(kxx, unbiased) + _self_term(kyy, unbiased) - 2 * kxy.mean()


def _self_term(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1)) if unbiased else k.mean()


def cmmd(
    x: torch.Tensor, y: torch.Tensor, sigma: float = 10.0, scale: float = 1000.0, unbiased: bool = True
) -> torch.Tensor:
    """CMMD (Jayasumana et al. 2024, arXiv 2401.09603): scale · MMD² with RBF σ = 10 on L2-normalised CLIP
    embeddings (the paper uses ViT-L/14@336). Normalise x and y before calling. The paper describes the unbiased
    estimator; its released code (and the 0.696 SDXL number) uses the biased one: pass unbiased=False to match."""
    return scale * mmd2(x, y, sigma, unbiased)


def mmd2_leave_one_out(x: torch.Tensor, y: torch.Tensor, sigma: float = 10.0, unbiased: bool = True) -> torch.Tensor:
    """Per-sample contribution MMD²(x, y) - MMD²(x without x_i, y): (N, D), (M, D) -> (N,), N >= 3.

    Closed form from kernel sums: removing x_i removes row and column i of k(x, x) and row i of k(x, y).
    """
    n, m = x.shape[0], y.shape[0]
    if n < 3:
        raise ValueError(f"leave-one-out MMD needs at least 3 samples, got {n}")
    kxx, kxy = rbf_kernel(x, x, sigma), rbf_kernel(x, y, sigma)  # (N, N), (N, M)
    yy = _self_term(rbf_kernel(y, y, sigma), unbiased)
    full = _self_term(kxx, unbiased) + yy - 2 * kxy.mean()
    diag, rows = kxx.diagonal(), kxx.sum(1)  # (N,), (N,)
    if unbiased:
        xx_loo = (kxx.sum() - diag.sum() - 2 * (rows - diag)) / ((n - 1) * (n - 2))
    else:
        xx_loo = (kxx.sum() - 2 * rows + diag) / (n - 1) ** 2
    xy_loo = (kxy.sum() - kxy.sum(1)) / ((n - 1) * m)
    return full - (xx_loo + yy - 2 * xy_loo)


def _vendi_from_eigenvalues(evals: torch.Tensor, q: float) -> torch.Tensor:
    """Hill number of order q of the eigenvalue distribution (..., n) -> (...); eigenvalues sum to 1."""
    p = evals.clamp(min=0)
    p = torch.where(p > 1e-12, p, torch.zeros_like(p))  # round-off eigenvalues would count as species for q < 1
    if q == 1.0:
        return torch.exp(-(torch.xlogy(p, p)).sum(-1))
    if math.isinf(q):
        return 1.0 / p.amax(-1)
    return p.pow(q).where(p > 0, torch.zeros_like(p)).sum(-1).pow(1.0 / (1.0 - q))


def vendi_score(x: torch.Tensor, q: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """Vendi score (Friedman & Dieng 2023, arXiv 2210.02410) with the cosine kernel: exp of the order-q entropy of
    the eigenvalues of K / N, K = X̂ X̂ᵀ (X̂ rows L2-normalised unless `normalize=False`). (N, D) -> scalar.

    1 for N identical items, N for N orthogonal ones. When D < N the eigenvalues come from the D x D matrix
    X̂ᵀ X̂ / N (same non-zero spectrum; the repo's `score_dual`).
    """
    x = x.double()
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    gram = x @ x.T if n <= x.shape[1] else x.T @ x  # (N, N) or (D, D)
    return _vendi_from_eigenvalues(torch.linalg.eigvalsh(gram / n), q)


def vendi_leave_one_out(x: torch.Tensor, q: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """Per-sample contribution Vendi(x) - Vendi(x without x_i): (N, D) -> (N,); positive = x_i adds diversity."""
    x = x.double()
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out Vendi needs at least 2 samples, got {n}")
    k = x @ x.T  # (N, N)
    keep = ~torch.eye(n, dtype=torch.bool, device=x.device)  # row i: every index but i
    idx = torch.arange(n, device=x.device).expand(n, n)[keep].view(n, n - 1)  # (N, N-1)
    k_loo = k[idx[:, :, None], idx[:, None, :]]  # (N, N-1, N-1)
    loo = _vendi_from_eigenvalues(torch.linalg.eigvalsh(k_loo / (n - 1)), q)  # (N,)
    return vendi_score(x, q, normalize=False) - loo


# ---- scorers: per-sample rewards for a batch of images against an exemplar set (prompts are not used) ----------
# Set-level rewards (fd_exemplar, cmmd_exemplar, vendi) depend on the batch they are scored in, by definition;
# loglik_exemplar is per-instance. Typical values depend on the exemplar set and encoder, so peers.md gives no SDXL
# range (the one published anchor: CMMD of SDXL vs COCO-30k = 0.696, biased estimator, ViT-L/14@336). Weights are
# the encoder's: `openai/clip-vit-large-patch14(-336)` by default, or any scorer's `encoder`.


Encoder = ClipEncoder | OpenClipEncoder
Exemplars = str | Path | Images | Sequence[str]


def _encoder(encoder: Encoder | None, clip_model: str, processor: str | None, device, dtype, batch_size) -> Encoder:
    """The given encoder (e.g. `some_scorer.encoder`), else a transformers CLIP."""
    return encoder if encoder is not None else ClipEncoder.load(clip_model, processor, device, dtype, batch_size)


def _exemplar_set(encoder: Encoder, exemplars: Exemplars, normalize: bool, cache_dir) -> ExemplarSet:
    items = read_exemplars(exemplars) if isinstance(exemplars, str | Path) else exemplars
    return ExemplarSet.build(encoder, items, normalize, cache_dir).to(encoder.device)


def _embed(encoder: Encoder, images: Images, normalize: bool) -> torch.Tensor:
    emb = encoder.embed_images(images)  # (N, D)
    return emb / emb.norm(dim=-1, keepdim=True) if normalize else emb


@dataclass
class FDExemplar:
    """Reward_i = -(FD(X) - FD(X without i)) against the exemplar Gaussian: > 0 when image i brings the batch's
    Gaussian fit closer to the exemplars'. Units: FD on the encoder's raw (or normalised) embeddings. N >= 3."""

    encoder: Encoder
    exemplars: ExemplarSet
    normalize: bool = False

    @classmethod
    def load(
        cls,
        exemplars: Exemplars,
        clip_model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        encoder: Encoder | None = None,
        normalize: bool = False,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> FDExemplar:
        """`exemplars`: image folder, .txt of texts, or a list; `encoder` replaces `clip_model` / `processor`."""
        enc = _encoder(encoder, clip_model, processor, device, dtype, batch_size)
        return cls(enc, _exemplar_set(enc, exemplars, normalize, cache_dir), normalize)

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        emb = _embed(self.encoder, images, self.normalize)
        return -fd_leave_one_out(emb, self.exemplars.mu, self.exemplars.cov).float()  # (N,)


@dataclass
class LoglikExemplar:
    """Reward_i = log N(e_i; mu_ex, Sigma_ex) in nats, per image, independent of the rest of the batch.

    Sigma_ex is the Oracle-Approximating Shrinkage covariance of the exemplar embeddings (`oas_covariance`), so the
    reward is well-conditioned with fewer exemplars than dimensions: an embedding moved at float32 rounding level
    changes it by far less than rewards differ across images. With fewer exemplars than dimensions, `load` warns.
    """

    encoder: Encoder
    exemplars: ExemplarSet
    normalize: bool = False
    cov: torch.Tensor | None = None
    """(D, D) float64 shrunk covariance of the exemplars; None = computed from `exemplars.embeddings`."""
    shrinkage: float = 0.0
    """The OAS rho that produced `cov` (reported, not an input)."""

    def __post_init__(self):
        if self.cov is None:
            self.cov, self.shrinkage = oas_covariance(self.exemplars.embeddings)

    @classmethod
    def load(
        cls,
        exemplars: Exemplars,
        clip_model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        encoder: Encoder | None = None,
        normalize: bool = False,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> LoglikExemplar:
        enc = _encoder(encoder, clip_model, processor, device, dtype, batch_size)
        ex = _exemplar_set(enc, exemplars, normalize, cache_dir)
        m, d = ex.embeddings.shape
        if m <= d:
            warnings.warn(
                f"loglik_exemplar: {m} exemplars for {d}-dimensional embeddings; the covariance is shrunk toward "
                "a scaled identity (OAS), so the reward is mostly a scaled distance to the exemplar mean",
                stacklevel=2,
            )
        return cls(enc, ex, normalize)

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        emb = _embed(self.encoder, images, self.normalize)
        return gaussian_log_likelihood(emb, self.exemplars.mu, self.cov, ridge=0.0).float()  # (N,)


@dataclass
class CMMDExemplar:
    """Reward_i = -scale · (MMD²(X, ex) - MMD²(X without i, ex)) on normalised embeddings (CMMD units, ×1000).
    Default encoder is the paper's `openai/clip-vit-large-patch14-336`. N >= 3."""

    encoder: Encoder
    exemplars: ExemplarSet
    sigma: float = 10.0
    scale: float = 1000.0
    unbiased: bool = True

    @classmethod
    def load(
        cls,
        exemplars: Exemplars,
        clip_model: str = "openai/clip-vit-large-patch14-336",
        processor: str | None = None,
        encoder: Encoder | None = None,
        sigma: float = 10.0,
        scale: float = 1000.0,
        unbiased: bool = True,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> CMMDExemplar:
        enc = _encoder(encoder, clip_model, processor, device, dtype, batch_size)
        return cls(enc, _exemplar_set(enc, exemplars, True, cache_dir), sigma, scale, unbiased)

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        emb = _embed(self.encoder, images, True)
        loo = mmd2_leave_one_out(emb, self.exemplars.embeddings, self.sigma, self.unbiased)  # (N,)
        return -(self.scale * loo).float()


@dataclass
class Vendi:
    """Reward_i = Vendi(X) - Vendi(X without i), cosine kernel on image embeddings: > 0 when image i adds
    diversity to its batch. `score_set` gives the Vendi score of a whole set (1 ... N). No exemplars."""

    encoder: Encoder
    q: float = 1.0

    @classmethod
    def load(
        cls,
        clip_model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        encoder: Encoder | None = None,
        q: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> Vendi:
        return cls(_encoder(encoder, clip_model, processor, device, dtype, batch_size), q)

    @torch.no_grad()
    def __call__(self, images: Images, prompts: Sequence[str] | None = None) -> torch.Tensor:
        return vendi_leave_one_out(self.encoder.embed_images(images), self.q).float()  # (N,)

    @torch.no_grad()
    def score_set(self, images: Images) -> float:
        return float(vendi_score(self.encoder.embed_images(images), self.q))
