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

__all__ = [
    "DEFAULT_Z_TABLE",
    "LocalAtomicAutoencoder",
    "LocalEnvironmentEncoder",
    "StructureDecoder",
    "kabsch_align",
    "local_ae_small",
    "local_ae_tiny",
    "real_spherical_harmonics",
]
