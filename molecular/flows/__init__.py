"""Equivariant flows for molecules: the EGNN velocity network, priors, conformer flow and latent flow tasks."""

from .egnn import EGNNLayer, EquivariantVelocityNet, egnn_base, egnn_small, egnn_tiny, full_edges, remove_mean
from .latent import LatentFlowTask, load_tokenizer
from .prior import GaussianPrior, HarmonicPrior, bond_laplacian
from .task import ConformerFlowTask, evaluate_conformers, teacher_tokens

__all__ = [
    "ConformerFlowTask",
    "EGNNLayer",
    "EquivariantVelocityNet",
    "GaussianPrior",
    "HarmonicPrior",
    "LatentFlowTask",
    "bond_laplacian",
    "egnn_base",
    "egnn_small",
    "egnn_tiny",
    "evaluate_conformers",
    "full_edges",
    "load_tokenizer",
    "remove_mean",
    "teacher_tokens",
]
