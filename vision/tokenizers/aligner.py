"""A staged aligner (AlignTok): a foundation encoder turned into a diffusion tokenizer in three stages.

Chen et al. 2025, "AlignTok: Aligning Visual Foundation Encoders to Tokenizers for Diffusion Models" (arXiv 2509.25162,
ICLR 2026; project page aligntok.github.io). No code was found in the searchable index (checked 2026-12-01); this
follows the paper's abstract and method summaries:

1. *Latent alignment* (``stage=1``): the pretrained encoder ``E_p`` (DINOv2-L there, 1024 channels) is frozen; a
   lightweight adapter ``A`` maps its tokens to a compact latent ``z = A(E(x))`` (``d`` = 32 or 64 channels on the
   encoder's grid) and a decoder ``D`` is trained to reconstruct the image from ``z``; only ``A`` and ``D`` train.
2. *Perceptual alignment* (``stage=2``): encoder, adapter and decoder are optimised jointly with the reconstruction
   loss plus a *semantic preservation loss* that keeps the refined encoder close to the frozen pretrained one:
   here ``preserve_weight * mean ||E(x) - E_p(x)||^2`` over tokens (``preserve_loss="mse"``) or ``1 - cos``
   (``"cosine"``). It is exactly zero when stage 2 starts, because ``E`` starts as ``E_p``.
3. *Decoder refinement* (``stage=3``): encoder and adapter are frozen again; only the decoder is fine-tuned with the
   reconstruction loss.

Each stage is a run of :class:`AlignerStage1Task` (``configs/experiment/vision/aligner3_stage1.yaml`` with
``task.stage=1|2|3``); stages 2 and 3 start from the previous stage's checkpoint (``init_checkpoint``).

Not verified (the paper's text beyond its summaries was not readable here): the adapter's architecture (here
``depth`` pre-norm ViT blocks + a linear map ``D -> d``; ``depth=0`` is a linear adapter), the decoder (here RAE's
ViT decoder on the latent tokens), the exact form and weight of the preservation loss (features at the encoder's
output vs intermediate layers; MSE vs cosine), the learning rate of the encoder in stage 2 (one learning rate for all
parameters here: the trainer has one parameter group), the GAN and its start in each stage, and the stage lengths.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from unirep.encoders import FrozenEncoder
from unirep.tokenizers import Tokenizer
from vision.losses import LPIPS
from vision.tokenizers.rae import RAEDecoder, noise_augment
from vision.tokenizers.svg import _FrozenEncoderStage1Task, _gan_args
from vision.tokenizers.tasks import images_of

__all__ = ["TokenAdapter", "StagedAligner", "AlignerStage1Task", "encoder_tokens"]


def encoder_tokens(encoder: nn.Module, x: Tensor) -> Tensor:
    """Patch tokens ``[B, N, D]`` of a (possibly trainable) encoder with the graph kept to its weights and ``x``.

    Teachers decorate ``encode`` with ``torch.no_grad``; the undecorated function (``__wrapped__``) is called, so a
    refined encoder (stage 2) receives gradients.
    """
    inner = encoder.encoder if isinstance(encoder, FrozenEncoder) else encoder
    fn = getattr(type(inner).encode, "__wrapped__", None)
    tokens = fn(inner, x) if fn is not None else inner.encode(x)
    z, mask = tokens.to_dense()
    if not bool(mask.all()):
        raise ValueError("the aligner's encoder returned a ragged token set: images must share one size")
    return z.float()


class TokenAdapter(nn.Module):
    """``depth`` pre-norm ViT blocks on the encoder tokens, then ``LayerNorm -> Linear(D, d)``."""

    def __init__(self, in_dim: int, latent_dim: int, depth: int = 1, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if depth and in_dim % num_heads:
            raise ValueError(f"TokenAdapter in_dim {in_dim} must be divisible by num_heads {num_heads}")
        self.in_dim, self.latent_dim = int(in_dim), int(latent_dim)
        self.blocks = nn.Sequential(
            *[Block(in_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.proj = nn.Linear(in_dim, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(self.blocks(x)))  # [B, N, d]


class StagedAligner(Tokenizer):
    """Encoder (trainable in stage 2) + adapter + decoder; ``encode(x) -> [B, d, g, g]``.

    Args:
        encoder: the pretrained encoder (a plain module, *not* a :class:`FrozenEncoder`: stage 2 changes it, so its
            weights are part of the checkpoint). Its ``encode`` returns ``g*g`` patch tokens of ``dim`` channels.
        adapter: :class:`TokenAdapter` (``encoder.dim -> d``).
        decoder: :class:`RAEDecoder` with ``latent_dim = d``.
        eps: added to the variance of the per-channel latent statistics.
    """

    def __init__(self, encoder: nn.Module, adapter: TokenAdapter, decoder: RAEDecoder, eps: float = 1e-5):
        if isinstance(encoder, FrozenEncoder):
            encoder = encoder.encoder
        if adapter.in_dim != int(encoder.dim):
            raise ValueError(f"StagedAligner adapter in_dim {adapter.in_dim} != encoder dim {int(encoder.dim)}")
        if decoder.latent_dim != adapter.latent_dim:
            raise ValueError(
                f"StagedAligner decoder latent_dim {decoder.latent_dim} != adapter latent_dim {adapter.latent_dim}"
            )
        super().__init__(stat_shape=(adapter.latent_dim, 1, 1), eps=eps)
        self.encoder, self.adapter, self.decoder = encoder, adapter, decoder

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.adapter.latent_dim, self.decoder.grid, self.decoder.grid)

    @property
    def image_size(self) -> int:
        return self.decoder.image_size

    def features(self, x: Tensor) -> Tensor:
        """The encoder's tokens ``[B, N, D]`` (with gradient when the encoder's parameters require it)."""
        f = encoder_tokens(self.encoder, x)
        g = self.decoder.grid
        if f.shape[1] != g * g:
            raise ValueError(
                f"the aligner's encoder returned {f.shape[1]} tokens per image, the decoder expects a {g}x{g} grid: "
                f"check the image size and the encoder's grid_size"
            )
        return f

    def latent_tokens(self, x: Tensor) -> Tensor:
        return self.adapter(self.features(x))  # [B, N, d]

    def _encode(self, x: Tensor) -> Tensor:
        z = self.latent_tokens(x)
        g = self.decoder.grid
        return z.transpose(1, 2).reshape(z.shape[0], -1, g, g)

    def _decode(self, z: Tensor) -> Tensor:
        b, d, g, _ = z.shape
        return self.decoder(z.reshape(b, d, g * g).transpose(1, 2))


def _load_previous_stage(tok: StagedAligner, checkpoint: str) -> None:
    from unirep.train import load_task

    path = Path(str(checkpoint)).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"aligner init_checkpoint {path} does not exist: run the previous stage first "
            f"(`unirep-train experiment=vision/aligner3_stage1 task.stage=<stage - 1>`) and pass its out_dir"
        )
    prev, _ = load_task(str(path), ema=True)
    src = getattr(prev, "tokenizer", None)
    if not isinstance(src, StagedAligner):
        raise TypeError(f"{path} is a checkpoint of {type(prev).__name__}, not of an AlignerStage1Task")
    tok.load_state_dict(src.state_dict(), strict=True)


class AlignerStage1Task(_FrozenEncoderStage1Task):
    """One stage of the three-stage aligner.

    Args:
        tokenizer: the :class:`StagedAligner` (``task.model``: EMA over all of it).
        stage: 1 (adapter + decoder), 2 (everything, + preservation loss), 3 (decoder only).
        init_checkpoint: the previous stage's run folder or checkpoint (required for stages 2 and 3 unless
            ``allow_no_init``: smoke runs start them from the untrained tokenizer).
        preserve_weight, preserve_loss: the semantic preservation term of stage 2 (``"mse"`` or ``"cosine"``).
        noise_tau: RAE's noise augmentation of the latent before the decoder (0: off).
        perceptual_weight, lpips, lpips_weight, discriminator, ...: as :class:`RAEStage1Task`; the perceptual loss and
            FD-teacher use the frozen pretrained encoder ``E_p``.
    """

    def __init__(
        self,
        tokenizer: StagedAligner,
        stage: int = 1,
        init_checkpoint: str | None = None,
        allow_no_init: bool = False,
        preserve_weight: float = 1.0,
        preserve_loss: str = "mse",
        noise_tau: float = 0.0,
        perceptual_weight: float = 1.0,
        lpips: LPIPS | None = None,
        lpips_weight: float = 1.0,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.75,
        disc_start: int = 0,
        disc_max_weight: float = 1e4,
        disc_update_start: int | None = None,
        gen_loss: str = "hinge",
        eval_items: int = 256,
        fit_statistics_items: int | None = 4096,
    ):
        super().__init__()
        if not isinstance(tokenizer, StagedAligner):
            raise TypeError(f"AlignerStage1Task needs a StagedAligner tokenizer, got {type(tokenizer).__name__}")
        if int(stage) not in (1, 2, 3):
            raise ValueError(f"AlignerStage1Task stage must be 1, 2 or 3, got {stage!r}")
        if preserve_loss not in ("mse", "cosine"):
            raise ValueError(f"AlignerStage1Task preserve_loss must be 'mse' or 'cosine', got {preserve_loss!r}")
        self.stage = int(stage)
        if init_checkpoint is not None:
            _load_previous_stage(tokenizer, init_checkpoint)
        elif self.stage > 1 and not allow_no_init:
            raise ValueError(
                f"AlignerStage1Task stage {self.stage} starts from stage {self.stage - 1}: pass "
                f"task.init_checkpoint=<its out_dir> (or task.allow_no_init=true for smoke runs)"
            )
        # E_p: the pretrained encoder as it enters this stage (stage 1 never changes it, so in stage 2 it is the
        # pretrained one; in stage 3 the preservation term is off and E_p only serves the perceptual loss)
        self.reference = FrozenEncoder(copy.deepcopy(tokenizer.encoder), cache=False)
        trainable = {1: ("adapter", "decoder"), 2: ("encoder", "adapter", "decoder"), 3: ("decoder",)}[self.stage]
        for name in ("encoder", "adapter", "decoder"):
            getattr(tokenizer, name).requires_grad_(name in trainable)
        self.preserve_weight, self.preserve_loss = float(preserve_weight), preserve_loss
        self.noise_tau = float(noise_tau)
        gan = _gan_args(discriminator, disc_weight, disc_start, disc_max_weight, disc_update_start, gen_loss)
        self._setup_common(
            tokenizer, self.reference, perceptual_weight, lpips, lpips_weight, gan, eval_items, fit_statistics_items
        )

    def preservation(self, x: Tensor, f: Tensor | None = None) -> Tensor:
        """``||E(x) - E_p(x)||^2`` (mean over tokens and channels) or ``mean(1 - cos)``; 0 while ``E == E_p``."""
        f = self.tokenizer.features(x) if f is None else f
        with torch.no_grad():
            f_p = encoder_tokens(self.reference, x)
        if self.preserve_loss == "mse":
            return F.mse_loss(f, f_p)
        return (1.0 - F.cosine_similarity(f, f_p, dim=-1)).mean()

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        tok: StagedAligner = self.tokenizer
        x = images_of(batch)
        grad_enc = self.stage == 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage < 3):
            f = tok.features(x) if grad_enc else tok.features(x).detach()
            z = tok.adapter(f)
        if self.stage == 3:
            z = z.detach()
        if self.training and self.noise_tau > 0:
            z = noise_augment(z, self.noise_tau)
        x_rec = tok.decoder(z)
        nll, out = self._reconstruction_loss(x_rec, x)
        loss = nll
        if self.stage == 2 and self.preserve_weight > 0:
            keep = self.preservation(x, f)
            loss = loss + self.preserve_weight * keep
            out["loss/preserve"] = keep.detach()
        gan = self._gan_terms(x, x_rec, nll, tok.decoder.last_layer, step)
        out["loss"] = loss + gan.pop("gan_total", 0.0)
        return {**out, **gan}
