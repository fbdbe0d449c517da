"""DDT: the decoupled diffusion transformer, a condition encoder and a velocity decoder, with encoder sharing.

Wang et al. 2025, "DDT: Decoupled Diffusion Transformer" (arXiv 2504.05741); anchor MCG-NJU/DDT
``src/models/denoiser/decoupled_improved_dit.py`` (``DDT``, ``DDTBlock``, ``RAttention``, ``FeedForward``,
``precompute_freqs_cis_2d``), ``src/diffusion/stateful_flow_matching/sampling.py`` (uniform sharing:
``state_refresh_rate``), ``src/diffusion/stateful_flow_matching/sharing_sampling.py`` (``sharing_dp``: the statistic
and dynamic-programming schedule) and ``src/diffusion/stateful_flow_matching/training_repa.py`` (REPA on the encoder,
``align_layer=8`` of the 22 encoder blocks of DDT-XL/2, weight 0.5).

Data flow, per the anchor (B items, N tokens, width D):

- condition ``c = SiLU(t_emb + y_emb)`` ``[B, 1, D]``;
- **condition encoder**: the noisy input's patches embedded (``s_embedder``) -> ``num_encoder_blocks`` blocks
  modulated by ``c`` -> the self-condition ``z_t = SiLU(t_emb + s)`` ``[B, N, D]``, one condition vector per token;
- **velocity decoder**: the same patches embedded again (``x_embedder``) -> the remaining blocks modulated per token
  by ``z_t`` -> a final layer modulated by ``z_t`` -> velocity.

The blocks are the anchor's "improved DiT" blocks: RMSNorm (learnable scale, eps 1e-6) instead of LayerNorm, SwiGLU
MLP of hidden ``int(2/3 * 4 D)`` without biases, attention without qkv bias, RMSNorm on q and k per head, 2-D rotary
position embedding (positions ``linspace(0, 16, grid)`` on each axis, half the rotary pairs for x, half for y,
interleaved), no absolute positions; the adaLN projections are a Linear on the already-activated condition. The
timestep embedding uses ``max_period=10`` as the anchor. Initialisation as the anchor: Xavier on both patch
embeddings, std 0.02 for the label table and the t-MLP, zero final layer; the blocks keep PyTorch's default init
(the anchor neither Xavier-initialises them nor zeroes their adaLN).

**Encoder sharing** (the paper's section on inference): ``z_t`` changes slowly along the trajectory, so the decoder can
reuse the encoder's output of an earlier step. :meth:`DDT.make_sampler_state` returns a stateful velocity function
(:class:`EncoderSharing`) that recomputes the encoder only on the steps of a schedule and counts encoder and decoder
evaluations (NFE): ``uniform`` recomputes every K-th step (the anchor's ``i % state_refresh_rate == 0``); ``dp``
runs one calibration trajectory of 8 template samples (seed 0) with the encoder recomputed at every step, takes the
mean cosine similarity of the encoder outputs of every pair of steps (over items and tokens), and chooses the
``steps // K`` recompute steps that minimise the summed ``1 - similarity`` of the reused states
(:func:`sharing_dp_schedule`, the anchor's dynamic programme; step 0 is always recomputed).

Time follows this project's convention (t = 0 data, t = 1 noise); the anchor's is the reverse (t = 1 data). The
network embeds the project's t; DDT's sampler settings convert as: its guidance interval (0.3, 1.0] in data time is
[0, 0.7) in noise time, its ``last_step=0.04`` is the SDE's end time. Sizes (paper, table 1): DDT-B/2 12 blocks = 8
encoder + 4 decoder at 768, L/2 20 + 4 at 1024, XL/2 22 + 6 at 1152 (16 heads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.intermediates import feature_take_indices, normalize_index
from unirep.nn import timestep_embedding
from unirep.tokens import TokenSet
from vision.models.sit import LabelEmbedder, SiT, check_labels, patchify, unpatchify

__all__ = [
    "DDT",
    "DDTBlock",
    "EncoderSharing",
    "rope_angles_2d",
    "apply_rope",
    "sharing_cost",
    "sharing_dp_schedule",
    "sharing_brute_force",
    "uniform_schedule",
    "ddt_tiny",
    "ddt_b2",
    "ddt_l2",
    "ddt_xl2",
]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def rope_angles_2d(head_dim: int, height: int, width: int, extent: float = 16.0, theta: float = 10000.0) -> Tensor:
    """Rotation angles ``[H*W, head_dim/2]`` of DDT's 2-D rotary embedding (row-major token order).

    ``head_dim/4`` frequencies ``theta^(-4k/head_dim)``; token positions ``linspace(0, extent, W)`` (x) and
    ``linspace(0, extent, H)`` (y); rotary pair ``2k`` turns by ``x f_k`` and pair ``2k + 1`` by ``y f_k``.
    """
    if head_dim % 4:
        raise ValueError(f"DDT's 2-D rotary embedding needs a head dimension divisible by 4, got {head_dim}")
    freqs = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64)[: head_dim // 4] / head_dim)  # [Dh/4]
    ys, xs = torch.meshgrid(
        torch.linspace(0, extent, height, dtype=torch.float64),
        torch.linspace(0, extent, width, dtype=torch.float64),
        indexing="ij",
    )
    ax = xs.reshape(-1, 1) * freqs  # [N, Dh/4]
    ay = ys.reshape(-1, 1) * freqs
    return torch.stack([ax, ay], dim=-1).reshape(height * width, head_dim // 2).float()  # x, y interleaved


def apply_rope(q: Tensor, angles: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of ``q[B, H, N, Dh]`` by ``angles[N, Dh/2]`` (computed in float32)."""
    qf = q.float().reshape(*q.shape[:-1], -1, 2)  # [B, H, N, Dh/2, 2]
    cos, sin = angles.cos(), angles.sin()
    a, b = qf[..., 0], qf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(q.dtype)


class RoPEAttention(nn.Module):
    """Self-attention without qkv bias, RMSNorm on q and k per head, 2-D rotary positions, SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DDT hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, angles: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, N, Dh]
        q, k = apply_rope(self.q_norm(q), angles), apply_rope(self.k_norm(k), angles)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """``w2(SiLU(w1 x) * w3 x)`` with hidden ``int(2/3 * hidden)``, no biases (the anchor's ``FeedForward``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DDTBlock(nn.Module):
    """adaLN block (shift/scale/gate for attention and MLP) on an activated condition ``c[B, 1|N, D]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden_size, eps=1e-6)
        self.attn = RoPEAttention(hidden_size, num_heads)
        self.norm2 = nn.RMSNorm(hidden_size, eps=1e-6)
        self.mlp = SwiGLU(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, x: Tensor, c: Tensor, angles: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), angles)
        return x + gate_mlp * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class DDTFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DDT(nn.Module):
    """Decoupled diffusion transformer: condition encoder + velocity decoder.

    Args:
        input_size, patch_size, in_channels: the square input ``[B, C, H, H]`` and its patches.
        hidden_size, num_heads, mlp_ratio: width of every block (encoder and decoder share it, as the anchor).
        depth: total blocks; ``num_encoder_blocks`` of them form the encoder, the rest the decoder.
        num_classes, class_dropout_prob: label table with a null class (index ``num_classes``) and label dropout
            (the anchor's trainer drops 10 %); 0 classes: unconditional.
        sharing, sharing_rate: encoder sharing at sampling (``"none"``, ``"uniform"``, ``"dp"``) and its K (the
            anchor's ``state_refresh_rate``); :meth:`make_sampler_state` reads them unless told otherwise.

    ``forward_intermediates`` indices (:mod:`unirep.intermediates`): 0 the encoder's embedded input, 1..E the encoder
    blocks (REPA aligns one of them, as DDT does), E+1..depth the decoder blocks.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_encoder_blocks: int = 22,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        sharing: str = "none",
        sharing_rate: int = 1,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"DDT input_size {input_size} is not divisible by patch_size {patch_size}")
        if not 1 <= num_encoder_blocks < depth:
            raise ValueError(
                f"DDT needs 1 <= num_encoder_blocks < depth (at least one decoder block), got "
                f"num_encoder_blocks={num_encoder_blocks}, depth={depth}"
            )
        _check_sharing(sharing, sharing_rate)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels
        self.hidden_size, self.depth, self.num_encoder_blocks = hidden_size, depth, num_encoder_blocks
        self.num_heads, self.num_classes = num_heads, num_classes
        self.sharing, self.sharing_rate = sharing, int(sharing_rate)
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        token = patch_size * patch_size * in_channels
        self.s_embedder = nn.Linear(token, hidden_size)  # the encoder's patch embedding
        self.x_embedder = nn.Linear(token, hidden_size)  # the decoder's patch embedding
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DDTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = DDTFinalLayer(hidden_size, token)
        angles = rope_angles_2d(hidden_size // num_heads, self.grid_size, self.grid_size)
        self.register_buffer("rope", angles, persistent=False)  # [N, Dh/2]
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for emb in (self.s_embedder, self.x_embedder):
            nn.init.xavier_uniform_(emb.weight)
            nn.init.constant_(emb.bias, 0)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        for p in (self.final_layer.adaLN_modulation, self.final_layer.linear):
            nn.init.constant_(p.weight, 0)
            nn.init.constant_(p.bias, 0)

    # -- the intermediates contract ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """All blocks: 1..E the encoder, E+1..depth the decoder."""
        return self.depth

    def feature_dim(self, index: int) -> int:
        normalize_index(index, self.num_layers, "DDT")
        return self.hidden_size

    # the training-time label-dropout mask [B]: SiT's (it reads only self.y_embedder and self.training)
    sample_label_drop = SiT.sample_label_drop

    def _t_emb(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t.float().reshape(-1), 256, max_period=10.0)  # DDT: max_period 10
        return self.t_mlp(freq.to(self.t_mlp[0].weight.dtype))[:, None]  # [B, 1, D]

    def _tokens(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"DDT expects input [B, {self.in_channels}, {self.input_size}, {self.input_size}], got {tuple(x.shape)}"
            )
        return patchify(x, self.patch_size)  # [B, N, p*p*C]

    def encode(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        keep: Sequence[int] = (),
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """The condition encoder: ``z_t = SiLU(t_emb + s)`` ``[B, N, D]`` and the hidden states at ``keep``."""
        tokens = self._tokens(x)
        t_emb = self._t_emb(t)
        c = t_emb
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DDT is class-conditional (num_classes > 0): pass labels y")
            check_labels(y, self.num_classes + 1, what="DDT label")
            c = c + self.y_embedder(y, self.training, force_drop_ids)[:, None]
        c = F.silu(c)  # [B, 1, D]
        s = self.s_embedder(tokens)
        want = set(keep)
        feats = {0: s} if 0 in want else {}
        for k in range(1, self.num_encoder_blocks + 1):
            s = self.blocks[k - 1](s, c, self.rope)
            if k in want:
                feats[k] = s
        return F.silu(t_emb + s), feats

    def decode(self, x: Tensor, z: Tensor, keep: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """The velocity decoder on the noisy input ``x`` conditioned per token on ``z[B, N, D]``."""
        h = self.x_embedder(self._tokens(x))
        want = set(keep)
        feats: dict[int, Tensor] = {}
        for k in range(self.num_encoder_blocks + 1, self.depth + 1):
            h = self.blocks[k - 1](h, z, self.rope)
            if k in want:
                feats[k] = h
        out = unpatchify(self.final_layer(h, z), self.patch_size, self.out_channels)
        return out, feats

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
        """Velocity ``[B, C, H, W]`` and the hidden tokens at ``indices`` (see the class for the numbering)."""
        if cls is not None:
            raise ValueError("DDT does not support REG's class token (cls_token_dim); use SiT for REG")
        if attention:
            raise ValueError("DDT does not return attention logits (HASTE's distillation targets SiT blocks)")
        take = feature_take_indices(self.num_layers, indices, "DDT")
        z, feats = self.encode(x, t, y, force_drop_ids, keep=take)
        out, dec = self.decode(x, z, keep=take)
        feats.update(dec)
        return out, [TokenSet.from_dense(feats[i]) for i in take]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cls: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        return self.forward_intermediates(x, t, y, (), cls=cls, force_drop_ids=force_drop_ids)[0]

    # -- encoder sharing at sampling -----------------------------------------------------------------------------
    def make_sampler_state(
        self,
        steps: int,
        shift: float = 1.0,
        sampler: str = "euler",
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        sharing: str | None = None,
        sharing_rate: int | None = None,
        calibration_size: int = 8,
    ) -> EncoderSharing:
        """A stateful velocity function ``fn(x, t, y)`` for one sampling run (what ``VisionFlowTask.generate`` calls).

        ``sharing`` / ``sharing_rate`` default to the model's. ``"none"`` recomputes the encoder at every call;
        ``"uniform"`` on steps ``0, K, 2K, ...``; ``"dp"`` on the ``steps // K`` steps :func:`sharing_dp_schedule`
        picks from one calibration run (``calibration_size`` template samples, seed 0, the same sampler and guidance).
        """
        mode = self.sharing if sharing is None else sharing
        rate = self.sharing_rate if sharing_rate is None else int(sharing_rate)
        _check_sharing(mode, rate)
        if mode == "none" or rate == 1:
            return EncoderSharing(self, None)
        if mode == "uniform":
            return EncoderSharing(self, uniform_schedule(steps, rate))
        sim = self.calibrate_sharing(steps, shift, sampler, cfg_scale, guidance_interval, calibration_size)
        n_steps = sim.shape[0]
        return EncoderSharing(self, sharing_dp_schedule(1.0 - sim, max(n_steps // rate, 1)))

    @torch.no_grad()
    def calibrate_sharing(
        self,
        steps: int,
        shift: float = 1.0,
        sampler: str = "euler",
        cfg_scale: float = 1.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        num: int = 8,
    ) -> Tensor:
        """Mean cosine similarity ``[S, S]`` of the encoder outputs of every pair of sampling steps (float64).

        One trajectory of ``num`` template samples (noise and labels from seed 0) with the encoder recomputed at
        every step, as the anchor's ``sharing_dp``; averaged over items and tokens. Under guidance the conditional
        half of the doubled batch is compared, so steps inside and outside the guidance interval are comparable.
        """
        from unirep.flow import cfg_batched, sample_ode, sample_sde

        gen = torch.Generator().manual_seed(0)
        p = next(self.parameters())
        shape = (self.in_channels, self.input_size, self.input_size)
        noise = torch.randn(num, *shape, generator=gen).to(p.device, p.dtype)
        y = torch.randint(0, max(self.num_classes, 1), (num,), generator=gen).to(p.device)
        state = EncoderSharing(self, None, record=True)

        def model_fn(xx: Tensor, t: Tensor, yy: Tensor) -> Tensor:
            return state(xx, t, yy if self.num_classes > 0 else None)

        if self.num_classes > 0:
            vel = cfg_batched(model_fn, y, self.num_classes, cfg_scale, tuple(guidance_interval))
        else:

            def vel(xx: Tensor, t: Tensor) -> Tensor:
                return model_fn(xx, t, y)

        was_training = self.training
        self.eval()
        try:
            if sampler == "sde":
                sample_sde(vel, noise, steps=steps, shift=shift, generator=torch.Generator().manual_seed(0))
            else:
                sample_ode(vel, noise, steps=steps, method=sampler, shift=shift)
        finally:
            self.train(was_training)
        states = torch.stack([F.normalize(s[:num].double().flatten(0, 1), dim=-1) for s in state.recorded])
        return torch.einsum("itd,jtd->ij", states, states) / states.shape[1]  # [S, S]


def _check_sharing(mode: str, rate: int) -> None:
    if mode not in ("none", "uniform", "dp"):
        raise ValueError(f"DDT encoder sharing must be 'none', 'uniform' or 'dp', got {mode!r}")
    if int(rate) < 1:
        raise ValueError(f"DDT sharing_rate (K: recompute the encoder every K steps) must be >= 1, got {rate}")


class EncoderSharing:
    """A stateful velocity function ``fn(x, t, y) -> v`` that reuses the DDT encoder's output across steps.

    The sampling step is counted from the calls: a call at a new time starts a new step (Heun's corrector at
    ``t_{i+1}`` belongs to step i + 1, as its next predictor does). On a step in ``recompute`` (``None``: every step)
    the encoder runs; otherwise the last encoder output is reused (its time embedding included, as the anchor). A
    batch of a size the cache does not hold (guidance switching on inside its interval doubles it) is encoded anew
    and counted; the conditional first half of a cached doubled batch serves an unguided call. :attr:`nfe` counts
    network evaluations (calls, whatever their batch size): ``encoder`` and ``decoder``.
    """

    def __init__(self, model: DDT, recompute: Sequence[int] | None, record: bool = False):
        self.model = model
        self.recompute = None if recompute is None else sorted({int(i) for i in recompute})
        self._recompute = None if recompute is None else set(self.recompute)
        self.record = record
        self.recorded: list[Tensor] = []
        self.encoder_calls = 0
        self.decoder_calls = 0
        self.reset()

    def reset(self) -> EncoderSharing:
        """Forget the cached encoder output and the step count (a new batch); the NFE counters keep counting."""
        self.step = -1
        self._last_t: float | None = None
        self._cache: dict[int, Tensor] = {}
        self._fresh_step = -1
        return self

    @property
    def nfe(self) -> dict[str, int]:
        return {"encoder": self.encoder_calls, "decoder": self.decoder_calls}

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t_now = float(t.reshape(-1)[0])
        if t_now != self._last_t:
            self.step, self._last_t = self.step + 1, t_now
        n = x.shape[0]
        if (self._recompute is None or self.step in self._recompute) and self._fresh_step != self.step:
            self._cache, self._fresh_step = {}, self.step  # a recompute step: the cached states are stale
        z = self._cache.get(n)
        if z is None and 2 * n in self._cache:
            z = self._cache[2 * n][:n]  # the conditional half of a guided batch (cfg_batched puts it first)
        if z is None:
            z, _ = self.model.encode(x, t, y)
            self.encoder_calls += 1
            if self.record:
                self.recorded.append(z)
        self._cache[n] = z
        v, _ = self.model.decode(x, z)
        self.decoder_calls += 1
        return v


# -- schedules ----------------------------------------------------------------------------------------------------
def uniform_schedule(steps: int, rate: int) -> list[int]:
    """Recompute steps ``0, K, 2K, ...`` below ``steps`` (the anchor's ``i % state_refresh_rate == 0``)."""
    return list(range(0, steps, rate))


def sharing_cost(error: Tensor | Sequence[Sequence[float]], starts: Sequence[int]) -> float:
    """Total error of a schedule: step i reuses the state of the last recompute step j <= i at cost ``error[i][j]``.

    ``error[i][j] = 1 - similarity(z_i, z_j)``; a recomputed step costs ``error[j][j]`` (0 for a similarity).
    """
    e = torch.as_tensor(error, dtype=torch.float64)
    s = sorted(starts)
    if not s or s[0] != 0:
        raise ValueError(f"a sharing schedule must recompute step 0, got {list(starts)}")
    bounds = [*s, e.shape[0]]
    return float(sum(e[i, j] for j, end in zip(s, bounds[1:], strict=False) for i in range(j, end)))


def sharing_dp_schedule(error: Tensor | Sequence[Sequence[float]], num_recompute: int) -> list[int]:
    """The ``num_recompute`` recompute steps (step 0 among them) that minimise :func:`sharing_cost`.

    DDT's dynamic programme (``sharing_dp``): ``best[m][e]`` is the least cost of covering steps ``0..e-1`` with m
    segments, each segment starting at a recompute step and reusing its state; the last segment of
    ``best[m][e]`` starts at the j that minimises ``best[m-1][j] + cost(j, e)``. O(M S^2) with prefix sums.
    """
    e = torch.as_tensor(error, dtype=torch.float64)
    n = e.shape[0]
    if e.shape != (n, n):
        raise ValueError(f"the error matrix must be square [steps, steps], got {tuple(e.shape)}")
    m = int(num_recompute)
    if not 1 <= m <= n:
        raise ValueError(f"num_recompute must be in 1..{n} (the number of steps), got {m}")
    # seg[j][end] = sum_{i=j}^{end-1} e[i][j]: steps j..end-1 reuse step j's state
    cum = torch.cat([torch.zeros(1, n, dtype=torch.float64), e.cumsum(0)])  # cum[k][j] = sum_{i<k} e[i][j]
    seg = [[float(cum[end, j] - cum[j, j]) for end in range(n + 1)] for j in range(n)]
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(m + 1)]
    back = [[-1] * (n + 1) for _ in range(m + 1)]
    for end in range(1, n + 1):
        best[1][end], back[1][end] = seg[0][end], 0
    for k in range(2, m + 1):
        for end in range(k, n + 1):
            for j in range(k - 1, end):
                v = best[k - 1][j] + seg[j][end]
                if v < best[k][end]:
                    best[k][end], back[k][end] = v, j
    starts, end = [], n
    for k in range(m, 0, -1):
        j = back[k][end]
        starts.append(j)
        end = j
    return sorted(starts)


def sharing_brute_force(error: Tensor | Sequence[Sequence[float]], num_recompute: int) -> tuple[list[int], float]:
    """The optimum of :func:`sharing_cost` over every schedule of ``num_recompute`` steps with step 0 (tests)."""
    n = len(error)
    best: tuple[list[int], float] = ([], float("inf"))
    for rest in combinations(range(1, n), num_recompute - 1):
        c = sharing_cost(error, (0, *rest))
        if c < best[1]:
            best = ([0, *rest], c)
    return best


# -- presets ------------------------------------------------------------------------------------------------------
def _preset(depth: int, enc: int, width: int, heads: int) -> Callable[..., DDT]:
    def build(**kw) -> DDT:
        return DDT(**{"depth": depth, "num_encoder_blocks": enc, "hidden_size": width, "num_heads": heads, **kw})

    return build


def ddt_tiny(**kw) -> DDT:
    """4 blocks (3 encoder + 1 decoder) at 64, 4 heads: CPU tests and smoke runs."""
    return _preset(4, 3, 64, 4)(**kw)


def ddt_b2(**kw) -> DDT:
    """DDT-B/2: 8 encoder + 4 decoder blocks at 768, 12 heads, patch 2."""
    return _preset(12, 8, 768, 12)(**{"patch_size": 2, **kw})


def ddt_l2(**kw) -> DDT:
    """DDT-L/2: 20 encoder + 4 decoder blocks at 1024, 16 heads, patch 2."""
    return _preset(24, 20, 1024, 16)(**{"patch_size": 2, **kw})


def ddt_xl2(**kw) -> DDT:
    """DDT-XL/2: 22 encoder + 6 decoder blocks at 1152, 16 heads, patch 2 (the anchor's headline config)."""
    return _preset(28, 22, 1152, 16)(**{"patch_size": 2, **kw})
