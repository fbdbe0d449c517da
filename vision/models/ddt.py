"""DiT^DH: a diffusion transformer with a wide, shallow denoising head conditioned per token on the trunk.

Zheng et al. 2025, "Diffusion Transformers with Representation Autoencoders" (section on DiT^DH), anchor
bytetriper/RAE ``stage2/models/DDT.py`` (``DiTwDDTHead``), after DDT (Wang et al. 2025, "Decoupled Diffusion
Transformer"). High-dimensional RAE latents (768 channels per token for DINOv2-B) need a denoiser whose width is at
least the token dimension; widening the whole trunk is expensive, so DiT^DH keeps the trunk (28 blocks at 1152 in
the anchor) and adds a head of 2 blocks at width 2048.

Data flow, per the anchor (shapes for B items, N tokens):

- trunk: the :class:`~vision.models.sit.SiT` embedding, positions and adaLN blocks on the class/time condition
  ``c = t_emb + y_emb`` -> ``h[B, N, D]``;
- head condition: ``s = SiLU(t_emb + h)`` projected to the head width ``D_h`` (one condition vector *per token*);
- head input: the noisy input embedded again by its own patch embedding at width ``D_h`` (plus fixed 2-D sin-cos
  positions here, where the anchor uses RoPE);
- head blocks: adaLN blocks whose shift/scale/gate come from ``s`` per token, then a per-token modulated final layer.

Time follows this project's convention (t = 0 data, t = 1 noise), as the trunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.intermediates import feature_take_indices, normalize_index
from unirep.tokens import TokenSet
from vision.models.sit import FinalLayer, SiT, SiTBlock, get_2d_sincos_pos_embed, unpatchify

__all__ = ["DiTDH", "ditdh_tiny", "ditdh_s", "ditdh_b", "ditdh_xl"]


class DiTDH(SiT):
    """SiT trunk + DDT head. Takes every :class:`SiT` argument plus the head's shape.

    Args:
        head_width: head hidden size ``D_h`` (the anchor: 2048 for 768-channel latents; make it >= the token size
            ``p*p*in_channels``).
        head_depth: number of head blocks (2 in the anchor).
        head_heads: attention heads of the head blocks.

    ``forward_intermediates`` indices (:mod:`unirep.intermediates`): 0 the embedded input, 1..depth the trunk blocks,
    depth+1..depth+head_depth the head blocks (``num_layers`` counts both); ``feature_dim`` is ``hidden_size`` in the
    trunk and ``head_width`` in the head.
    """

    def __init__(self, *args, head_width: int = 2048, head_depth: int = 2, head_heads: int = 16, **kwargs):
        if kwargs.get("cls_token_dim") is not None:
            raise ValueError("DiTDH does not support REG's class token (cls_token_dim); use SiT for REG")
        if kwargs.get("learn_sigma"):
            raise ValueError("DiTDH predicts a velocity only: learn_sigma must be false")
        self._head = dict(width=head_width, depth=head_depth, heads=head_heads)
        super().__init__(*args, **kwargs)

    def initialize_weights(self) -> None:
        # build the head on the first call: SiT.__init__ calls initialize_weights once all trunk modules exist
        if not hasattr(self, "head_blocks"):
            self._build_head()
        super().initialize_weights()  # xavier linears, zero adaLN of the trunk, zero final linear, ...
        w = self.x_embedder_head.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder_head.bias, 0)
        for block in self.head_blocks:  # adaLN-Zero: head blocks start as the identity
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

    def _build_head(self) -> None:
        hw, p, c = self._head["width"], self.patch_size, self.out_channels
        if hw % 4:
            raise ValueError(f"DiTDH head_width {hw} must be divisible by 4 (2-D sin-cos positions)")
        self.head_width, self.head_depth = hw, self._head["depth"]
        self.s_projector = nn.Linear(self.hidden_size, hw) if hw != self.hidden_size else nn.Identity()
        self.x_embedder_head = nn.Conv2d(self.in_channels, hw, kernel_size=p, stride=p)
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hw, self.grid_size)).float()[None]
        self.register_buffer("pos_embed_head", pos, persistent=False)  # [1, N, D_h]
        self.head_blocks = nn.ModuleList([SiTBlock(hw, self._head["heads"]) for _ in range(self._head["depth"])])
        self.final_layer = FinalLayer(hw, p * p * c)  # conditioned per token, unlike the trunk's

    @property
    def num_layers(self) -> int:
        """Trunk and head blocks: indices 1..depth are the trunk, depth+1..depth+head_depth the head."""
        return self.depth + self.head_depth

    def feature_dim(self, index: int) -> int:
        """``hidden_size`` up to the last trunk block, ``head_width`` in the head."""
        k = normalize_index(index, self.num_layers, "DiTDH")
        return self.hidden_size if k <= self.depth else self.head_width

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
    ) -> tuple[Tensor, list[TokenSet]]:
        """As :meth:`SiT.forward_intermediates`; the head's indices continue after the trunk's (see the class)."""
        if cls is not None:
            raise ValueError("DiTDH does not support REG's class token")
        if attention:
            raise ValueError("DiTDH does not return attention logits (HASTE's distillation targets SiT blocks)")
        take = feature_take_indices(self.num_layers, indices, "DiTDH")
        want = set(take)
        h, _ = self._embed(x, None)  # [B, N, D]
        t_emb = self.t_embedder(t)  # [B, D]
        c = self._condition(t, y, force_drop_ids)  # [B, D]: t_emb + y_emb
        by_index: dict[int, Tensor] = {0: h} if 0 in want else {}
        for k, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if k in want:
                by_index[k] = h
        s = self.s_projector(F.silu(t_emb[:, None] + h))  # per-token condition [B, N, D_h]
        z = self.x_embedder_head(x).flatten(2).transpose(1, 2) + self.pos_embed_head  # [B, N, D_h]
        for k, block in enumerate(self.head_blocks, start=self.depth + 1):
            z = block(z, s)
            if k in want:
                by_index[k] = z
        out = unpatchify(self.final_layer(z, s), self.patch_size, self.out_channels)
        return out, [TokenSet.from_dense(by_index[i]) for i in take]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cls: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        return self.forward_intermediates(x, t, y, (), cls=cls, force_drop_ids=force_drop_ids)[0]


def ditdh_tiny(**kw) -> DiTDH:
    """Trunk 4 x 64 (4 heads), head 2 x 128 (4 heads): CPU tests and smoke runs."""
    return DiTDH(
        **{"depth": 4, "hidden_size": 64, "num_heads": 4, "head_width": 128, "head_depth": 2, "head_heads": 4, **kw}
    )


def ditdh_s(**kw) -> DiTDH:
    """DiT^DH-S: trunk S (12 x 384), head 2 x 2048 (anchor's DiTDH-S config)."""
    return DiTDH(
        **{"depth": 12, "hidden_size": 384, "num_heads": 6, "head_width": 2048, "head_depth": 2, "head_heads": 16, **kw}
    )


def ditdh_b(**kw) -> DiTDH:
    return DiTDH(
        **{
            "depth": 12,
            "hidden_size": 768,
            "num_heads": 12,
            "head_width": 2048,
            "head_depth": 2,
            "head_heads": 16,
            **kw,
        }
    )


def ditdh_xl(**kw) -> DiTDH:
    """DiT^DH-XL: trunk 28 x 1152, head 2 x 2048 (the anchor's headline model)."""
    return DiTDH(
        **{
            "depth": 28,
            "hidden_size": 1152,
            "num_heads": 16,
            "head_width": 2048,
            "head_depth": 2,
            "head_heads": 16,
            **kw,
        }
    )
