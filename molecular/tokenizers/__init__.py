"""Local all-atom autoencoder (SLAE-style tokenizer) and the GeoLDM-style equivariant VAE of the latent flow."""

from .geoldm import EquivariantVAE, GeoVAETask, geo_vae_small, geo_vae_tiny, load_vae
from .local_ae import (
    DEFAULT_Z_TABLE,
    LocalAtomicAutoencoder,
    LocalEnvironmentEncoder,
    StructureDecoder,
    kabsch_align,
    local_ae_small,
    local_ae_tiny,
    real_spherical_harmonics,
)
from .task import LocalAETask, reconstruction_metrics

__all__ = [
    "EquivariantVAE",
    "GeoVAETask",
    "geo_vae_small",
    "geo_vae_tiny",
    "load_vae",
    "LocalAETask",
    "reconstruction_metrics",
    "DEFAULT_Z_TABLE",
    "LocalAtomicAutoencoder",
    "LocalEnvironmentEncoder",
    "StructureDecoder",
    "kabsch_align",
    "local_ae_small",
    "local_ae_tiny",
    "real_spherical_harmonics",
]
