"""Priors for conformer flows: isotropic Gaussian with zero centre of mass, and ET-Flow's harmonic prior.

The harmonic prior (Jing et al. 2023, EigenFold; used for conformers by ET-Flow, Hassan et al. 2024,
``shenoynikhil/ETFlow``) draws coordinates from ``p(x) ∝ exp(-α/2 Σ_(i,j)∈bonds |x_i - x_j|²)``, i.e. a Gaussian
with precision ``α L`` for the bond-graph Laplacian ``L = D - A``. With ``L = P diag(λ) Pᵀ`` a sample is
``x = P diag(1/sqrt(α λ)) n`` with ``n ~ N(0, I)`` per spatial dimension. The zero mode of a connected graph is the
centre of mass and is dropped (zero-CoM samples); further zero modes (disconnected fragments such as salts) get
unit variance, so fragments are not stacked on top of each other. Bonded atoms start about ``1/sqrt(α)`` apart,
close to real bond lengths for α = 1, which makes the flow's paths shorter than from an isotropic Gaussian.
Both priors are isotropic in space, so the flow stays E(3)-equivariant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .egnn import remove_mean

__all__ = ["GaussianPrior", "HarmonicPrior", "bond_laplacian"]


def bond_laplacian(num_atoms: int, bond_index: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``L = D - A`` of one molecule from its (directed, both ways) local bond list ``[2, E]``."""
    adj = torch.zeros(num_atoms, num_atoms, dtype=dtype, device=bond_index.device)
    if bond_index.numel():
        adj[bond_index[0], bond_index[1]] = 1.0
        adj = torch.maximum(adj, adj.T)  # tolerate one-directional bond lists
    return torch.diag(adj.sum(1)) - adj


class GaussianPrior:
    """``eps ~ N(0, std² I)`` per atom, then the centre of mass of each molecule removed."""

    def __init__(self, std: float = 1.0):
        self.std = std

    def sample(self, batch, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        n = batch.batch.shape[0]
        eps = torch.randn(n, 3, generator=generator, dtype=dtype, device="cpu").to(batch.batch.device) * self.std
        return remove_mean(eps, batch.batch, batch.num_graphs)


class HarmonicPrior:
    """Harmonic bond-graph prior of ET-Flow with stiffness ``alpha`` (Å⁻²); samples have zero centre of mass."""

    def __init__(self, alpha: float = 1.0, zero_tol: float = 1e-6):
        if alpha <= 0:
            raise ValueError(f"HarmonicPrior alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.zero_tol = zero_tol

    def scales(self, num_atoms: int, bond_index: Tensor) -> tuple[Tensor, Tensor]:
        """Eigenvectors ``P[N, N]`` and per-mode standard deviations ``s[N]`` (0 for the centre-of-mass mode)."""
        lam, vec = torch.linalg.eigh(bond_laplacian(num_atoms, bond_index.cpu()))
        s = torch.where(lam > self.zero_tol, (self.alpha * lam.clamp_min(self.zero_tol)).rsqrt(), torch.ones_like(lam))
        s[0] = 0.0  # eigh sorts ascending: mode 0 is the constant (centre-of-mass) vector
        return vec, s

    def sample(self, batch, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        bidx = batch.batch.cpu()
        src, dst = batch.bond_index.cpu()
        local = torch.empty_like(bidx)  # index of each atom within its own molecule
        eps = torch.zeros(bidx.shape[0], 3, dtype=torch.float64)
        for g in range(batch.num_graphs):
            atoms = (bidx == g).nonzero().squeeze(1)
            local[atoms] = torch.arange(atoms.numel())
            keep = bidx[src] == g
            vec, s = self.scales(atoms.numel(), torch.stack([local[src[keep]], local[dst[keep]]]))
            noise = torch.randn(atoms.numel(), 3, generator=generator, dtype=torch.float64)
            eps[atoms] = vec @ (s[:, None] * noise)  # [n, 3]
        eps = eps.to(device=batch.batch.device, dtype=dtype)
        return remove_mean(eps, batch.batch, batch.num_graphs)
