"""Vision tokenizers: RAE (frozen representation encoder + ViT decoder) and VA-VAE (VF-aligned KL autoencoder).

Both implement the core :class:`unirep.tokenizers.Tokenizer` (normalised ``encode``, ``decode``, statistics as
named buffers), so any SiT recipe trains on their latents by swapping the tokenizer. See docs/vision_tokenizers.md.
"""

from vision.tokenizers.aligner import StagedAligner, TokenAdapter
from vision.tokenizers.fae import FAE, AttentionAdapter, TokenDecoder
from vision.tokenizers.rae import (
    RAE,
    RAEDecoder,
    noise_augment,
    rae_decoder_base,
    rae_decoder_large,
    rae_decoder_small,
    rae_decoder_tiny,
    rae_decoder_xl,
    strip_final_norm_affine,
)
from vision.tokenizers.sdvae import SD_VAE_SCALING_FACTOR, SDVAE, load_sdvae, sd_vae
from vision.tokenizers.svg import SVG, ResidualViT
from vision.tokenizers.vavae import VAVAE, DiagonalGaussian, adaptive_weight

__all__ = [
    "RAE",
    "RAEDecoder",
    "noise_augment",
    "strip_final_norm_affine",
    "rae_decoder_tiny",
    "rae_decoder_small",
    "rae_decoder_base",
    "rae_decoder_large",
    "rae_decoder_xl",
    "VAVAE",
    "DiagonalGaussian",
    "adaptive_weight",
    "SDVAE",
    "SD_VAE_SCALING_FACTOR",
    "load_sdvae",
    "sd_vae",
    "SVG",
    "ResidualViT",
    "FAE",
    "AttentionAdapter",
    "TokenDecoder",
    "StagedAligner",
    "TokenAdapter",
]
