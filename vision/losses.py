"""Decoder losses for the vision tokenizers: perceptual terms, a patch discriminator, hinge GAN losses and the
adaptive GAN weight.

- Perceptual loss on a frozen encoder's features (works offline with any :class:`~unirep.encoders.Encoder`):
  LPIPS's recipe (unit-normalise each token's features, squared distance, spatial mean; Zhang et al. 2018) on the
  teacher's patch tokens instead of VGG activations.
- :class:`LPIPS`: the real VGG16 LPIPS (richzhang/PerceptualSimilarity, ``lpips/pretrained_networks.py`` and
  ``lpips/lpips.py``) when the user has the two weights files (torchvision ``vgg16`` features and the LPIPS linear
  heads ``vgg.pth``); nothing is downloaded.
- :class:`PatchDiscriminator`: the PatchGAN of pix2pix/taming-transformers (``NLayerDiscriminator``) used by LDM and
  VA-VAE; RAE's discriminator sits on frozen DINO features instead (:class:`FeatureDiscriminator`).
- :func:`gan_losses`: hinge losses for both players in one pass; the generator term sees the discriminator through
  detached parameters, so one optimiser step over the sum updates each player only with its own loss.
- Adaptive weight ``lambda = ||grad L_rec|| / (||grad L_gan|| + 1e-6)`` w.r.t. the decoder's last layer, clamped to
  ``[0, 1e4]`` (taming-transformers ``calculate_adaptive_weight``; RAE multiplies it by 0.75).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from unirep.encoders import FrozenEncoder
from unirep.tokens import TokenSet

__all__ = [
    "EncoderPerceptualLoss",
    "LPIPS",
    "PatchDiscriminator",
    "FeatureDiscriminator",
    "hinge_d_loss",
    "hinge_g_loss",
    "vanilla_g_loss",
    "gan_losses",
    "gan_adaptive_weight",
]


def _encode_with_grad(encoder: nn.Module, x: Tensor) -> TokenSet:
    """Teacher tokens with the graph kept to ``x``.

    Teachers compute ``encode`` under ``torch.no_grad`` (:class:`FrozenEncoder`, ``vision.encoders``); a perceptual
    loss needs gradients w.r.t. the image (never w.r.t. the frozen weights). Uses ``encode_differentiable`` when the
    encoder has one, else the undecorated function behind a ``torch.no_grad`` decorator (``__wrapped__``).
    """
    inner = encoder.encoder if isinstance(encoder, FrozenEncoder) else encoder
    if hasattr(inner, "encode_differentiable"):
        return inner.encode_differentiable(x)
    fn = getattr(type(inner).encode, "__wrapped__", None)
    return fn(inner, x) if fn is not None else inner.encode(x)


class EncoderPerceptualLoss(nn.Module):
    """``mean_tokens || n(f(x_rec)) - n(f(x)) ||^2`` with ``n`` the unit normalisation over channels.

    ``f`` is the frozen encoder's patch tokens; the target features need no gradient. Zero iff the normalised
    features agree; in ``[0, 4]`` per token.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder)

    def forward(self, x_rec: Tensor, x: Tensor) -> Tensor:
        with torch.no_grad():
            target = _encode_with_grad(self.encoder, x).x
        pred = _encode_with_grad(self.encoder, x_rec).x
        diff = F.normalize(pred.float(), dim=-1) - F.normalize(target.float(), dim=-1)
        return diff.pow(2).sum(-1).mean()


# -- LPIPS (VGG16) from local files -----------------------------------------------------------------------------
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices (in torchvision's vgg16.features) of relu1_2, relu2_2, relu3_3, 4_3, 5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS-VGG16 with weights from local files; inputs in ``[-1, 1]``.

    Args:
        vgg_weights: torchvision ``vgg16`` state dict (``vgg16-397923af.pth``); only ``features.*`` keys are used.
        lpips_weights: LPIPS linear heads (``lpips/weights/v0.1/vgg.pth``: keys ``lin{k}.model.1.weight``).
        Either may be ``None`` for a randomly initialised network (tests only; the values mean nothing).
    """

    def __init__(self, vgg_weights: str | os.PathLike | None, lpips_weights: str | os.PathLike | None):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers[: _LPIPS_TAPS[-1] + 1])
        self.lins = nn.ModuleList([nn.Conv2d(ch, 1, 1, bias=False) for ch in _LPIPS_CHANNELS])
        # LPIPS's scaling layer: (x - shift) / scale with ImageNet statistics expressed for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if vgg_weights is not None:
            sd = self._load(vgg_weights)
            feats = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
            feats = {k: v for k, v in feats.items() if int(k.split(".")[0]) <= _LPIPS_TAPS[-1]}
            self.features.load_state_dict(feats, strict=True)
        if lpips_weights is not None:
            sd = self._load(lpips_weights)
            lins = {
                f"{k}.weight": sd[f"lin{k}.model.1.weight"]
                for k in range(len(_LPIPS_CHANNELS))
                if f"lin{k}.model.1.weight" in sd
            }
            if len(lins) != len(_LPIPS_CHANNELS):
                raise ValueError(
                    f"{lpips_weights} is not an LPIPS VGG weights file: expected keys lin0..lin4"
                    f".model.1.weight, found {sorted(sd)[:8]}"
                )
            self.lins.load_state_dict(lins, strict=True)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _load(path: str | os.PathLike) -> dict[str, Tensor]:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"LPIPS weights file {path} does not exist: download it once on a machine with network access "
                f"(see docs/vision_tokenizers.md) or use the encoder perceptual loss"
            )
        return torch.load(path, map_location="cpu", weights_only=True)

    def train(self, mode: bool = True) -> LPIPS:  # frozen: always eval
        return super().train(False)

    def forward(self, x_rec: Tensor, x: Tensor) -> Tensor:
        """Mean LPIPS distance over the batch."""
        a, b = (x_rec - self.shift) / self.scale, (x - self.shift) / self.scale
        total = x.new_zeros(())
        k = 0
        for i, layer in enumerate(self.features):
            a, b = layer(a), layer(b)
            if i in _LPIPS_TAPS:
                # unit-normalise channels (eps 1e-10 as LPIPS), squared difference, learned channel weights
                na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[k]((na - nb) ** 2).mean(dim=(1, 2, 3)).mean()
                k += 1
        return total


# -- discriminators and GAN losses ------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4x4 convs with BatchNorm and LeakyReLU(0.2), then a 1-channel logit map."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init: N(0, 0.02) convs, N(1, 0.02) norms
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class FeatureDiscriminator(nn.Module):
    """A discriminator on frozen encoder tokens (RAE's choice, DINO-S/8 there): a trainable per-token MLP head."""

    def __init__(self, encoder: nn.Module, hidden: int = 256):
        super().__init__()
        self.encoder = encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder)
        self.head = nn.Sequential(nn.Linear(self.encoder.dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_encode_with_grad(self.encoder, x).x.float())  # [T, 1] logits, one per token


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """LDM/taming's generator loss ``-mean D(fake)`` (VA-VAE)."""
    return -logits_fake.mean()


def vanilla_g_loss(logits_fake: Tensor) -> Tensor:
    """RAE's ``gen_loss: vanilla`` (bytetriper/RAE ``src/disc/gan_loss.py`` ``vanilla_g_loss``): ``-mean D(fake)``,
    the same function as taming's generator loss (:func:`hinge_g_loss`); RAE names it after its discriminator loss."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """The non-saturating generator loss of Goodfellow et al. ``mean softplus(-D(fake))`` (StyleGAN's default)."""
    return F.softplus(-logits_fake).mean()


GEN_LOSSES = {"hinge": hinge_g_loss, "vanilla": vanilla_g_loss, "non_saturating": non_saturating_g_loss}


def gan_losses(
    disc: nn.Module, x_real: Tensor, x_fake: Tensor, gen_loss: str = "hinge", generator: bool = True
) -> tuple[Tensor | None, Tensor]:
    """``(generator loss, discriminator loss)`` for one step of simultaneous updates.

    ``gen_loss``: ``"hinge"`` (LDM, VA-VAE), ``"vanilla"`` (RAE's name; the same ``-mean D(fake)``) or
    ``"non_saturating"`` (softplus, what ``vanilla`` meant here before it was checked against RAE); the
    discriminator loss is the hinge loss in both anchors. ``generator=False`` (the discriminator's warm-up before the
    generator sees the adversarial term) skips the generator pass and returns ``None`` for its loss.

    The generator loss runs the discriminator with detached copies of its parameters (gradients reach ``x_fake``
    only); the discriminator loss sees detached images (gradients reach the discriminator only). Summing both and
    taking one optimiser step therefore updates each player with its own objective.
    """
    if gen_loss not in GEN_LOSSES:
        raise ValueError(
            f"gen_loss must be one of {sorted(GEN_LOSSES)} (hinge: LDM, vanilla: RAE, non_saturating: softplus), "
            f"got {gen_loss!r}"
        )
    g_loss = None
    if generator:
        params = {k: v.detach() for k, v in disc.named_parameters()}
        buffers = dict(disc.named_buffers())
        g_loss = GEN_LOSSES[gen_loss](functional_call(disc, (params, buffers), (x_fake,)))
    d_in = torch.cat([x_real.detach(), x_fake.detach()])  # one pass so BatchNorm sees both (taming runs two)
    logits = disc(d_in)
    n_real = logits.shape[0] // 2  # real first; a token-level discriminator returns [T, 1] in the same order
    d_loss = hinge_d_loss(logits[:n_real], logits[n_real:])
    return g_loss, d_loss


def gan_adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_value: float = 1e4) -> Tensor:
    """``||grad rec|| / (||grad g|| + 1e-6)`` w.r.t. ``last_layer``, clamped to ``[0, max_value]`` and detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-6)).clamp(0.0, max_value).detach()
