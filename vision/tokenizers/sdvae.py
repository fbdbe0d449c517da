"""SD-VAE: the KL autoencoder of Stable Diffusion (``AutoencoderKL``), the tokenizer REPA, SiT and LightningDiT use.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (LDM, sections 4.3.2 and D.1);
weights ``stabilityai/sd-vae-ft-ema`` / ``sd-vae-ft-mse`` (the decoder fine-tuned on LAION; REPA's
``preprocessing/encoders.py`` uses ``sd-vae-ft-mse``, DiT and SiT ``sd-vae-ft-ema``/``-mse``). The architecture and the
parameter names follow huggingface/diffusers ``models/autoencoders/autoencoder_kl.py`` (``AutoencoderKL``),
``autoencoders/vae.py`` (``Encoder``, ``Decoder``, ``DiagonalGaussianDistribution``), ``resnet.py``
(``ResnetBlock2D``), ``downsampling.py``/``upsampling.py`` and ``attention_processor.py`` (``Attention`` as built
by ``UNetMidBlock2D``), so a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) loads
as it is; this is an independent implementation, diffusers is not needed.

- Encoder: ``conv_in`` -> one ``DownEncoderBlock2D`` per entry of ``block_out_channels`` (``layers_per_block``
  ResNet blocks; every level but the last ends in a stride-2 3x3 conv after an asymmetric zero pad (0, 1, 0, 1), so
  ``H`` halves exactly) -> mid block (ResNet, single-head self-attention, ResNet) -> GroupNorm, SiLU, conv to
  ``2 * latent_channels`` (posterior mean and log-variance) -> ``quant_conv`` (1x1).
- Decoder: ``post_quant_conv`` -> ``conv_in`` -> mid block -> one ``UpDecoderBlock2D`` per level, deepest first
  (``layers_per_block + 1`` ResNet blocks, then nearest x2 upsampling and a 3x3 conv except at the last level) ->
  GroupNorm, SiLU, conv to ``out_channels``.
- Every GroupNorm has ``norm_num_groups`` groups (32) and eps 1e-6. ResNet blocks: norm, act, conv, norm, act,
  conv, plus a 1x1 ``conv_shortcut`` when the width changes. Attention: GroupNorm, linear q/k/v over the ``H*W``
  positions, softmax(q k^T / sqrt(C)) v, linear out, residual.
- Posterior: ``N(mean, exp(logvar))`` with the log-variance clamped to [-30, 20]; ``encode`` returns the mean
  (deterministic) unless ``sample_latents``. Images are in [-1, 1] (REPA: ``x / 127.5 - 1``).
- Latent statistics are named state, as every :class:`~unirep.tokenizers.Tokenizer`: ``latent_mean`` and
  ``latent_std`` (``(C, 1, 1)``) start from the config, ``z_norm = (z - shift_factor) * scaling_factor`` (SD's
  ``scaling_factor`` 0.18215: :data:`SD_VAE_SCALING_FACTOR`) or, with ``latents_mean``/``latents_std`` in the config,
  ``(z - latents_mean) * scaling_factor / latents_std`` (diffusers' pipelines); :meth:`fit_statistics` replaces them
  with per-channel statistics of a data set (LightningDiT's ``latent_norm``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.tokenizers import Tokenizer
from vision.tokenizers.vavae import DiagonalGaussian

__all__ = [
    "SD_VAE_SCALING_FACTOR",
    "SD_VAE_CONFIG",
    "SDVAE",
    "load_sdvae",
    "sd_vae",
    "convert_diffusers_state_dict",
]

# LDM's scaling of the SD-VAE latent (Rombach et al. 2022, D.1): 1 / the component-wise standard deviation of the
# latents of a first training batch, so the diffusion model sees roughly unit variance; diffusers' default
# ``scaling_factor`` and the constant REPA, DiT and SiT multiply their latents by.
SD_VAE_SCALING_FACTOR = 0.18215

# ``config.json`` of stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (f8: three downsamplings, 4 latent channels).
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SD_VAE_SCALING_FACTOR,
}

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "mish": nn.Mish}
_EPS = 1e-6  # every GroupNorm of AutoencoderKL (LDM's Normalize)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers' config keys of AutoencoderKL (0.42); keys starting with "_" (class name, version) are metadata
CONFIG_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)
# attention parameter names of diffusers < 0.15 files (sd-vae-ft-* as first uploaded) -> current names
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _group_norm(groups: int, c: int) -> nn.GroupNorm:
    if c % groups:
        raise ValueError(
            f"norm_num_groups={groups} does not divide the width {c}: choose block_out_channels accordingly"
        )
    return nn.GroupNorm(num_groups=groups, num_channels=c, eps=_EPS, affine=True)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding (``temb_channels=None``), output scale 1."""

    def __init__(self, c_in: int, c_out: int, groups: int, act: str):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nonlinearity = _ACTIVATIONS[act]()
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """The mid block's single-head self-attention (diffusers ``Attention``, ``residual_connection=True``)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(groups, c)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])  # diffusers' names: to_out.0 is the linear

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        # softmax in float32 (diffusers' upcast_softmax): fp16 logits over 4096 positions overflow
        out = F.scaled_dot_product_attention(q[:, None].float(), k[:, None].float(), v[:, None].float())[:, 0]
        out = self.to_out[1](self.to_out[0](out.to(t.dtype)))  # [B, HW, C]
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM's asymmetric pad (right and bottom only), so an even H gives exactly H / 2 (diffusers' padding=0 case)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: ResNet blocks then an optional resampler (diffusers' names)."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, act: str, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups, act) for i in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        for resampler in getattr(self, "downsamplers", getattr(self, "upsamplers", ())):
            x = resampler(x)
        return x


class MidBlock(nn.Module):
    """``UNetMidBlock2D`` with one attention layer: ResNet, attention, ResNet."""

    def __init__(self, c: int, groups: int, act: str, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups, act), ResnetBlock(c, c, groups, act)])
        self.attentions = nn.ModuleList([AttentionBlock(c, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image ``[B, C_in, H, W]`` -> ``[B, 2 * latent, H / f, W / f]`` before ``quant_conv``."""

    def __init__(self, c_in: int, widths: Sequence[int], n: int, latent: int, groups: int, act: str, attn: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(c_in, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down_blocks.append(_Level(c, w, n, groups, act, "down" if i < len(widths) - 1 else None))
            c = w
        self.mid_block = MidBlock(c, groups, act, attn)
        self.conv_norm_out = _group_norm(groups, c)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c, 2 * latent, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    """Latent ``[B, latent, h, w]`` (after ``post_quant_conv``) -> image ``[B, C_out, h * f, w * f]``."""

    def __init__(self, c_out: int, widths: Sequence[int], n: int, latent: int, groups: int, act: str, attn: bool):
        super().__init__()
        rev = list(reversed(widths))
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, act, attn)
        self.up_blocks = nn.ModuleList()
        c = rev[0]
        for i, w in enumerate(rev):
            # one more ResNet block per level than the encoder (LDM's num_res_blocks + 1)
            self.up_blocks.append(_Level(c, w, n + 1, groups, act, "up" if i < len(rev) - 1 else None))
            c = w
        self.conv_norm_out = _group_norm(groups, c)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c, c_out, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class SDVAE(Tokenizer):
    """``AutoencoderKL`` as a tokenizer; the arguments are diffusers' config keys (``config.json``).

    Args:
        in_channels, out_channels, down_block_types, up_block_types, block_out_channels, layers_per_block, act_fn,
            latent_channels, norm_num_groups, use_quant_conv, use_post_quant_conv, mid_block_add_attention: the
            architecture, as diffusers names it (the defaults are SD-VAE's, :data:`SD_VAE_CONFIG`).
        scaling_factor, shift_factor, latents_mean, latents_std: the initial latent statistics (see the module
            docstring); kept in :attr:`config` for :meth:`save_pretrained`.
        sample_size, force_upcast: kept for the config file (tiling and fp16 hints in diffusers; unused here).
        sample_latents: ``encode`` returns a posterior sample instead of the mean.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",) * 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | Sequence[int] = 256,
        scaling_factor: float = SD_VAE_SCALING_FACTOR,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        sample_latents: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__(stat_shape=(int(latent_channels), 1, 1), eps=eps)
        widths = [int(c) for c in block_out_channels]
        if not widths:
            raise ValueError("block_out_channels must name at least one level")
        for name, types, allowed in (
            ("down_block_types", down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", up_block_types, "UpDecoderBlock2D"),
        ):
            bad = [t for t in types if t != allowed]
            if bad or len(types) != len(widths):
                raise ValueError(
                    f"{name} must be {len(widths)} x {allowed!r} (one per block_out_channels entry), got {list(types)}"
                    " (other block types belong to other diffusers models)"
                )
        if act_fn.lower() not in _ACTIVATIONS:
            raise ValueError(f"act_fn {act_fn!r} is not one of diffusers' {sorted(_ACTIVATIONS)}")
        act = act_fn.lower()
        self.in_channels, self.out_channels, self.latent_channels = int(in_channels), int(out_channels), latent_channels
        self.downsample = 2 ** (len(widths) - 1)
        self.sample_latents = sample_latents
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "down_block_types": list(down_block_types),
            "up_block_types": list(up_block_types),
            "block_out_channels": widths,
            "layers_per_block": int(layers_per_block),
            "act_fn": act_fn,
            "latent_channels": int(latent_channels),
            "norm_num_groups": int(norm_num_groups),
            "sample_size": sample_size if isinstance(sample_size, int) else list(sample_size),
            "scaling_factor": float(scaling_factor),
            "shift_factor": shift_factor,
            "latents_mean": None if latents_mean is None else [float(v) for v in latents_mean],
            "latents_std": None if latents_std is None else [float(v) for v in latents_std],
            "force_upcast": bool(force_upcast),
            "use_quant_conv": bool(use_quant_conv),
            "use_post_quant_conv": bool(use_post_quant_conv),
            "mid_block_add_attention": bool(mid_block_add_attention),
        }
        args = (widths, int(layers_per_block), int(latent_channels), int(norm_num_groups), act)
        self.encoder = Encoder(int(in_channels), *args, mid_block_add_attention)
        self.decoder = Decoder(int(out_channels), *args, mid_block_add_attention)
        c2 = 2 * int(latent_channels)
        self.quant_conv = nn.Conv2d(c2, c2, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.set_config_statistics()

    # -- latent statistics ------------------------------------------------------------------------------------------
    def set_config_statistics(self) -> None:
        """Reset ``latent_mean``/``latent_std`` to what the config says (scaling/shift factor, latents_mean/std)."""
        cfg, c = self.config, int(self.latent_channels)
        scale = cfg["scaling_factor"]
        if not scale > 0:
            raise ValueError(f"scaling_factor must be positive, got {scale}")
        mean = torch.zeros(c, dtype=torch.float64)
        std = torch.full((c,), 1.0 / scale, dtype=torch.float64)
        if cfg["latents_mean"] is not None or cfg["latents_std"] is not None:
            for key in ("latents_mean", "latents_std"):
                if cfg[key] is None or len(cfg[key]) != c:
                    raise ValueError(f"config {key} must list {c} values (one per latent channel), got {cfg[key]}")
            mean = torch.tensor(cfg["latents_mean"], dtype=torch.float64)
            std = torch.tensor(cfg["latents_std"], dtype=torch.float64) / scale
        elif cfg["shift_factor"] is not None:
            mean.fill_(float(cfg["shift_factor"]))
        self.latent_mean.copy_(mean.reshape(c, 1, 1))
        self.latent_std.copy_(std.reshape(c, 1, 1))

    def statistics_config(self) -> dict[str, Any]:
        """The current statistics as diffusers config keys: ``scaling_factor`` alone when they are a uniform scale,
        otherwise ``latents_mean``/``latents_std`` with ``scaling_factor`` 1 (what a fitted tokenizer saves)."""
        mean, std = self.latent_mean.flatten().double(), self.latent_std.flatten().double()
        if torch.all(mean == 0) and torch.all(std == std[0]):
            return {
                "scaling_factor": float(1.0 / std[0]),
                "shift_factor": None,
                "latents_mean": None,
                "latents_std": None,
            }
        if torch.all(mean == mean[0]) and torch.all(std == std[0]):
            return {
                "scaling_factor": float(1.0 / std[0]),
                "shift_factor": float(mean[0]),
                "latents_mean": None,
                "latents_std": None,
            }
        return {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": mean.tolist(), "latents_std": std.tolist()}

    # -- tokenizer ---------------------------------------------------------------------------------------------------
    def latent_shape_for(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(
                f"image size {image_size} is not divisible by the SD-VAE downsampling factor {self.downsample}"
            )
        g = image_size // self.downsample
        return (int(self.latent_channels), g, g)

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SDVAE expects images [B, {self.in_channels}, H, W] in [-1, 1], got {tuple(x.shape)}")
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {self.downsample}"
            )
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def _encode(self, x: Tensor) -> Tensor:
        post = self.posterior(x)
        return post.sample() if self.sample_latents else post.mode()

    def _decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, DiagonalGaussian]:
        """``(reconstruction, raw latent, posterior)``; the latent is a posterior sample when ``sample``."""
        post = self.posterior(x)
        z = post.sample() if sample else post.mode()
        return self._decode(z), z, post

    @property
    def decoder_last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    # -- diffusers files --------------------------------------------------------------------------------------------
    def diffusers_state_dict(self) -> dict[str, Tensor]:
        """The parameters under diffusers' names (the tokenizer's statistics buffers excluded)."""
        own = set(self._own_buffers())
        return {k: v for k, v in self.state_dict().items() if k not in own}

    def _own_buffers(self) -> list[str]:
        return [n for n in ("latent_mean", "latent_std", "stats_items") if n in dict(self.named_buffers(recurse=False))]

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` as diffusers does (the statistics go into
        the config, :meth:`statistics_config`); files are written to temporary names and renamed."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.42.1",
            **self.config,
            **self.statistics_config(),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.diffusers_state_dict().items()}
        tmp = out / (WEIGHT_FILES[0] + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / WEIGHT_FILES[0])
        tmp_cfg = out / "config.json.tmp"
        tmp_cfg.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        tmp_cfg.replace(out / "config.json")
        return out

    @classmethod
    def from_pretrained(
        cls, path: str | Path, subfolder: str | None = None, variant: str | None = None, **overrides: Any
    ) -> SDVAE:
        """Load a diffusers ``AutoencoderKL`` folder (``config.json`` + weights), offline.

        Args:
            path: the folder, e.g. a download of ``stabilityai/sd-vae-ft-ema``, or a whole Stable Diffusion pipeline
                folder with ``subfolder="vae"``.
            variant: a weights variant such as ``"fp16"`` (``diffusion_pytorch_model.fp16.safetensors``); the weights
                are cast to float32.
            overrides: constructor arguments that replace config values (e.g. ``sample_latents=True``).
        """
        folder = Path(path).expanduser()
        if subfolder:
            folder = folder / subfolder
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{cfg_file} does not exist: point at a diffusers AutoencoderKL folder (config.json + "
                "diffusion_pytorch_model.safetensors), e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema "
                "--local-dir data/weights/sd-vae-ft-ema` on a machine with network access"
            )
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        kwargs = config_to_kwargs(cfg, str(cfg_file))
        kwargs.update(overrides)
        model = cls(**kwargs)
        state = read_weights(folder, variant)
        model.load_diffusers_state_dict(state, source=str(folder))
        return model

    def load_diffusers_state_dict(self, state: Mapping[str, Tensor], source: str = "the state dict") -> None:
        """Load diffusers-named parameters (current or pre-0.15 attention names); every missing or unexpected key
        and every shape mismatch stops the load with its name."""
        state = convert_diffusers_state_dict(state, source)
        expected = self.diffusers_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s): {_shorten(missing)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} key(s): {_shorten(unexpected)}")
            raise KeyError(
                f"{source} does not match its AutoencoderKL config: {'; '.join(parts)}. Check that config.json belongs "
                "to these weights (block_out_channels, layers_per_block, latent_channels, use_quant_conv, ...)"
            )
        bad = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
        ]
        if bad:
            raise ValueError(f"{source}: shapes differ from the config (file vs model): {_shorten(bad)}")
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(state[k].to(v.dtype))


def _shorten(names: Sequence[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def config_to_kwargs(cfg: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Constructor arguments from a diffusers ``config.json``; an unknown key stops with its name."""
    cls_name = cfg.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
        raise ValueError(f"{source} describes a {cls_name}, not an AutoencoderKL (SD-VAE): point at the VAE's folder")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"{source}: unknown AutoencoderKL config key(s) {unknown}; known: {list(CONFIG_KEYS)}. A newer diffusers "
            "format may have changed the architecture: remove the key only if you know it does not"
        )
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def read_weights(folder: Path, variant: str | None = None) -> dict[str, Tensor]:
    """``diffusion_pytorch_model[.variant].safetensors`` (or ``.bin``, read with ``weights_only=True``)."""
    names = [f.replace("model.", f"model.{variant}.") if variant else f for f in WEIGHT_FILES]
    for name in names:
        f = folder / name
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has none of {names}: download the VAE's weights next to its config.json")


def convert_diffusers_state_dict(state: Mapping[str, Tensor], source: str = "the state dict") -> dict[str, Tensor]:
    """Current diffusers names: the pre-0.15 attention names (``query``, ``key``, ``value``, ``proj_attn``) renamed and
    1x1-conv attention weights ``[C, C, 1, 1]`` reshaped to linear ``[C, C]``; CompVis/LDM names are refused."""
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        raise KeyError(
            f"{source} holds an original CompVis/LDM autoencoder (keys 'encoder.down.*'): convert it to diffusers' "
            "layout first (diffusers' scripts/convert_vae_pt_to_diffusers.py) or download the diffusers folder"
        )
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if ".attentions." in k:
            head, _, tail = k.rpartition(".")  # tail: weight / bias
            prefix, _, name = head.rpartition(".")
            if name in _DEPRECATED_ATTENTION:
                k = f"{prefix}.{_DEPRECATED_ATTENTION[name]}.{tail}"
            if v.dim() == 4 and v.shape[-2:] == (1, 1) and not k.endswith("group_norm.weight"):
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def sd_vae(**overrides: Any) -> SDVAE:
    """The SD-VAE architecture (:data:`SD_VAE_CONFIG`, 83.7 M parameters), randomly initialised; load weights with
    :meth:`SDVAE.from_pretrained` instead for real latents."""
    return SDVAE(**{**SD_VAE_CONFIG, **overrides})


def load_sdvae(
    path: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    random_init: Mapping[str, Any] | None = None,
    sample_latents: bool = False,
    statistics: str | None = None,
) -> SDVAE:
    """The frozen SD-VAE tokenizer for recipes (``task.tokenizer._target_: vision.tokenizers.load_sdvae``).

    Args:
        path: a diffusers AutoencoderKL folder (``stabilityai/sd-vae-ft-ema`` downloaded).
        random_init: used only when ``path`` is null: constructor arguments of an untrained SD-VAE (smoke runs; a
            warning says so).
        statistics: a JSON file of per-channel latent statistics ``{"mean": [...], "std": [...]}`` of *raw* latents
            (``scripts/encode_latents.py`` writes ``raw_mean``/``raw_std``) replacing the config's scaling factor.
    """
    if path is not None:
        vae = SDVAE.from_pretrained(path, subfolder=subfolder, variant=variant, sample_latents=sample_latents)
    elif random_init is not None:
        warnings.warn("load_sdvae: no path given, using a randomly initialised SD-VAE (smoke runs only)", stacklevel=2)
        cfg = {
            k: v if isinstance(v, str | int | float | bool) or v is None else list(v) for k, v in random_init.items()
        }
        vae = SDVAE(**cfg, sample_latents=sample_latents)  # hydra hands lists as ListConfig: plain lists for config
    else:
        raise ValueError(
            "load_sdvae needs path=<diffusers AutoencoderKL folder> (e.g. a download of stabilityai/sd-vae-ft-ema), "
            "or random_init for smoke runs"
        )
    if statistics is not None:
        stats = json.loads(Path(statistics).read_text(encoding="utf-8"))
        mean, std = stats.get("raw_mean", stats.get("mean")), stats.get("raw_std", stats.get("std"))
        c = vae.latent_channels
        if mean is None or std is None or len(mean) != c or len(std) != c:
            raise ValueError(f"{statistics} must hold {c} per-channel values under raw_mean/raw_std (or mean/std)")
        vae.latent_mean.copy_(torch.tensor(mean).reshape(c, 1, 1))
        vae.latent_std.copy_(torch.tensor(std).reshape(c, 1, 1))
    vae.requires_grad_(False)
    return vae.eval()
