"""Equivariant flows for molecules: the EGNN velocity network, priors, conformer flow and latent flow tasks."""

from .egnn import EGNNLayer, EquivariantVelocityNet, egnn_base, egnn_small, egnn_tiny, full_edges, remove_mean
from .prior import GaussianPrior, HarmonicPrior, bond_laplacian

__all__ = [
    "EGNNLayer",
    "EquivariantVelocityNet",
    "GaussianPrior",
    "HarmonicPrior",
    "bond_laplacian",
    "egnn_base",
    "egnn_small",
    "egnn_tiny",
    "full_edges",
    "remove_mean",
]
