"""Equivariant flows for molecules: velocity networks (EGNN, equivariant transformer, MACE with a force field's trunk),
priors, ET-Flow's path, the conformer flow task, reflow for few steps and the GeoLDM-style latent flow."""

from .egnn import EGNNLayer, EquivariantVelocityNet, egnn_base, egnn_small, egnn_tiny, full_edges, remove_mean
from .et import EquivariantTransformer, et_base, et_small, et_tiny
from .latent import LatentFlowTask, load_vae
from .mace_velocity import ForceFieldMACEVelocityNet, MACEVelocityNet
from .paths import ConformerPath, batchwise_l2_loss, bridge_std, kabsch_align, kabsch_rotations
from .prior import GaussianPrior, HarmonicPrior, bond_laplacian
from .reflow import ReflowTask, load_velocity_net
from .task import ConformerFlowTask, evaluate_conformers, records_from_smiles

__all__ = [
    "ConformerFlowTask",
    "ConformerPath",
    "EGNNLayer",
    "EquivariantTransformer",
    "EquivariantVelocityNet",
    "ForceFieldMACEVelocityNet",
    "GaussianPrior",
    "HarmonicPrior",
    "LatentFlowTask",
    "MACEVelocityNet",
    "ReflowTask",
    "batchwise_l2_loss",
    "bond_laplacian",
    "bridge_std",
    "egnn_base",
    "egnn_small",
    "egnn_tiny",
    "et_base",
    "et_small",
    "et_tiny",
    "evaluate_conformers",
    "full_edges",
    "kabsch_align",
    "kabsch_rotations",
    "load_vae",
    "load_velocity_net",
    "records_from_smiles",
    "remove_mean",
]
