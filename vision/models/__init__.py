"""Vision backbones: DiT/SiT (``vision.models.sit``); the RAE head DDT lives in ``vision.models.ddt``; DDT's
decoupled encoder/decoder in ``vision.models.ddt_decoupled``; DeepFlow in ``vision.models.deepflow``."""

from vision.models.ddt_decoupled import DDT, ddt_b2, ddt_l2, ddt_xl2
from vision.models.deepflow import DeepFlow, deepflow_b2, deepflow_xl2
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
    "DDT",
    "ddt_b2",
    "ddt_l2",
    "ddt_xl2",
    "DeepFlow",
    "deepflow_b2",
    "deepflow_xl2",
]
