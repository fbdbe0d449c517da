"""Reconstruction metrics for tokenizers: PSNR, SSIM and the Fréchet distance in a frozen teacher's feature space.

PSNR and SSIM follow scikit-image (``skimage.metrics``; SSIM of Wang et al. 2004 with a 7x7 uniform window) on
images in [-1, 1] (data range 2). "FD-teacher" is the Fréchet distance (Heusel et al. 2017, the FID formula) between
Gaussian fits of the teacher's pooled features of originals and reconstructions: the offline stand-in for rFID.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

__all__ = ["psnr", "ssim", "frechet_distance", "feature_stats"]


def psnr(x_rec: Tensor, x: Tensor, data_range: float = 2.0) -> float:
    """Mean over images of ``10 log10(range^2 / MSE)``; inputs ``[B, C, H, W]``."""
    mse = (x_rec.double() - x.double()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10.0 * torch.log10(data_range**2 / mse)).mean())


def ssim(x_rec: Tensor, x: Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over images (channels averaged), scikit-image's definition."""
    from skimage.metrics import structural_similarity

    a = x_rec.detach().double().cpu().numpy()
    b = x.detach().double().cpu().numpy()
    vals = [structural_similarity(a[i], b[i], data_range=data_range, channel_axis=0) for i in range(a.shape[0])]
    return float(np.mean(vals))


def feature_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of ``[n, d]`` features in float64."""
    f = feats.detach().double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (pytorch-fid's ``calculate_frechet_distance``)."""
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
