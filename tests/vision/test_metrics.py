"""The one Fréchet distance (unirep.metrics, eigh-based) against closed forms, and k-NN precision/recall."""

import math

import pytest
import torch

from unirep.metrics import frechet_distance, knn_precision_recall
from vision.tokenizers import metrics as tok_metrics


def _exact(n, cov, mean, seed):
    """``n`` points whose sample mean and unbiased covariance are exactly ``mean`` and ``cov`` (up to rounding)."""
    g = torch.Generator().manual_seed(seed)
    d = cov.shape[0]
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance exactly I
    return z @ torch.linalg.cholesky(cov).T + mean


def test_diagonal_covariances_closed_form():
    da, db = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, -1.0, 2.0])
    a = _exact(500, torch.diag(da).double(), mu_a.double(), 0)
    b = _exact(700, torch.diag(db).double(), mu_b.double(), 1)
    # |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    expect = float((mu_a - mu_b).square().sum() + (da.sqrt() - db.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_commuting_covariances_closed_form():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))  # shared eigenvectors
    la, lb = torch.tensor([3.0, 1.0, 0.5, 2.0]).double(), torch.tensor([1.0, 1.0, 4.0, 0.1]).double()
    a = _exact(400, q @ torch.diag(la) @ q.T, torch.zeros(4).double(), 2)
    b = _exact(400, q @ torch.diag(lb) @ q.T, torch.ones(4).double(), 3)
    expect = 4.0 + float((la.sqrt() - lb.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)


def test_rank_deficient_sets_stay_finite():
    """n < d: singular covariances, where sqrtm of the product returns complex parts or NaN (LightningDiT reports)."""
    torch.manual_seed(0)
    a, b = torch.randn(10, 64), torch.randn(12, 64) + 0.1
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd >= 0
    assert tok_metrics.frechet_distance is frechet_distance  # the tokenizers use the same one
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a, b[:, :3])


def test_shift_and_scale():
    torch.manual_seed(0)
    a = torch.randn(4000, 3, dtype=torch.float64)
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)) == pytest.approx(5.0, abs=1e-8)
    a = a - a.mean(0)  # zero-mean a vs 2a: tr(S + 4S - 2 * 2S) = tr(S)
    assert frechet_distance(a, 2 * a) == pytest.approx(float(torch.trace(torch.cov(a.T))), rel=1e-6)


def test_knn_precision_recall():
    torch.manual_seed(0)
    real = torch.randn(200, 4)
    p, r = knn_precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    far = real + 100.0
    assert knn_precision_recall(real, far, k=3) == (0.0, 0.0)
    collapsed = real[:1].repeat(50, 1) + 1e-3 * torch.randn(50, 4)  # mode collapse: precise, no recall
    p, r = knn_precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.1
