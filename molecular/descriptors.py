"""Non-learned per-atom descriptors: the floor of a representation-convergence study.

A learned model whose features agree with another model no better than a fixed descriptor of the local
environment does agrees with it has learned nothing shared beyond geometry. Three descriptors, all exposed as
:class:`~unirep.encoders.Encoder` s over atoms (one layer each, ``batch`` = structure index):

- :class:`SOAPDescriptor`: smooth overlap of atomic positions (Bartók, Kondor & Csányi 2013), via ``dscribe``
  (Himanen et al. 2020, SINGROUP/dscribe);
- :class:`ACSFDescriptor`: Behler-Parrinello atom-centred symmetry functions (Behler 2011), via ``dscribe``;
- :class:`RadialAngularHistogram`: written here (no dependency) -- per neighbour element, Gaussian-smeared radial
  densities, plus a cutoff-weighted histogram of bond angles. Invariant to rotation, translation and permutation
  of atoms by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molecular.teachers.external import _Frozen, as_atoms_list
from unirep.tokens import TokenSet

__all__ = ["SOAPDescriptor", "ACSFDescriptor", "RadialAngularHistogram", "cosine_cutoff"]


def cosine_cutoff(r: Tensor, r_cut: float) -> Tensor:
    """Behler's cutoff 0.5 (cos(pi r / r_cut) + 1) for r < r_cut, else 0."""
    return torch.where(r < r_cut, 0.5 * (torch.cos(math.pi * r / r_cut) + 1.0), torch.zeros_like(r))


def _tokens(feats: list[np.ndarray | Tensor], counts: list[int]) -> TokenSet:
    x = torch.cat([torch.as_tensor(f, dtype=torch.float32) for f in feats])
    return TokenSet(x, torch.arange(len(counts)).repeat_interleave(torch.as_tensor(counts)), None, len(counts))


def _check_species(atoms_list: list, species: Sequence[int], name: str) -> None:
    known = set(int(z) for z in species)
    for k, a in enumerate(atoms_list):
        bad = sorted(set(a.numbers.tolist()) - known)
        if bad:
            raise ValueError(
                f"{name}: structure {k} has atomic numbers {bad} outside species={sorted(known)}; "
                "add them to the descriptor's species list"
            )


class _Descriptor(_Frozen):
    """A single-layer encoder (``num_layers`` 0: index 0 = -1 is the descriptor), with the teachers' intermediates
    contract and content keys from :class:`~molecular.teachers.external._Frozen`."""

    layer_names = ["descriptor"]
    dim: int
    species: list[int]

    @property
    def elements(self) -> list[int]:  # type: ignore[override]
        return list(self.species)

    def encode(self, sample: Any) -> TokenSet:
        return self.encode_layers(sample)[0]


class SOAPDescriptor(_Descriptor):
    """SOAP power spectrum per atom (``dscribe.descriptors.SOAP``, molecules without periodicity).

    Args:
        species: atomic numbers the descriptor covers (its size grows with their square).
        r_cut: cutoff radius in Å; n_max, l_max: radial and angular resolution; sigma: Gaussian width in Å.
    """

    def __init__(
        self,
        species: Sequence[int] = (1, 6, 7, 8),
        r_cut: float = 5.0,
        n_max: int = 6,
        l_max: int = 4,
        sigma: float = 0.5,
    ):
        super().__init__()
        try:
            from dscribe.descriptors import SOAP
        except ImportError as err:
            raise ImportError("dscribe is not installed: `.venv/bin/pip install -c constraints.txt dscribe`") from err
        self.species = [int(z) for z in species]
        self.soap = SOAP(species=self.species, r_cut=r_cut, n_max=n_max, l_max=l_max, sigma=sigma, periodic=False)
        self.dim = int(self.soap.get_number_of_features())
        self.cache_key = f"soap-{self.species}-{r_cut}-{n_max}-{l_max}-{sigma}"

    def encode_layers(self, sample: Any) -> list[TokenSet]:
        atoms = as_atoms_list(sample)
        _check_species(atoms, self.species, "SOAPDescriptor")
        return [_tokens([self.soap.create(a) for a in atoms], [len(a) for a in atoms])]


class ACSFDescriptor(_Descriptor):
    """Atom-centred symmetry functions (``dscribe.descriptors.ACSF``): radial G2 and angular G4 terms.

    Args:
        species: atomic numbers covered; r_cut: cutoff in Å.
        g2_params: ``[(eta in 1/Å², R_s in Å), ...]``; g4_params: ``[(eta, zeta, lambda), ...]``.
    """

    def __init__(
        self,
        species: Sequence[int] = (1, 6, 7, 8),
        r_cut: float = 5.0,
        g2_params: Sequence[Sequence[float]] | None = None,
        g4_params: Sequence[Sequence[float]] | None = None,
    ):
        super().__init__()
        try:
            from dscribe.descriptors import ACSF
        except ImportError as err:
            raise ImportError("dscribe is not installed: `.venv/bin/pip install -c constraints.txt dscribe`") from err
        # radial shells every 0.5 Å from 0.5 Å, width ~0.5 Å; angular terms at two widths and both lobes
        g2 = g2_params or [(4.0, rs) for rs in np.arange(0.5, r_cut, 0.5)]
        g4 = g4_params or [(eta, zeta, lam) for eta in (0.005, 0.05) for zeta in (1.0, 4.0) for lam in (-1.0, 1.0)]
        self.species = [int(z) for z in species]
        self.acsf = ACSF(
            species=self.species, r_cut=r_cut, g2_params=[list(p) for p in g2], g4_params=[list(p) for p in g4]
        )
        self.dim = int(self.acsf.get_number_of_features())
        self.cache_key = f"acsf-{self.species}-{r_cut}-{g2}-{g4}"

    def encode_layers(self, sample: Any) -> list[TokenSet]:
        atoms = as_atoms_list(sample)
        _check_species(atoms, self.species, "ACSFDescriptor")
        return [_tokens([self.acsf.create(a) for a in atoms], [len(a) for a in atoms])]


class RadialAngularHistogram(_Descriptor):
    """A dependency-free local-environment descriptor.

    For atom i: for each neighbour element e, ``sum_j [Z_j = e] exp(-(r_ij - mu_k)^2 / (2 w^2)) f_c(r_ij)`` on
    ``n_radial`` centres ``mu_k`` in [0, r_cut] (``len(species) * n_radial`` features), followed by a histogram of
    the angles ``theta_jik`` over neighbour pairs, Gaussian-smeared on ``n_angular`` centres in [0, pi] and
    weighted by ``f_c(r_ij) f_c(r_ik)``. ``f_c`` is Behler's cosine cutoff.
    """

    def __init__(
        self, species: Sequence[int] = (1, 6, 7, 8), r_cut: float = 5.0, n_radial: int = 16, n_angular: int = 12
    ):
        super().__init__()
        self.species = [int(z) for z in species]
        self.r_cut = float(r_cut)
        self.register_buffer("mu_r", torch.linspace(0.0, r_cut, n_radial, dtype=torch.float64), persistent=False)
        self.register_buffer("mu_a", torch.linspace(0.0, math.pi, n_angular, dtype=torch.float64), persistent=False)
        self.w_r = r_cut / (n_radial - 1)  # Gaussian width = centre spacing: smooth, still resolving shells
        self.w_a = math.pi / (n_angular - 1)
        self.dim = len(self.species) * n_radial + n_angular
        self.cache_key = f"rah-{self.species}-{r_cut}-{n_radial}-{n_angular}"

    def describe(self, numbers: Tensor, positions: Tensor) -> Tensor:
        """Descriptor of every atom of one structure: ``numbers[N]``, ``positions[N, 3]`` -> ``[N, dim]``."""
        pos = positions.to(torch.float64)
        n = pos.shape[0]
        diff = pos[None, :, :] - pos[:, None, :]  # [N, N, 3]: r_j - r_i
        r = diff.norm(dim=-1)  # [N, N]
        off_diag = ~torch.eye(n, dtype=torch.bool)
        fc = cosine_cutoff(r, self.r_cut) * off_diag  # [N, N], zero on the diagonal
        # radial: [N, N, K] Gaussians weighted by the cutoff, summed per neighbour element
        g = torch.exp(-((r[..., None] - self.mu_r) ** 2) / (2 * self.w_r**2)) * fc[..., None]
        onehot = (numbers[:, None] == torch.as_tensor(self.species)[None, :]).to(torch.float64)  # [N, S]
        radial = torch.einsum("ijk,js->isk", g, onehot).reshape(n, -1)  # [N, S*K]
        # angular: cos(theta_jik) for all neighbour pairs (j, k) of i
        unit = diff / r.clamp_min(1e-12)[..., None]
        cos = torch.einsum("ijd,ikd->ijk", unit, unit).clamp(-1.0, 1.0)  # [N, N, N]
        theta = torch.acos(cos)
        weight = fc[:, :, None] * fc[:, None, :] * (~torch.eye(n, dtype=torch.bool))[None]  # j != k
        ga = torch.exp(-((theta[..., None] - self.mu_a) ** 2) / (2 * self.w_a**2))  # [N, N, N, A]
        angular = torch.einsum("ijk,ijka->ia", weight, ga)
        return torch.cat([radial, angular], dim=1)

    @torch.no_grad()
    def encode_layers(self, sample: Any) -> list[TokenSet]:
        atoms = as_atoms_list(sample)
        _check_species(atoms, self.species, "RadialAngularHistogram")
        feats = [self.describe(torch.as_tensor(a.numbers), torch.as_tensor(a.positions)) for a in atoms]
        return [_tokens(feats, [len(a) for a in atoms])]
