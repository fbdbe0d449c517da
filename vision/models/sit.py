"""DiT / SiT: diffusion transformers with adaLN-Zero conditioning.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT, ICCV 2023; facebookresearch/DiT ``models.py``);
Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers"
(willisma/SiT); the REPA variant (Yu et al., ICLR 2025; sihyun-yu/REPA ``models/sit.py``) adds qk-norm and exposes
hidden states for alignment; REG (Wu et al. 2025; Martinser/REG) prepends the teacher's noised class token.
MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"; Gsunshine/meanflow
``models/models_dit.py``) conditions on two times: ``interval_embed=True`` adds a second timestep embedder for the
interval ``h = t - r``, summed into the condition (``c = t_emb + h_emb + y_emb``, the anchor's ``h_embedder``).

The architecture follows the anchors exactly: 2-D sin-cos positional embedding (frozen), 256-d sinusoidal timestep
embedding + MLP, label table with a null class (index ``num_classes``) and label dropout, blocks with
adaLN (shift/scale/gate for attention and MLP), LayerNorm without affine (eps 1e-6), tanh-GELU MLP of ratio 4,
zero-initialised adaLN outputs and final linear layer. Attention runs through
``torch.nn.functional.scaled_dot_product_attention``.

Time follows this project's convention (t = 0 data, t = 1 noise); the timestep embedding takes the continuous
t in [0, 1] as SiT and REPA do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.intermediates import feature_take_indices, normalize_index
from unirep.nn import timestep_embedding
from unirep.tokens import TokenSet

__all__ = [
    "SiT",
    "SIT_CONFIGS",
    "create_sit",
    "list_sit_models",
    "patchify",
    "unpatchify",
    "get_2d_sincos_pos_embed",
    "sit_s2",
    "sit_b2",
    "sit_l2",
    "sit_xl2",
    "sit_tiny2",
    "check_labels",
]


def _per_token(m: Tensor) -> Tensor:
    """A per-item modulation ``[B, D]`` as ``[B, 1, D]``; a per-token one ``[B, N, D]`` (DiT^DH's head) as is."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation; ``x[B, N, D]``, ``shift/scale`` per item ``[B, D]`` or per token ``[B, N, D]``."""
    return x * (1 + _per_token(scale)) + _per_token(shift)


def patchify(x: Tensor, p: int) -> Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]`` in the (h, w, p, q, c) order DiT's unpatchify inverts."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, c: int) -> Tensor:
    """``[B, N, p*p*C] -> [B, C, H, W]`` with a square grid of N tokens (DiT's ``unpatchify``)."""
    b, n, _ = x.shape
    h = w = int(round(math.sqrt(n)))
    if h * w != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    x = x.reshape(b, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT 2-D sin-cos embedding ``[grid_size**2, dim]``: half the channels encode w, half encode h."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # w goes first, as in MAE/DiT
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _sincos_1d(dim // 2, grid[0])
    emb_w = _sincos_1d(dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


class TimestepEmbedder(nn.Module):
    """Scalar time -> 256-d sinusoidal frequencies (:func:`unirep.nn.timestep_embedding`) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        # times in [0, 1] as they are (scale 1, SiT/REPA), in float32 whatever t's dtype (the samplers' float64 grid);
        # a float64 model embeds in float64 (finite-difference checks of MeanFlow's time derivative need it)
        freq = timestep_embedding(
            t.to(torch.promote_types(self.mlp[0].weight.dtype, torch.float32)), self.frequency_embedding_size
        )
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; index ``num_classes`` is the null class used for label dropout and CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids.bool()
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention via SDPA, with optional per-head LayerNorm on q and k (qk-norm, as in REPA).

    ``forward(x, return_logits=True)`` takes an explicit path instead (``softmax(q k^T / sqrt(d)) v`` written out,
    the same function) and also returns the pre-softmax logits ``[B, H, N, N]``: SDPA exposes no attention maps, and
    HASTE's attention distillation needs them for a few blocks only, so the other blocks keep the fused kernel.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        if not return_logits:
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(b, n, d))
        logits = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
        x = logits.softmax(dim=-1) @ v  # [B, H, N, Dh]
        return self.proj(x.transpose(1, 2).reshape(b, n, d)), logits


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``x[B, N, D]``; condition ``c[B, D]`` (one per item) or ``c[B, N, D]`` (one per token, DiT^DH's head).

        ``return_logits``: also return the attention logits ``[B, H, N, N]`` (the explicit attention path).
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        a = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), return_logits=return_logits)
        a, logits = a if return_logits else (a, None)
        x = x + _per_token(gate_msa) * a
        x = x + _per_token(gate_mlp) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return (x, logits) if return_logits else x


class FinalLayer(nn.Module):
    """LayerNorm -> modulate -> Linear(D, out_dim)."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulated(self, x: Tensor, c: Tensor) -> Tensor:
        """The tokens after the final LayerNorm and adaLN modulation ``[B, N, D]`` (REG's class head reads token 0)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # per item [B, D] or per token [B, N, D]
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(self.modulated(x, c))


class SiT(nn.Module):
    """Diffusion transformer on a square image or latent grid.

    Args:
        input_size: spatial size H = W of the input (pixels or latent).
        patch_size: patch size p; the token grid is (H/p)^2.
        in_channels: channels C of the input.
        hidden_size, depth, num_heads, mlp_ratio: transformer shape.
        num_classes: number of classes; 0 makes the model unconditional (no label table).
        class_dropout_prob: label dropout to the null class during training (enables CFG).
        learn_sigma: DiT's doubled output channels (variance); the flow objective uses the first C channels.
        qk_norm: LayerNorm on queries and keys per head.
        cls_token_dim: REG: the teacher class-token size; when set, ``forward(..., cls=z_t)`` embeds the noised
            class token (Linear + LayerNorm), prepends it as token 0 and predicts its velocity with a zero-initialised
            head.
        interval_embed: MeanFlow: embed the interval ``h = t - r`` with a second timestep embedder and add it to the
            condition; ``forward(..., t_minus_r=h)`` then predicts the average velocity ``u(z_t, r, t)``, and with
            ``h`` omitted (``r = t``) the instantaneous velocity. Off: the model takes one time, as every other recipe.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        cls_token_dim: int | None = None,
        interval_embed: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.cls_token_dim = cls_token_dim
        self.interval_embed = bool(interval_embed)
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2

        # patch embedding as a strided conv, as timm's PatchEmbed does for DiT
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.h_embedder = TimestepEmbedder(hidden_size) if self.interval_embed else None  # MeanFlow's t - r
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.register_buffer("pos_embed", torch.zeros(1, self.num_patches, hidden_size), persistent=False)
        if cls_token_dim is not None:
            self.cls_embedder = nn.Sequential(nn.Linear(cls_token_dim, hidden_size), nn.LayerNorm(hidden_size))
            self.cls_head = nn.Linear(hidden_size, cls_token_dim)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.hidden_size, self.grid_size)
        self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # patch embedding initialised like a Linear (xavier on the flattened kernel), as DiT does
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.bias, 0)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.h_embedder is not None:  # as the t embedder (Gsunshine/meanflow, zhuyu-cs/MeanFlow)
            nn.init.normal_(self.h_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.h_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)
        if self.cls_token_dim is not None:
            nn.init.constant_(self.cls_head.weight, 0)
            nn.init.constant_(self.cls_head.bias, 0)

    # ------------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L, the number of blocks: ``forward_intermediates`` indices run over 0 (embedding) .. L."""
        return self.depth

    def feature_dim(self, index: int) -> int:
        """Width of the hidden tokens at ``index`` (every SiT layer has ``hidden_size``)."""
        normalize_index(index, self.num_layers, "SiT")
        return self.hidden_size

    def sample_label_drop(self, y: Tensor | None) -> Tensor | None:
        """The training-time label-dropout mask ``[B]`` (``None`` when no dropout applies).

        The same draw the label table makes itself; a task that draws it up front passes it as ``force_drop_ids``
        to the student and to an EMA copy, so both see the same dropped labels (SRA).
        """
        emb = self.y_embedder
        if y is None or emb is None or not self.training or emb.dropout_prob <= 0:
            return None
        return torch.rand(y.shape[0], device=y.device) < emb.dropout_prob

    def _condition(self, t: Tensor, y: Tensor | None, force_drop_ids: Tensor | None, h: Tensor | None = None) -> Tensor:
        c = self.t_embedder(t)  # (B, D)
        if self.h_embedder is not None:
            c = c + self.h_embedder(torch.zeros_like(t) if h is None else h)  # h = t - r; omitted: r = t
        elif h is not None:
            raise ValueError("this SiT takes one time: build it with interval_embed=True to pass t_minus_r (MeanFlow)")
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this SiT is class-conditional (num_classes > 0): pass labels y")
            check_labels(y, self.num_classes + 1, what="SiT label")  # num_classes itself is the null class
            c = c + self.y_embedder(y, self.training, force_drop_ids)
        return c

    def _embed(self, x: Tensor, cls: Tensor | None) -> tuple[Tensor, int]:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input [B, {self.in_channels}, {self.input_size}, {self.input_size}], "
                f"got {tuple(x.shape)}"
            )
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        if cls is None:
            return h, 0
        if self.cls_token_dim is None:
            raise ValueError("this SiT was built without cls_token_dim: REG's class token is not supported")
        return torch.cat([self.cls_embedder(cls).unsqueeze(1), h], dim=1), 1  # (B, 1 + N, D)

    def forward_intermediates(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        indices: int | Sequence[int] | None = (),
        cls: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        keep_prefix: bool = False,
        attention: Sequence[int] = (),
        t_minus_r: Tensor | None = None,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], list[TokenSet]] | tuple[Any, list[TokenSet], dict[int, Tensor]]:
        """Run the model and return the hidden tokens at ``indices`` (:mod:`unirep.intermediates` convention).

        Index 0 is the embedded input, ``k`` the output of block k (REPA's ``encoder_depth=8`` is 8), negative
        indices count from the end, ``None`` is every layer. REG's class token is excluded from the returned
        tokens unless ``keep_prefix`` (REG aligns ``[cls, patches]``: then each item has 1 + N tokens, cls first).

        ``attention``: blocks (1..L, negative from the end) whose attention logits ``[B, H, T, T]`` (T tokens, the
        class token included) are returned too, computed by the explicit attention path; the return value is then
        ``(out, feats, {block: logits})``.

        ``t_minus_r``: MeanFlow's interval ``h = t - r`` per item ``[B]`` (a model built with ``interval_embed``);
        ``out`` is then the average velocity over ``[r, t]``.

        Returns:
            ``(out, feats)``: ``out`` is the predicted velocity ``[B, C_out, H, W]``, or ``(velocity, cls_velocity)``
            when ``cls`` is given; ``feats`` one TokenSet per index.
        """
        take = feature_take_indices(self.num_layers, indices, type(self).__name__)
        attn_blocks = {normalize_index(int(k), self.num_layers, type(self).__name__) for k in attention}
        if 0 in attn_blocks:
            raise ValueError("attention logits exist for blocks 1..L only (0 is the embedded input)")
        h, n_prefix = self._embed(x, cls)
        c = self._condition(t, y, force_drop_ids, t_minus_r)
        keep = 0 if keep_prefix else n_prefix
        want = set(take)
        by_index: dict[int, Tensor] = {0: h[:, keep:]} if 0 in want else {}
        logits: dict[int, Tensor] = {}
        for k, block in enumerate(self.blocks, start=1):
            if k in attn_blocks:
                h, logits[k] = block(h, c, return_logits=True)
            else:
                h = block(h, c)
            if k in want:
                by_index[k] = h[:, keep:]
        feats = [TokenSet.from_dense(by_index[i]) for i in take]
        y_mod = self.final_layer.modulated(h, c)  # (B, prefix + N, D): final LayerNorm + adaLN, shared by all tokens
        out = unpatchify(self.final_layer.linear(y_mod[:, n_prefix:]), self.patch_size, self.out_channels)
        if cls is not None:
            out = (out, self.cls_head(y_mod[:, 0]))  # REG: the class token's velocity after the shared final norm
        if attention:
            return out, feats, logits
        return out, feats

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cls: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        t_minus_r: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Velocity ``[B, C_out, H, W]`` (and the class-token velocity ``[B, cls_token_dim]`` when ``cls`` is given);
        with ``t_minus_r`` (``interval_embed``) MeanFlow's average velocity over ``[r, t]``."""
        out, _ = self.forward_intermediates(x, t, y, (), cls=cls, force_drop_ids=force_drop_ids, t_minus_r=t_minus_r)
        return out


def check_labels(y: Tensor, num_classes: int, ids: Sequence[str] | None = None, what: str = "label") -> None:
    """Labels must lie in ``[0, num_classes)``.

    On the CPU the first bad label is reported with its item id; on an accelerator the check is an asynchronous
    device assertion, so a training step never waits for the device to answer it.
    """
    if y.device.type != "cpu":
        torch._assert_async(((y >= 0) & (y < num_classes)).all(), f"{what} outside [0, {num_classes})")
        return
    bad = ((y < 0) | (y >= num_classes)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        where = f" (item {ids[i]!r})" if ids is not None else ""
        raise ValueError(
            f"{what} {int(y[i])}{where} is outside [0, {num_classes}): fix the data set's labels or set "
            "task.model.num_classes"
        )


# -- presets -------------------------------------------------------------------------------------------------
#: depth, hidden size, heads of the published sizes, plus tiny CPU sizes
SIT_CONFIGS: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "tiny": dict(depth=4, hidden_size=64, num_heads=4),
}

_REGISTRY: dict[str, Callable[..., SiT]] = {}


def _make_preset(size: str, patch: int, learn_sigma: bool) -> Callable[..., SiT]:
    def build(**kwargs) -> SiT:
        args = dict(SIT_CONFIGS[size], patch_size=patch, learn_sigma=learn_sigma)
        args.update(kwargs)
        return SiT(**args)

    family = "DiT" if learn_sigma else "SiT"
    build.__name__ = f"{family.lower()}_{size.lower()}{patch}"
    build.__doc__ = f"{family}-{size}/{patch}: {SIT_CONFIGS[size]}, patch {patch}; keyword arguments override."
    return build


for _size in SIT_CONFIGS:
    for _patch in (1, 2, 4, 8):
        _REGISTRY[f"SiT-{_size}/{_patch}"] = _make_preset(_size, _patch, learn_sigma=False)
        # DiT's presets differ only in the learned variance channels
        _REGISTRY[f"DiT-{_size}/{_patch}"] = _make_preset(_size, _patch, learn_sigma=True)


def list_sit_models() -> list[str]:
    return sorted(_REGISTRY)


def create_sit(name: str, **kwargs) -> SiT:
    """Build a preset by name, e.g. ``create_sit("SiT-B/2", input_size=32, in_channels=4)``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_sit_models())}")
    return _REGISTRY[name](**kwargs)


def sit_s2(**kwargs) -> SiT:
    return create_sit("SiT-S/2", **kwargs)


def sit_b2(**kwargs) -> SiT:
    return create_sit("SiT-B/2", **kwargs)


def sit_l2(**kwargs) -> SiT:
    return create_sit("SiT-L/2", **kwargs)


def sit_xl2(**kwargs) -> SiT:
    return create_sit("SiT-XL/2", **kwargs)


def sit_tiny2(**kwargs) -> SiT:
    return create_sit("SiT-tiny/2", **kwargs)
