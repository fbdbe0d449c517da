"""Frozen vision teachers: timm ViTs (DINOv2 with/without registers, MAE, SigLIP, a self-trained ViT).

Implements the core :class:`unirep.encoders.Encoder` protocol the way REPA (Yu et al., ICLR 2025;
sihyun-yu/REPA ``utils.py: preprocess_raw_image``, ``train.py``) uses DINOv2: images in [0, 1] are normalised
with the teacher's mean/std (ImageNet for DINOv2), resized bicubically so the teacher's token grid matches the
student's (224 = 16 × 14 for a 16×16 student grid), and the patch tokens after the final norm
(``x_norm_patchtokens``) are the target; class and register tokens are dropped. The class token is available
separately (:meth:`TimmViTEncoder.encode_pooled`) for REG. timm resamples the position embedding to the requested
input size when it loads a checkpoint; a teacher grid that still differs from the student's is resampled
bilinearly (:func:`unirep.align.resample_grid`).

Weights never download at run time: they come from ``pretrained_path`` (timm's
``pretrained_cfg_overlay=dict(file=...)``) or an already-warm Hugging Face cache; with neither, construction fails
at once with a message saying which file to put where. ``allow_random_init=True`` builds an untrained teacher
(tests and smoke runs only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.align import resample_grid
from unirep.tokens import TokenSet

__all__ = ["TimmViTEncoder", "TEACHERS", "IMAGENET_MEAN", "IMAGENET_STD", "resolve_teacher", "list_teachers"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: short name -> (timm model name, architecture overrides, mean, std)
TEACHERS: dict[str, tuple[str, dict[str, Any], tuple[float, ...] | None, tuple[float, ...] | None]] = {
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_vitl14": ("vit_large_patch14_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_vitg14": ("vit_giant_patch14_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_vits14_reg": ("vit_small_patch14_reg4_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_vitb14_reg": ("vit_base_patch14_reg4_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_vitl14_reg": ("vit_large_patch14_reg4_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_vitg14_reg": ("vit_giant_patch14_reg4_dinov2.lvd142m", {}, IMAGENET_MEAN, IMAGENET_STD),
    "mae_vitb16": ("vit_base_patch16_224.mae", {}, IMAGENET_MEAN, IMAGENET_STD),
    "mae_vitl16": ("vit_large_patch16_224.mae", {}, IMAGENET_MEAN, IMAGENET_STD),
    "mae_vith14": ("vit_huge_patch14_224.mae", {}, IMAGENET_MEAN, IMAGENET_STD),
    # SigLIP has no class token: its pooled vector is the attention-pool output
    "siglip_vitb16": ("vit_base_patch16_siglip_224.webli", {}, None, None),
    "siglip_vitl16_256": ("vit_large_patch16_siglip_256.webli", {}, None, None),
    # the project's own teacher (vision.teacher): a small ViT trained self-supervised on digits
    "unirep_vit_digits": (
        "vit_tiny_patch16_224",
        dict(patch_size=4, embed_dim=96, depth=4, num_heads=3, class_token=True),
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
}


def list_teachers() -> list[str]:
    return sorted(TEACHERS)


def resolve_teacher(name: str) -> tuple[str, dict[str, Any], tuple[float, ...] | None, tuple[float, ...] | None]:
    """Short name (``dinov2_vitb14``) or a timm name (``vit_base_patch14_dinov2.lvd142m``) -> spec."""
    if name in TEACHERS:
        return TEACHERS[name]
    return name, {}, None, None


def _hf_cached_file(timm_name: str) -> str | None:
    """Path of the weights in a warm Hugging Face cache, or None; never touches the network."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for fname in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, fname)
        if isinstance(found, str) and os.path.exists(found):
            return found
    return None


def _weights_help(short: str, timm_name: str, path: str | None) -> str:
    hub = None
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(timm_name)
        hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:
        pass
    url = f"https://huggingface.co/{hub}/resolve/main/model.safetensors" if hub else "the model's release page"
    where = (
        f"the file {path} does not exist" if path else "no pretrained_path was given and the Hugging Face cache is cold"
    )
    return (
        f"no weights for teacher {short!r} (timm {timm_name!r}): {where}. Download {url} on a machine with network, "
        f"put it e.g. at data/weights/{timm_name}.safetensors and pass pretrained_path=data/weights/"
        f"{timm_name}.safetensors (config key task.teacher.pretrained_path), or warm the cache with "
        f"`timm.create_model('{timm_name}', pretrained=True)` once online and run with HF_HUB_OFFLINE=1. "
        "For an untrained teacher (tests only) set allow_random_init=true."
    )


def _patch_from_name(timm_name: str, overrides: dict[str, Any]) -> int:
    if "patch_size" in overrides:
        return int(overrides["patch_size"])
    m = re.search(r"patch(\d+)", timm_name)
    if not m:
        raise ValueError(f"cannot infer the patch size of {timm_name!r}: pass model_kwargs={{'patch_size': ...}}")
    return int(m.group(1))


class TimmViTEncoder(nn.Module):
    """A frozen timm ViT as a teacher: patch tokens as a TokenSet, class token (or pooled vector) for REG.

    Args:
        name: a short name from :data:`TEACHERS` (``dinov2_vitb14``) or any timm ViT name.
        grid_size: the student's token grid side; the teacher input size becomes ``grid_size * patch`` (REPA:
            16 × 14 = 224 for SiT/2 on 32×32 latents), so both grids match without resampling.
        img_size: teacher input size when ``grid_size`` is not given (default: the model's own).
        pretrained_path: a local weights file (safetensors or a ``weights_only``-loadable torch file).
        allow_random_init: build without weights instead of failing (tests and smoke runs).
        model_kwargs: extra timm architecture arguments.
        mean, std: input normalisation; default: the teacher's own (ImageNet for DINOv2 and MAE).

    Inputs to :meth:`encode` are images in [-1, 1], ``[B, C, H, W]`` with C = 1 (replicated) or 3.
    """

    def __init__(
        self,
        name: str = "dinov2_vitb14",
        grid_size: int | None = None,
        img_size: int | None = None,
        pretrained_path: str | None = None,
        allow_random_init: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        import timm

        timm_name, arch, d_mean, d_std = resolve_teacher(name)
        arch = dict(arch, **(model_kwargs or {}))
        self.name, self.timm_name = name, timm_name
        self.patch_size = _patch_from_name(timm_name, arch)
        if grid_size is not None:
            img_size = int(grid_size) * self.patch_size
        kwargs: dict[str, Any] = dict(arch, num_classes=0)
        if img_size is not None:
            kwargs["img_size"] = int(img_size)

        file = None
        if pretrained_path is not None:
            file = str(Path(pretrained_path).expanduser())
            if not Path(file).is_file():
                raise FileNotFoundError(_weights_help(name, timm_name, file))
        elif not allow_random_init:
            file = _hf_cached_file(timm_name)
            if file is None:
                raise FileNotFoundError(_weights_help(name, timm_name, None))
        if file is not None:
            # the pretrained cfg's num_classes is that of the checkpoint; timm drops its classifier for num_classes=0
            model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=file), **kwargs)
        else:
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
        self.pretrained_file = file
        model.eval().requires_grad_(False)
        self.model = model
        self.dim = int(model.embed_dim)
        self.img_size = int(model.patch_embed.img_size[0])
        self.grid = self.img_size // self.patch_size
        self.grid_size = int(grid_size) if grid_size is not None else self.grid
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.has_class_token = getattr(model, "cls_token", None) is not None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = mean or d_mean or cfg.get("mean", IMAGENET_MEAN)
        std = std or d_std or cfg.get("std", IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> TimmViTEncoder:  # frozen: stays in eval mode
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images ``[B, C, H, W]`` -> normalised teacher input ``[B, 3, S, S]`` in float32 (REPA issue #46)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"teacher expects images [B, 1 or 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        x = (images.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return x

    def _features(self, images: Tensor) -> Tensor:
        return self.model.forward_features(self.preprocess(images))  # (B, prefix + N, D), after the final norm

    @torch.no_grad()
    def encode(self, images: Tensor) -> TokenSet:
        """Patch tokens ``B * grid_size**2`` of size ``dim`` (class and register tokens dropped)."""
        return self._patch_tokens(self._features(images))

    @torch.no_grad()
    def encode_pooled(self, images: Tensor) -> Tensor:
        """The class token after the final norm ``[B, D]`` (SigLIP: the attention-pool output)."""
        feats = self._features(images)
        if self.has_class_token:
            return feats[:, 0].float()
        return self.model.forward_head(feats, pre_logits=True).float()

    @property
    def num_layers(self) -> int:
        """L, the number of transformer blocks (valid layer indices: 0..L and -(L + 1)..-1)."""
        return len(self.model.blocks)

    def feature_dim(self, index: int | None = None) -> int:
        """Token width at any layer (a ViT keeps one width throughout)."""
        return self.dim

    def cache_settings(self) -> dict[str, Any]:
        """Settings besides the weights that change the features (part of the feature cache key)."""
        return dict(timm_name=self.timm_name, img_size=self.img_size, grid_size=self.grid_size)

    def _patch_tokens(self, feats: Tensor) -> TokenSet:
        tokens = feats[:, self.num_prefix_tokens :]  # (B, N, D) without class / register tokens
        if tokens.shape[1] != self.grid_size**2:
            tokens = resample_grid(tokens, self.grid_size**2)
        return TokenSet.from_dense(tokens.float())

    @torch.no_grad()
    def forward_intermediates(
        self, images: Tensor, indices: int | Sequence[int] | None = None
    ) -> tuple[TokenSet, list[TokenSet]]:
        """``(patch tokens of encode, [patch tokens at each index])`` from one pass (:mod:`unirep.intermediates`).

        Index 0 is the embedded patches (patch embedding + positions, after ``norm_pre``), ``k`` the output of block
        ``k`` before the final norm (timm's ``forward_intermediates(norm=False)``), negative counts from the end.
        Every level is resampled to the ``grid_size`` grid, as ``encode`` is.
        """
        from unirep.intermediates import feature_take_indices

        take = feature_take_indices(self.num_layers, indices, what=f"teacher {self.name}")
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(self.preprocess(images)))))  # (B, prefix + N, D)
        hidden = [x]
        for blk in m.blocks:
            x = blk(x)
            hidden.append(x)
        return self._patch_tokens(m.norm(x)), [self._patch_tokens(hidden[k]) for k in take]

    @torch.no_grad()
    def encode_both(self, images: Tensor) -> tuple[TokenSet, Tensor]:
        """Patch tokens and class token from one forward pass."""
        feats = self._features(images)
        tokens = feats[:, self.num_prefix_tokens :]
        if tokens.shape[1] != self.grid_size**2:
            tokens = resample_grid(tokens, self.grid_size**2)
        pooled = feats[:, 0] if self.has_class_token else self.model.forward_head(feats, pre_logits=True)
        return TokenSet.from_dense(tokens.float()), pooled.float()
