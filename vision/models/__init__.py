"""Vision backbones: DiT/SiT (``vision.models.sit``); the RAE head DDT lives in ``vision.models.ddt``."""

from vision.models.sit import (
    SIT_CONFIGS,
    SiT,
    create_sit,
    list_sit_models,
    sit_b2,
    sit_l2,
    sit_s2,
    sit_tiny2,
    sit_xl2,
)

__all__ = [
    "SiT",
    "SIT_CONFIGS",
    "create_sit",
    "list_sit_models",
    "sit_s2",
    "sit_b2",
    "sit_l2",
    "sit_xl2",
    "sit_tiny2",
]
