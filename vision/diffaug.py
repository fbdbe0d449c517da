"""A GAN recipe for tokenizer decoders: DiffAugment, a frozen-encoder discriminator and both players' losses.

- :class:`DiffAugment` (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training";
  mit-han-lab/data-efficient-gans ``DiffAugment_pytorch.py``): colour (brightness ``+U(-0.5, 0.5)``, saturation
  ``x U(0, 2)``, contrast ``x U(0.5, 1.5)``), translation (up to 1/8 of the side, zero padding) and cutout (a square
  of half the side zeroed), every op differentiable w.r.t. the image. RAE (bytetriper/RAE ``src/disc/diffaug.py``, the
  StyleGAN-T version) switches each of the three groups on per batch with probability ``prob`` and uses translation
  1/8 and a cutout ratio of 0 (its ``augment: {prob: 1.0, cutout: 0.0}``). Parameters are drawn once per batch
  (:meth:`DiffAugment.sample`) and applied by :meth:`DiffAugment.apply`, so a real image and its reconstruction can be
  given *the same* transform (``paired=True`` here, the brief of this project); RAE's trainer draws them
  independently for the real and the fake batch (``paired=False``).
- :class:`FrozenEncoderDiscriminator`: RAE's ``DinoDisc`` (``src/disc/dinodisc.py``, after VAR/GLD): a frozen ViT
  (DINO-S/8 there) read at several blocks (2, 5, 8, 11 of 12 plus the last), one trainable head per level on the
  token sequence: spectral-normalised 1-D conv (k = 1) -> BatchNormLocal -> LeakyReLU(0.2), a residual block of the
  same with kernel ``ks`` (9 in RAE, circular padding) scaled by 1/sqrt(2), and a spectral-normalised 1-D conv to one
  logit per token. Here any :class:`~vision.encoders.TimmViTEncoder` (the project's digits ViT offline) is the
  backbone; it stays frozen and out of checkpoints (:class:`~unirep.encoders.FrozenEncoder`).
- :class:`DiffAugGAN`: the two players' losses with that discriminator, plugged into the stage-1 tasks as their
  ``discriminator`` (``vision.tokenizers.tasks`` hands the step to :meth:`DiffAugGAN.gan_terms`), keeping RAE's
  schedule there (discriminator alone from ``disc_update_start``, the decoder's term from ``disc_start``, weight
  ``disc_weight * lambda`` with the adaptive lambda clamped at ``disc_max_weight``). As in RAE's
  ``train_stage1.py``: hinge loss for the discriminator on separate real and fake passes, the fake quantised to 8 bits
  (``round((x + 1) * 127.5) / 127.5 - 1``) and clamped; generator loss ``-mean D(aug(fake))`` (RAE calls it
  ``vanilla_g_loss``; it is :func:`vision.losses.hinge_g_loss`, not the softplus of
  :func:`vision.losses.vanilla_g_loss`).
  The generator pass runs with the discriminator's parameters switched off for autograd, so one optimiser step over
  the summed loss updates each player with its own objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from unirep.encoders import FrozenEncoder
from vision.losses import GEN_LOSSES, gan_adaptive_weight, hinge_d_loss

__all__ = ["DiffAugment", "BatchNormLocal", "FrozenEncoderDiscriminator", "DiffAugGAN", "quantize_8bit"]

_POLICIES = ("color", "translation", "cutout")


class DiffAugment:
    """Differentiable augmentation of images in ``[-1, 1]``, ``[B, C, H, W]``.

    Args:
        policy: comma-separated subset of ``color``, ``translation``, ``cutout`` (DiffAugment's names).
        prob: probability that each listed group is applied to a batch (RAE: 1.0; DiffAugment: always).
        translation_ratio: maximal shift as a fraction of the side (1/8 in both anchors).
        cutout_ratio: side of the zeroed square as a fraction of the image side (DiffAugment 0.5; RAE 0, i.e. off).
    """

    def __init__(
        self,
        policy: str = "color,translation,cutout",
        prob: float = 1.0,
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.5,
    ):
        ops = [p.strip() for p in policy.split(",") if p.strip()]
        bad = [p for p in ops if p not in _POLICIES]
        if bad:
            raise ValueError(f"DiffAugment policy has unknown ops {bad}: use a comma-separated subset of {_POLICIES}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"DiffAugment prob must be in [0, 1], got {prob}")
        self.ops, self.prob = tuple(ops), float(prob)
        self.translation_ratio, self.cutout_ratio = float(translation_ratio), float(cutout_ratio)

    def __repr__(self) -> str:
        return (
            f"DiffAugment(policy={','.join(self.ops)!r}, prob={self.prob}, translation={self.translation_ratio}, "
            f"cutout={self.cutout_ratio})"
        )

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> dict:
        """Random parameters for one batch (drawn on the CPU, so a seed gives the same transform on any device)."""

        def u(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator)

        on = {op: bool(u(1).item() < self.prob) if self.prob < 1.0 else True for op in self.ops}
        p: dict = {"batch": batch, "size": (height, width)}
        if on.get("color"):
            p["brightness"] = u(batch) - 0.5  # + U(-0.5, 0.5)
            p["saturation"] = u(batch) * 2.0  # x U(0, 2) around the per-pixel channel mean
            p["contrast"] = u(batch) + 0.5  # x U(0.5, 1.5) around the image mean
        if on.get("translation"):
            sh, sw = int(height * self.translation_ratio + 0.5), int(width * self.translation_ratio + 0.5)
            p["shift"] = (
                (u(batch) * (2 * sh + 1)).floor().long() - sh,
                (u(batch) * (2 * sw + 1)).floor().long() - sw,
            )
        if on.get("cutout") and self.cutout_ratio > 0:
            ch, cw = int(height * self.cutout_ratio + 0.5), int(width * self.cutout_ratio + 0.5)
            # centre of the square, anywhere in the image (DiffAugment: randint(0, H + (1 - ch % 2)))
            p["cutout"] = (
                (ch, cw),
                (u(batch) * (height + (1 - ch % 2))).floor().long(),
                (u(batch) * (width + (1 - cw % 2))).floor().long(),
            )
        return p

    def apply(self, x: Tensor, params: dict) -> Tensor:
        """The transform ``params`` describes; differentiable w.r.t. ``x``."""
        b, _, h, w = x.shape
        if params["batch"] != b or tuple(params["size"]) != (h, w):
            raise ValueError(
                f"DiffAugment parameters were drawn for {params['batch']} images of {params['size']}, got "
                f"{tuple(x.shape)}: call sample() with this batch's shape"
            )
        dev, dt = x.device, x.dtype
        if "brightness" in params:
            x = x + params["brightness"].to(dev, dt).view(b, 1, 1, 1)
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * params["saturation"].to(dev, dt).view(b, 1, 1, 1) + m
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * params["contrast"].to(dev, dt).view(b, 1, 1, 1) + m
        if "shift" in params:
            ty, tx = (t.to(dev).view(b, 1, 1) for t in params["shift"])
            gy = torch.arange(h, device=dev).view(1, h, 1)
            gx = torch.arange(w, device=dev).view(1, 1, w)
            # index into the 1-pixel zero-padded image; shifts beyond the border read the zero padding
            iy = (gy + ty + 1).clamp(0, h + 1).expand(b, h, w)
            ix = (gx + tx + 1).clamp(0, w + 1).expand(b, h, w)
            pad = F.pad(x, [1, 1, 1, 1])
            bi = torch.arange(b, device=dev).view(b, 1, 1).expand(b, h, w)
            x = pad.permute(0, 2, 3, 1)[bi, iy, ix].permute(0, 3, 1, 2)  # [B, C, H, W]
        if "cutout" in params:
            (ch, cw), oy, ox = params["cutout"]
            gy = torch.arange(h, device=dev).view(1, h, 1)
            gx = torch.arange(w, device=dev).view(1, 1, w)
            y0 = (oy.to(dev) - ch // 2).view(b, 1, 1)
            x0 = (ox.to(dev) - cw // 2).view(b, 1, 1)
            inside = (gy >= y0) & (gy < y0 + ch) & (gx >= x0) & (gx < x0 + cw)  # [B, H, W]
            x = x * (~inside).to(dt).unsqueeze(1)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(x, self.sample(x.shape[0], x.shape[-2], x.shape[-1], generator))


def quantize_8bit(x: Tensor) -> Tensor:
    """Clamp to ``[-1, 1]`` and round to the 256 levels of an 8-bit image (RAE's discriminator input for fakes)."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


class BatchNormLocal(nn.Module):
    """Normalisation over the batch and the tokens of ``[B, C, T]`` with no running statistics (RAE/VAR's
    ``BatchNormLocal`` with ``virtual_bs = 1`` group); eps 1e-6, learned affine."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        mean = x.mean(dim=(0, 2), keepdim=True)
        var = x.var(dim=(0, 2), keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight[None, :, None] + self.bias[None, :, None]


def _conv(c_in: int, c_out: int, k: int, spec: bool) -> nn.Module:
    conv = nn.Conv1d(c_in, c_out, k, padding=k // 2, padding_mode="circular" if k > 1 else "zeros")
    return spectral_norm(conv) if spec else conv


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2.0)  # keeps the variance of the sum of two unit-variance branches


def _head(dim: int, ks: int, spec: bool) -> nn.Sequential:
    def block(k: int) -> nn.Sequential:
        return nn.Sequential(_conv(dim, dim, k, spec), BatchNormLocal(dim), nn.LeakyReLU(0.2))

    return nn.Sequential(block(1), _Residual(block(ks)), _conv(dim, 1, 1, spec))


class FrozenEncoderDiscriminator(nn.Module):
    """Frozen ViT features at ``layers`` -> one trainable 1-D conv head per layer -> ``[B, n_layers * N]`` logits.

    Args:
        encoder: a ViT teacher with ``forward_intermediates(images, indices)`` (``vision.encoders.TimmViTEncoder``);
            frozen and wrapped in :class:`FrozenEncoder` (never trained, never checkpointed).
        layers: block indices in the project's convention (1..L = the output of block k, negative from the end).
            RAE reads blocks 2, 5, 8, 11 (0-based) of DINO-S/8 = indices 3, 6, 9, 12, plus the final one again.
            Default: four levels spread over the depth, the last included.
        ks: kernel size of the residual conv (9 in RAE).
        spectral: spectral normalisation of the head convs (RAE: on).
    """

    def __init__(self, encoder: nn.Module, layers: Sequence[int] | None = None, ks: int = 9, spectral: bool = True):
        super().__init__()
        self.encoder = encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder, cache=False)
        inner = self.encoder.encoder
        if not hasattr(inner, "forward_intermediates"):
            raise TypeError(
                f"FrozenEncoderDiscriminator needs an encoder with forward_intermediates (a TimmViTEncoder), got "
                f"{type(inner).__name__}"
            )
        depth = int(inner.num_layers)
        if layers is None:
            layers = sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75, 1.0)})
        self.layers = [int(k) for k in layers]
        if ks < 1 or ks % 2 == 0:
            raise ValueError(f"FrozenEncoderDiscriminator ks must be a positive odd number, got {ks}")
        self.heads = nn.ModuleList([_head(self.encoder.dim, ks, spectral) for _ in self.layers])

    def features(self, x: Tensor) -> list[Tensor]:
        """The frozen encoder's tokens at each layer, ``[B, D, N]``, with the graph kept to ``x``."""
        inner = self.encoder.encoder
        fn = getattr(type(inner).forward_intermediates, "__wrapped__", None)  # undo the teacher's torch.no_grad
        _, levels = fn(inner, x, self.layers) if fn is not None else inner.forward_intermediates(x, self.layers)
        b = x.shape[0]
        return [t.x.reshape(b, -1, t.x.shape[-1]).transpose(1, 2).float() for t in levels]

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return torch.cat([head(f).reshape(b, -1) for head, f in zip(self.heads, self.features(x), strict=True)], dim=1)


class DiffAugGAN(nn.Module):
    """A discriminator plus its augmentation and losses; pass it as a stage-1 task's ``discriminator``.

    Args:
        discriminator: the network (:class:`FrozenEncoderDiscriminator`, or a ``PatchDiscriminator``).
        augment: :class:`DiffAugment` applied before every discriminator call (``None``: no augmentation).
        paired: draw one transform per batch and apply it to the real images and to their reconstructions alike
            (``False``: independent draws, as RAE's trainer).
        gen_loss: ``"hinge"`` (``-mean D(fake)``: RAE's ``vanilla_g_loss``) or ``"vanilla"`` (softplus).
        quantize_fake: give the discriminator 8-bit-quantised, clamped fakes (RAE) so it cannot tell them apart by
            values no image has.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        augment: DiffAugment | None = None,
        paired: bool = True,
        gen_loss: str = "hinge",
        quantize_fake: bool = True,
    ):
        super().__init__()
        if gen_loss not in GEN_LOSSES:
            raise ValueError(f"DiffAugGAN gen_loss must be one of {sorted(GEN_LOSSES)}, got {gen_loss!r}")
        self.discriminator, self.augment, self.paired = discriminator, augment, bool(paired)
        self.gen_loss, self.quantize_fake = gen_loss, bool(quantize_fake)

    def forward(self, x: Tensor) -> Tensor:
        return self.discriminator(x)

    def _params(self, x: Tensor) -> dict | None:
        return None if self.augment is None else self.augment.sample(x.shape[0], x.shape[-2], x.shape[-1])

    def _aug(self, x: Tensor, params: dict | None) -> Tensor:
        return x if params is None else self.augment.apply(x, params)

    def losses(self, x_real: Tensor, x_fake: Tensor, generator: bool = True) -> tuple[Tensor | None, Tensor]:
        """``(generator loss, discriminator loss)``; the generator's gradient reaches ``x_fake`` only, the
        discriminator's reaches the discriminator only."""
        p_fake = self._params(x_fake)
        p_real = p_fake if self.paired else self._params(x_real)
        g_loss = None
        if generator:
            trainable = [p for p in self.discriminator.parameters() if p.requires_grad]
            for p in trainable:  # the generator's pass must not build a graph to the discriminator's weights
                p.requires_grad_(False)
            try:
                g_loss = GEN_LOSSES[self.gen_loss](self.discriminator(self._aug(x_fake, p_fake)))
            finally:
                for p in trainable:
                    p.requires_grad_(True)
        fake = x_fake.detach()
        fake = quantize_8bit(fake) if self.quantize_fake else fake
        # separate passes, as RAE: BatchNormLocal statistics of the real batch never mix with the fake batch's
        logits_real = self.discriminator(self._aug(x_real.detach(), p_real))
        logits_fake = self.discriminator(self._aug(fake, p_fake))
        return g_loss, hinge_d_loss(logits_real, logits_fake)

    def gan_terms(
        self,
        x: Tensor,
        x_rec: Tensor,
        nll: Tensor,
        last_layer: Tensor,
        generator: bool,
        weight: float,
        max_weight: float,
        adaptive: bool,
    ) -> dict[str, Tensor]:
        """The stage-1 tasks' adversarial terms: ``gan_total`` (added to the loss) and logs."""
        g_loss, d_loss = self.losses(x, x_rec, generator=generator)
        if not generator:
            return {"gan_total": d_loss, "loss/gan_d": d_loss.detach()}
        lam = gan_adaptive_weight(nll, g_loss, last_layer, max_weight) if adaptive else nll.new_ones(())
        return {
            "gan_total": weight * lam * g_loss + d_loss,
            "loss/gan_g": g_loss.detach(),
            "loss/gan_d": d_loss.detach(),
            "gan/weight": lam,
        }
