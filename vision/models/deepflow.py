"""DeepFlow: a SiT with velocity heads after intermediate blocks (deep supervision) and VeRA blocks between branches.

Shin et al. 2025, "Deeply Supervised Flow-Based Generative Models" (ICCV 2025, arXiv 2503.14494); anchor
ByteDance-Seed/DeepFlow ``models/deepflow.py`` (``DeepFlow``: ``df_process``, ``process_multi_times``),
``models/blocks.py`` (``DeepFlowBlock``, ``velocity_modulation``, ``CrossAttentionBlock``, ``build_acc_mlp``,
``DynLayer``), ``loss.py`` (``DFLoss``) and ``script/{base,xlarge}/train.sh`` (the defaults).

The transformer is split into branches at the blocks ``df_idxs`` (B/2: 12 blocks, ``[6]``; XL/2: 24 blocks,
``[8, 16]``). Branch k is conditioned on its own time ``t_k``: ``c_k = t_emb(t_k) + y_emb``. After the last block of a
branch:

- an intermediate velocity head (one ``FinalLayer`` shared by all intermediate branches, as the anchor's
  ``final_layer[0]``) predicts ``v_k`` from the hidden tokens ``h`` under ``c_k``;
- the **VeRA block** (velocity refiner with acceleration): an acceleration feature ``a = MLP(h)`` (D -> P -> 2P -> P
  -> D, SiLU, P = 2048); ``[h, a]`` (2D) LayerNorm-ed and adaLN-modulated by the embedding of the time gap
  ``t_{k+1} - t_k`` (width 2D), then an MLP 2D -> 2D -> D; then cross-space attention whose queries are the embedded
  noisy input (patch embedding + positions) and whose keys/values are the refined tokens, both through one affine
  LayerNorm, with a residual on the normalised queries. Its output is the next branch's input (and what
  ``forward_intermediates`` returns at index ``df_idx``, where the anchor's REPA projectors read);
- an acceleration head (one ``FinalLayer`` shared by all branches, zero-initialised) maps ``a`` to pixels under
  ``c_k``. The last block is followed by the final velocity head, which is the only one used at sampling.

Training (``DFLoss``): the first branch sees the sampled time ``t``; each following branch's time moves by
``U(0, 1) * beta`` per item (``beta = tg_upper_bound = 0.01``), up or down for the whole batch with probability 1/2,
clamped to [0, 1]. Every head regresses the same flow target ``eps - x`` (the linear path's velocity does not depend
on t): the final head through the task's flow loss (weight 1), the intermediate heads with ``deep_weights`` (0.2
each). The acceleration loss of branch k moves ``x_{t_k}`` (the same data and noise at ``t_k``) to t = 0 with
``x_{t_k} - t_k sg(v_k) + t_k^2 a_k / 2`` and regresses the data, weight ``acc_weight`` (1.0). At sampling every branch
gets the same t (time gap 0). :meth:`DeepFlow.auxiliary_losses` returns these extra losses for the task, which logs
them as ``loss/deep/<block>`` and ``loss/acc/<block>``.

Time convention: DeepFlow's, which is this project's (t = 0 data, t = 1 noise, velocity ``eps - x``). Defaults from
the anchor's scripts: logit-normal times (its ``lognormal`` weighting, ``sigma / (1 + sigma)`` with
``log sigma ~ N(0, 1)``, that is ``sigmoid(N(0, 1))``), no scale clamp in the modulation (``legacy_scaling`` off
without REPA), REPA off (``--ssl-align`` adds it at weight 0.5 on the VeRA outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from unirep.intermediates import feature_take_indices
from unirep.tokens import TokenSet
from vision.models.sit import SIT_CONFIGS, FinalLayer, SiT, TimestepEmbedder, check_labels, modulate, unpatchify

__all__ = ["DeepFlow", "VeRABlock", "deepflow_tiny", "deepflow_b2", "deepflow_xl2"]


class VeRABlock(nn.Module):
    """Velocity refiner with acceleration: ``(h, x_embed, gap_emb) -> (acceleration feature, next branch input)``.

    Args:
        hidden_size: D, the width of the trunk.
        acc_hidden_dim: P, the acceleration MLP's width (the anchor's ``projector_dim``, 2048).
        num_heads: heads of the cross-space attention.
        legacy_scaling: clamp the modulation's scale to [-5, 5] (the anchor's ``--legacy-scaling``, used with REPA).
    """

    def __init__(self, hidden_size: int, acc_hidden_dim: int = 2048, num_heads: int = 16, legacy_scaling: bool = False):
        super().__init__()
        d, p = hidden_size, acc_hidden_dim
        self.acc_mlp = nn.Sequential(
            nn.Linear(d, p), nn.SiLU(), nn.Linear(p, 2 * p), nn.SiLU(), nn.Linear(2 * p, p), nn.SiLU(), nn.Linear(p, d)
        )
        self.mod_norm = nn.LayerNorm(2 * d, elementwise_affine=False, eps=1e-6)
        self.mod_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(2 * d, 4 * d))  # shift, scale from the time-gap embedding
        self.mod_fc1 = nn.Linear(2 * d, 2 * d)
        self.mod_act = nn.GELU(approximate="tanh")
        self.mod_fc2 = nn.Linear(2 * d, d)
        self.cross_norm = nn.LayerNorm(d)  # one affine LayerNorm for queries and keys/values, as the anchor
        self.cross_attn = nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.legacy_scaling = legacy_scaling

    def forward(self, h: Tensor, x_embed: Tensor, gap_emb: Tensor) -> tuple[Tensor, Tensor]:
        """``h[B, N, D]`` the branch's tokens, ``x_embed[B, N, D]`` the embedded noisy input, ``gap_emb[B, 2D]``."""
        acc = self.acc_mlp(h)  # [B, N, D]
        shift, scale = self.mod_adaLN(gap_emb).chunk(2, dim=-1)  # [B, 2D] each
        if self.legacy_scaling:
            scale = scale.clamp(-5, 5)
        r = modulate(self.mod_norm(torch.cat([h, acc], dim=-1)), shift, scale)  # [B, N, 2D]
        r = self.mod_fc2(self.mod_act(self.mod_fc1(r)))  # refined velocity feature [B, N, D]
        q, kv = self.cross_norm(x_embed), self.cross_norm(r)
        return acc, q + self.cross_attn(q, kv, kv, need_weights=False)[0]


class DeepFlow(SiT):
    """SiT + deep supervision + VeRA. Takes every :class:`SiT` argument (REG's class token excepted) plus:

    Args:
        df_idxs: the blocks (1..depth-1) after which a branch ends (B/2: ``[6]``, XL/2: ``[8, 16]``).
        acc_hidden_dim: the VeRA acceleration MLP's width P (2048).
        tg_upper_bound: beta, the largest time gap between consecutive branches in training (0.01).
        deep_weights: the loss weight of each intermediate head (the anchor's ``--scale-weight`` without the final
            1.0: 0.2 each); one number is used for every head.
        acc_weight: the acceleration loss weight (the anchor's ``--acc-coeff``, 1.0).
        legacy_scaling: see :class:`VeRABlock`.

    ``forward_intermediates`` indices are the SiT's: 0 the embedded input, k the output of block k, where the output
    of a block in ``df_idxs`` is the VeRA block's output (the next branch's input).
    """

    def __init__(
        self,
        *args: Any,
        df_idxs: Sequence[int] = (6,),
        acc_hidden_dim: int = 2048,
        tg_upper_bound: float = 0.01,
        deep_weights: float | Sequence[float] = 0.2,
        acc_weight: float = 1.0,
        legacy_scaling: bool = False,
        **kwargs: Any,
    ):
        if kwargs.get("cls_token_dim") is not None:
            raise ValueError("DeepFlow does not support REG's class token (cls_token_dim); use SiT for REG")
        if kwargs.get("learn_sigma") or kwargs.get("interval_embed"):
            raise ValueError(
                "DeepFlow predicts an instantaneous velocity: learn_sigma and interval_embed must be false"
            )
        super().__init__(*args, **kwargs)
        idxs = [int(k) for k in df_idxs]
        if not idxs or sorted(set(idxs)) != idxs or idxs[0] < 1 or idxs[-1] >= self.depth:
            raise ValueError(
                f"DeepFlow df_idxs must be increasing blocks in 1..{self.depth - 1} (depth {self.depth}), got {idxs}"
            )
        weights = [float(deep_weights)] * len(idxs) if isinstance(deep_weights, int | float) else list(deep_weights)
        if len(weights) != len(idxs):
            raise ValueError(f"DeepFlow deep_weights needs one weight per df_idx ({len(idxs)}), got {weights}")
        if tg_upper_bound < 0 or acc_weight < 0 or min(weights) < 0:
            raise ValueError("DeepFlow tg_upper_bound, acc_weight and deep_weights must be >= 0")
        self.df_idxs, self.deep_weights = idxs, weights
        self.tg_upper_bound, self.acc_weight = float(tg_upper_bound), float(acc_weight)
        d, c_out = self.hidden_size, self.patch_size**2 * self.out_channels
        self.gap_embedder = TimestepEmbedder(2 * d)  # the anchor's dt_embedder
        self.vera = nn.ModuleList([VeRABlock(d, acc_hidden_dim, self.num_heads, legacy_scaling) for _ in idxs])
        self.inter_head = FinalLayer(d, c_out)  # shared by the intermediate branches (final_layer[0])
        self.acc_head = FinalLayer(d, c_out)  # shared by all branches (final_acc_layer)
        self._train_pass: dict[str, Any] | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        super().initialize_weights()  # Xavier linears (VeRA's too), frozen positions, zero adaLN and final head
        if not hasattr(self, "vera"):  # SiT.__init__ calls this before the DeepFlow parts exist
            return
        nn.init.normal_(self.gap_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.gap_embedder.mlp[2].weight, std=0.02)
        for head in (self.inter_head, self.acc_head):  # zero heads, as the anchor's final layers
            for lin in (head.adaLN_modulation[-1], head.linear):
                nn.init.constant_(lin.weight, 0)
                nn.init.constant_(lin.bias, 0)
        for block in self.vera:
            nn.init.constant_(block.mod_adaLN[-1].weight, 0)
            nn.init.constant_(block.mod_adaLN[-1].bias, 0)
            nn.init.xavier_uniform_(block.cross_attn.in_proj_weight)
            nn.init.constant_(block.cross_attn.in_proj_bias, 0)

    def __getstate__(self) -> dict[str, Any]:
        # a deepcopy (an EMA copy) must not carry the last pass's graph
        return {**self.__dict__, "_train_pass": None}

    @property
    def num_branches(self) -> int:
        return len(self.df_idxs) + 1

    def branch_times(self, t: Tensor) -> list[Tensor]:
        """Training times of the branches: ``t``, then steps of ``U(0, 1) * beta`` per item, one direction per batch."""
        sign = 1.0 if torch.rand(()) < 0.5 else -1.0
        times = [t]
        for _ in self.df_idxs:
            gap = torch.rand(t.shape, device=t.device, dtype=t.dtype) * self.tg_upper_bound
            times.append((times[-1] + sign * gap).clamp(0.0, 1.0))
        return times

    def forward_branches(
        self,
        x: Tensor,
        times: Sequence[Tensor],
        y: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        indices: int | Sequence[int] | None = (),
    ) -> tuple[list[Tensor], list[Tensor], list[TokenSet]]:
        """Every head: velocities ``[v_1, ..., v_K]`` (the last is the final head's), accelerations ``[a_1..a_{K-1}]``
        (``[B, C, H, W]`` each) and the hidden tokens at ``indices``; branch k is conditioned on ``times[k]``."""
        if len(times) != self.num_branches:
            raise ValueError(f"DeepFlow has {self.num_branches} branches: pass as many times, got {len(times)}")
        take = feature_take_indices(self.num_layers, indices, type(self).__name__)
        want = set(take)
        x_embed, _ = self._embed(x, None)  # [B, N, D], the cross-space attention's queries
        y_emb = 0.0
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DeepFlow is class-conditional (num_classes > 0): pass labels y")
            check_labels(y, self.num_classes + 1, what="DeepFlow label")  # num_classes itself is the null class
            y_emb = self.y_embedder(y, self.training, force_drop_ids)  # dropped once for all branches
        conds = [self.t_embedder(tk) + y_emb for tk in times]  # [B, D] per branch
        velocities, accelerations = [], []
        by_index: dict[int, Tensor] = {0: x_embed} if 0 in want else {}
        h, branch = x_embed, 0
        for k, block in enumerate(self.blocks, start=1):
            h = block(h, conds[branch])
            if branch < len(self.df_idxs) and k == self.df_idxs[branch]:
                c = conds[branch]
                velocities.append(self.inter_head(h, c))
                gap = self.gap_embedder(times[branch + 1] - times[branch])  # [B, 2D]
                acc, h = self.vera[branch](h, x_embed, gap)
                accelerations.append(self.acc_head(acc, c))
                branch += 1
            if k in want:
                by_index[k] = h
        velocities.append(self.final_layer(h, conds[-1]))
        p, c_out = self.patch_size, self.out_channels
        return (
            [unpatchify(v, p, c_out) for v in velocities],
            [unpatchify(a, p, c_out) for a in accelerations],
            [TokenSet.from_dense(by_index[i]) for i in take],
        )

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
        """The final head's velocity and the hidden tokens at ``indices``.

        In training mode (with gradients) the branch times are drawn (:meth:`branch_times`) and the intermediate
        heads' outputs are kept for :meth:`auxiliary_losses`; otherwise every branch sees ``t`` (the anchor's
        sampling).
        """
        if cls is not None:
            raise ValueError("DeepFlow does not support REG's class token")
        if attention:
            raise ValueError("DeepFlow does not return attention logits (HASTE's distillation targets SiT blocks)")
        train = self.training and torch.is_grad_enabled()
        times = self.branch_times(t) if train else [t] * self.num_branches
        vs, accs, feats = self.forward_branches(x, times, y, force_drop_ids, indices)
        self._train_pass = {"x_t": x, "times": times, "v": vs[:-1], "a": accs} if train else None
        return vs[-1], feats

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cls: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        """The final head's velocity ``[B, C, H, W]`` (every branch at ``t`` outside training)."""
        return self.forward_intermediates(x, t, y, (), cls=cls, force_drop_ids=force_drop_ids)[0]

    def auxiliary_losses(self, sample: Any) -> dict[str, tuple[Tensor, float]]:
        """Deep supervision and acceleration losses of the last training pass: ``name -> (loss, weight)``.

        ``sample`` is that pass's :class:`unirep.flow.FlowSample` (data ``x``, noise ``eps``, ``x_t``, target
        ``eps - x``); names are ``deep/<block>`` and ``acc/<block>``, block the ``df_idx`` the head follows.
        """
        run = self._train_pass
        if run is None:
            return {}
        if run["x_t"] is not sample.x_t:
            raise RuntimeError(
                "DeepFlow.auxiliary_losses: the flow sample is not the input of the last training pass; call it "
                "right after the forward it belongs to"
            )
        self._train_pass = None
        out: dict[str, tuple[Tensor, float]] = {}
        x0 = sample.x.float()
        for k, block in enumerate(self.df_idxs):
            v, a, tk = run["v"][k].float(), run["a"][k].float(), run["times"][k]
            out[f"deep/{block}"] = ((v - sample.target.float()).square().mean(), self.deep_weights[k])
            dt = (-tk.float()).reshape(-1, *([1] * (x0.dim() - 1)))  # from t_k to t = 0
            x_tk = sample.at(tk).float()  # the same data and noise at the branch's time
            x_pred = x_tk + v.detach() * dt + 0.5 * a * dt.square()
            out[f"acc/{block}"] = ((x_pred - x0).square().mean(), self.acc_weight)
        return out


def _deepflow(size: str, **kw: Any) -> DeepFlow:
    return DeepFlow(**{**SIT_CONFIGS[size], **kw})


def deepflow_tiny(**kw: Any) -> DeepFlow:
    """4 blocks at 64 (4 heads), branches after block 2, acceleration MLP width 128: CPU tests and smoke runs."""
    return _deepflow("tiny", **{"depth": 4, "df_idxs": [2], "acc_hidden_dim": 128, **kw})


def deepflow_b2(**kw: Any) -> DeepFlow:
    """DeepFlow-B/2 (2T): 12 blocks at 768, branches after block 6, patch 2 (the anchor's base script)."""
    return _deepflow("B", **{"depth": 12, "df_idxs": [6], "patch_size": 2, **kw})


def deepflow_xl2(**kw: Any) -> DeepFlow:
    """DeepFlow-XL/2 (3T): 24 blocks at 1152, branches after blocks 8 and 16, patch 2 (the anchor's xlarge script)."""
    return _deepflow("XL", **{"depth": 24, "df_idxs": [8, 16], "patch_size": 2, **kw})
