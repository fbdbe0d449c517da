"""Reconstruction metrics for tokenizers: PSNR, SSIM and the Fréchet distance in a frozen teacher's feature space.

PSNR and SSIM follow scikit-image (``skimage.metrics``; SSIM of Wang et al. 2004 with a 7x7 uniform window) on
images in [-1, 1] (data range 2). "FD-teacher" is the Fréchet distance (Heusel et al. 2017, the FID formula) between
Gaussian fits of the teacher's pooled features of originals and reconstructions: the offline stand-in for rFID. It is
:func:`unirep.metrics.frechet_distance` (eigenvalue-based, never ``scipy.linalg.sqrtm``), re-exported here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from unirep.metrics import frechet_distance

__all__ = ["psnr", "ssim", "frechet_distance"]


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
