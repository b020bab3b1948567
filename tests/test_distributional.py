"""Distribution metrics against closed forms and brute force; exemplar cache; distributional scorers on a tiny CLIP."""

from __future__ import annotations

import math

import pytest
import reward_factory as rf
import torch

from diffalign.rewards import load_scorer
from diffalign.rewards.distributional import (
    cmmd,
    fd_leave_one_out,
    frechet_distance,
    gaussian_log_likelihood,
    gaussian_stats,
    mmd2,
    mmd2_leave_one_out,
    oas_covariance,
    vendi_leave_one_out,
    vendi_score,
)
from diffalign.rewards.embeddings import ClipEncoder, ExemplarSet

# ---- Fréchet distance -------------------------------------------------------------------------------------------


def test_fd_identical_sets_is_zero():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    mu, cov = gaussian_stats(x)
    assert abs(frechet_distance(mu, cov, mu, cov).item()) < 1e-10


def test_fd_isotropic_closed_form():
    """N(0, 1²I) vs N((1,2,0,0,0), 3²I), d=5: ||μ1-μ2||² + d(σ1-σ2)² = 5 + 5·4 = 25."""
    d = 5
    mu2 = torch.tensor([1.0, 2.0, 0, 0, 0])
    fd = frechet_distance(torch.zeros(d), torch.eye(d), mu2, 9 * torch.eye(d))
    assert fd.item() == pytest.approx(25.0, abs=1e-10)


def test_fd_non_commuting_2x2_closed_form():
    """A=[[2,1],[1,2]], B=diag(1,4): for 2x2, tr sqrt(AB) = sqrt(tr AB + 2 sqrt(det A det B)) = sqrt(10 + 2√12);
    FD = tr A + tr B - 2 tr sqrt(AB) = 9 - 2·sqrt(10 + 4√3) ≈ 0.771214."""
    a, b = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.diag(torch.tensor([1.0, 4.0]))
    expected = 9 - 2 * math.sqrt(10 + 4 * math.sqrt(3))
    assert frechet_distance(torch.zeros(2), a, torch.zeros(2), b).item() == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(torch.zeros(2), b, torch.zeros(2), a).item() == pytest.approx(expected, abs=1e-10)


def test_gaussian_stats_matches_torch_cov():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    mu, cov = gaussian_stats(x)
    torch.testing.assert_close(cov, torch.cov(x.double().T))
    torch.testing.assert_close(mu, x.double().mean(0))


def test_fd_leave_one_out_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(7, 4, generator=g), torch.randn(30, 4, generator=g) + 0.5
    mu_r, cov_r = gaussian_stats(ref)
    full = frechet_distance(*gaussian_stats(x), mu_r, cov_r)
    brute = torch.stack(
        [full - frechet_distance(*gaussian_stats(x[torch.arange(7) != i]), mu_r, cov_r) for i in range(7)]
    )
    torch.testing.assert_close(fd_leave_one_out(x, mu_r, cov_r, chunk=3), brute)
    outlier = torch.cat([x, 20 * torch.ones(1, 4)])  # far from the reference: its removal lowers FD the most
    assert fd_leave_one_out(outlier, mu_r, cov_r).argmax().item() == 7


def test_gaussian_log_likelihood_matches_torch_distributions():
    g = torch.Generator().manual_seed(3)
    mu, cov = gaussian_stats(torch.randn(40, 3, generator=g))
    x = torch.randn(5, 3, generator=g)
    ridge = 1e-2
    ridged = cov + ridge * cov.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(mu, ridged).log_prob(x.double())
    torch.testing.assert_close(gaussian_log_likelihood(x, mu, cov, ridge), expected)


# ---- CMMD / MMD -------------------------------------------------------------------------------------------------


def test_mmd2_hand_value():
    """x = y = {0, 1} (1-D), σ = 1, k = e^{-1/2}: unbiased = k + k - 2·(2 + 2k)/4 = k - 1; biased = 0."""
    x = torch.tensor([[0.0], [1.0]])
    assert mmd2(x, x, sigma=1.0).item() == pytest.approx(math.exp(-0.5) - 1, abs=1e-12)
    assert abs(mmd2(x, x, sigma=1.0, unbiased=False).item()) < 1e-12


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_cmmd_zero_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(4)
    centre = torch.randn(16, generator=g)
    sample = lambda shift: _unit(centre + shift + 0.5 * torch.randn(200, 16, generator=g))  # noqa: E731
    base = sample(0.0)
    same = cmmd(base, sample(0.0)).item()
    shifts = [cmmd(base, sample(torch.full((16,), s))).item() for s in (0.1, 0.3, 1.0)]
    assert abs(same) < 0.1 * shifts[0]
    assert shifts[0] < shifts[1] < shifts[2]


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd2_leave_one_out_matches_brute_force(unbiased):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, generator=g), torch.randn(9, 3, generator=g)
    full = mmd2(x, y, 1.5, unbiased)
    brute = torch.stack([full - mmd2(x[torch.arange(6) != i], y, 1.5, unbiased) for i in range(6)])
    torch.testing.assert_close(mmd2_leave_one_out(x, y, 1.5, unbiased), brute)


# ---- Vendi ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1.0, 0.5, 2.0, math.inf])
def test_vendi_identical_and_orthogonal(q):
    k = 5
    assert vendi_score(torch.ones(k, 8) * 3.0, q).item() == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(torch.eye(k, 8) * 2.0, q).item() == pytest.approx(k, abs=1e-9)
    # N = 6 > D = 3 uses the D x D dual: 3 directions, two items each -> eigenvalues 1/3, 1/3, 1/3 -> 3
    assert vendi_score(torch.eye(3).repeat(2, 1), q).item() == pytest.approx(3.0, abs=1e-9)


def test_vendi_two_clusters_hand_value():
    """3 copies of e1 and 1 of e2: K/4 has eigenvalues 3/4, 1/4 -> exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) ≈ 1.7548."""
    x = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert vendi_score(x).item() == pytest.approx(expected, abs=1e-12)
    loo = vendi_leave_one_out(x)
    assert loo[3].item() == pytest.approx(expected - 1.0, abs=1e-12)  # without e2: all identical -> 1
    brute = torch.stack([vendi_score(x) - vendi_score(x[torch.arange(4) != i]) for i in range(4)])
    torch.testing.assert_close(loo, brute)


# ---- exemplar sets and scorers on a tiny CLIP -------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is ~20x faster than two contending ones
    yield rf.build_hf_clip(tmp_path_factory.mktemp("dist_clip"))
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoder(clip_dirs):
    return ClipEncoder.load(str(clip_dirs[0]), str(clip_dirs[1]), batch_size=4)


def test_exemplar_cache_round_trip(encoder, tmp_path, monkeypatch):
    images = rf.colour_images(["red"] * 6, seed=1)
    built = ExemplarSet.build(encoder, images, cache_dir=tmp_path)
    files = list(tmp_path.glob("exemplars-*.safetensors"))
    assert len(files) == 1 and built.key in files[0].name
    assert built.embeddings.shape == (6, 16) and built.cov.shape == (16, 16) and built.mu.dtype == torch.float64

    with monkeypatch.context() as m:
        m.setattr(encoder, "embed_images", lambda *a: pytest.fail("a cache hit must not embed"))
        again = ExemplarSet.build(encoder, images, cache_dir=tmp_path)
    assert again.key == built.key
    for name in ("embeddings", "mu", "cov"):
        torch.testing.assert_close(getattr(again, name), getattr(built, name), rtol=0, atol=0)

    # other content, normalisation or modality -> other key; a file read with the wrong key is refused
    assert ExemplarSet.build(encoder, images[:5]).key != built.key
    assert ExemplarSet.build(encoder, images, normalize=True).key != built.key
    texts = ExemplarSet.build(encoder, [rf.caption("red"), rf.caption("blue")], cache_dir=tmp_path)
    assert texts.embeddings.shape == (2, 16) and texts.key != built.key
    with pytest.raises(ValueError, match="expected"):
        ExemplarSet.load(files[0], key=texts.key)


@pytest.fixture(scope="module")
def exemplar_dir(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("exemplars")
    for i, x in enumerate(rf.colour_images(["red"] * 8, seed=50)):
        Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("name", ["fd_exemplar", "loglik_exemplar", "cmmd_exemplar"])
def test_exemplar_scorers_prefer_the_exemplar_colour(name, clip_dirs, exemplar_dir, tmp_path):
    scorer = load_scorer(name, exemplars=str(exemplar_dir), clip_model=str(clip_dirs[0]), processor=str(clip_dirs[1]),
                         cache_dir=tmp_path)  # fmt: skip
    images = rf.colour_images(["red", "red", "red", "blue", "green"], seed=9)
    r = scorer(images, [""] * 5)
    assert r.shape == (5,) and r.dtype == torch.float32
    assert r[:3].min() > r[3:].max()


@pytest.mark.numerics
def test_loglik_is_per_instance_and_accepts_a_scorers_encoder(encoder, exemplar_dir):
    """Any scorer's encoder (here the tiny CLIP behind clip_score) can embed; loglik ignores the rest of the batch.

    Embeddings of the same image may differ at float32 rounding level with the batch around it (MKL picks kernels
    by shape and CPU), so the check is on the scale of the rewards, not bitwise: the same images agree to 1e-4 of
    the spread of rewards across images, and the ranking is the same.
    """
    with pytest.warns(UserWarning, match="8 exemplars for 16-dimensional"):
        scorer = load_scorer("loglik_exemplar", exemplars=str(exemplar_dir), encoder=encoder)
    images = rf.colour_images(["red", "blue", "green", "yellow"], seed=10)
    alone, batched = scorer(images[:2], None), scorer(images, None)
    spread = batched.std().item()
    assert spread > 0.1
    torch.testing.assert_close(alone, batched[:2], rtol=0, atol=1e-4 * spread)
    torch.testing.assert_close(torch.stack([scorer(images[i : i + 1], None)[0] for i in range(4)]), batched,
                               rtol=0, atol=1e-4 * spread)  # fmt: skip


def test_oas_covariance_by_hand():
    """x = (k, 0) for k = -3..3: S = diag(4, 0) (MLE), D = 2, N = 7, mu = tr S / D = 2,
    tr S² / D² = 16 / 4 = 4, rho = (4 + 4) / (8 · (4 - 4 / 2)) = 0.5, Sigma = 0.5 S + 0.5 · 2 I = diag(3, 1)."""
    x = torch.tensor([[float(k), 0.0] for k in range(-3, 4)])
    cov, rho = oas_covariance(x)
    assert rho == pytest.approx(0.5)
    torch.testing.assert_close(cov, torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
    # enough samples for a well-estimated covariance: little shrinkage
    many = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0])
    assert oas_covariance(many)[1] < 0.01


def test_loglik_is_stable_under_float32_rounding_of_the_embedding():
    """The condition of issue 13: moving embeddings at float32 rounding level (relative 1e-6, ~8 ulps) changes each
    image's reward by much less (< 1e-3) than the spread of rewards across images.

    Embeddings as real ones are: a large common offset, a few directions of real variation, a small noise floor in
    every dimension; 8 exemplars in 64 dimensions. The old estimate (sample covariance + a 1e-4 ridge) divides the
    noise floor by the ridge, so the same rounding moves rewards by more than the bound: that is how a different
    CPU kernel became a 1.3-nat test failure.
    """
    g = torch.Generator().manual_seed(3)
    d, k, floor = 64, 4, 1e-3
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:k]  # (k, D) orthonormal directions of variation
    offset = 10 * torch.randn(d, generator=g) / d**0.5 * 8

    def draw(n):
        return offset + torch.randn(n, k, generator=g) @ basis + floor * torch.randn(n, d, generator=g)  # (n, D)

    exemplars, images = draw(8), draw(64)
    nudged = images * (1 + 1e-6 * torch.randn(images.shape, generator=g))
    mu, sample_cov = gaussian_stats(exemplars)

    def moved_over_spread(cov, ridge):
        r, r2 = gaussian_log_likelihood(images, mu, cov, ridge), gaussian_log_likelihood(nudged, mu, cov, ridge)
        return ((r - r2).abs().max() / r.std()).item()

    assert moved_over_spread(oas_covariance(exemplars)[0], 0.0) < 1e-3
    assert moved_over_spread(sample_cov, 1e-4) > 1e-3  # the old estimate fails the same bound


def test_vendi_scorer_rewards_the_odd_one_out(encoder):
    scorer = load_scorer("vendi", encoder=encoder)
    images = rf.colour_images(["red", "red", "red", "blue"], seed=12)
    r = scorer(images, None)
    assert r.argmax().item() == 3
    assert 1.0 <= scorer.score_set(images) < 4.0
