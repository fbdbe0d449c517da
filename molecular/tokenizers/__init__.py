"""Local all-atom autoencoder (SLAE-style tokenizer over molecules and protein fragments)."""

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
