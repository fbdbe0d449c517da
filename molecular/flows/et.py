"""An equivariant transformer velocity network in the style of TorchMD-Net's ET, ET-Flow's backbone.

ET-Flow (Hassan et al. 2024, ``shenoynikhil/ETFlow``) predicts conformer velocities with the equivariant transformer
of TorchMD-Net (Thölke & De Fabritiis 2022, "TorchMD-NET: Equivariant Transformers for Neural Network based
Molecular Potentials", ``torchmd/torchmd-net`` ``torchmdnet/models/torchmd_et.py``). Each atom carries invariant
features ``x[N, H]`` and equivariant vector features ``vec[N, 3, H]``; one layer is multi-head dot-product attention
whose keys and values are modulated by a radial filter of the distance (and here the bond type, as ET-Flow
conditions on the molecular graph), with SiLU attention weights and a cosine cutoff; values update both kinds of
feature: ``vec_i += sum_j (vec_j * a_ij + b_ij * r̂_ij)`` and ``x_i += <vec1_i, vec2_i> * o2 + o3``. The velocity
comes from a gated equivariant block (Schütt et al. 2021, PaiNN) on the last features, a vector per atom.

Why this network beside the EGNN: attention lets an atom weigh its neighbours (the EGNN sums every pair with one
gate), and the vector channels carry directional information between layers (the EGNN updates coordinates only),
which is what ET-Flow found it needs for accurate conformers. It is O(3)-equivariant like ET-Flow's ``qm9-o3``
configuration (only distances and unit vectors enter; no cross products), so chirality is fixed post hoc.
Conditioning as in the EGNN: atom features, bond orders on the edges of the fully connected molecular graph, and
the flow time as a sinusoidal embedding added to the atom features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molecular.conformers.data import NUM_ATOM_FEATURES, NUM_BOND_TYPES
from unirep.intermediates import feature_take_indices, normalize_index
from unirep.nn import timestep_embedding
from unirep.tokens import TokenSet, segment_sum

from .egnn import bond_edge_types, full_edges, per_atom_time, remove_mean

__all__ = ["EquivariantTransformer", "et_small", "et_tiny", "et_base"]


class ExpNormalRBF(nn.Module):
    """TorchMD-Net's exponential-normal radial basis: ``exp(-beta (exp(-alpha d) - mu)^2)`` times a cosine cutoff."""

    def __init__(self, num: int = 32, cutoff: float = 10.0):
        super().__init__()
        self.cutoff = cutoff
        self.alpha = 5.0 / cutoff
        start = math.exp(-cutoff)
        self.register_buffer("mu", torch.linspace(start, 1.0, num))
        self.register_buffer("beta", torch.full((num,), (2.0 / num * (1.0 - start)) ** -2))

    def forward(self, d: Tensor) -> Tensor:  # [E] -> [E, num]
        d = d[:, None]
        return cosine_cutoff(d, self.cutoff) * torch.exp(-self.beta * (torch.exp(-self.alpha * d) - self.mu) ** 2)


def cosine_cutoff(d: Tensor, cutoff: float) -> Tensor:
    return 0.5 * (torch.cos(d * math.pi / cutoff) + 1.0) * (d < cutoff).to(d.dtype)


class ETLayer(nn.Module):
    """One equivariant multi-head attention layer (TorchMD-Net's ``EquivariantMultiHeadAttention``)."""

    def __init__(self, hidden: int, heads: int, edge_dim: int, cutoff: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.hidden, self.heads, self.cutoff = hidden, heads, cutoff
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, 3 * hidden)
        self.o = nn.Linear(hidden, 3 * hidden)
        self.vec_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.dk = nn.Sequential(nn.Linear(edge_dim, hidden), nn.SiLU())
        self.dv = nn.Sequential(nn.Linear(edge_dim, 3 * hidden), nn.SiLU())
        self.act = nn.SiLU()

    def forward(
        self, x: Tensor, vec: Tensor, edges: Tensor, d: Tensor, unit: Tensor, eattr: Tensor
    ) -> tuple[Tensor, Tensor]:
        n, hd, nh = x.shape[0], self.hidden, self.heads
        dh = hd // nh
        src, dst = edges  # messages flow j = src -> i = dst
        h = self.norm(x)
        q = self.q(h).reshape(n, nh, dh)
        k = self.k(h).reshape(n, nh, dh)
        v = self.v(h).reshape(n, nh, 3 * dh)
        vec1, vec2, vec3 = self.vec_proj(vec).split(hd, dim=-1)  # each [N, 3, H]
        vec_dot = (vec1 * vec2).sum(dim=1)  # [N, H], invariant
        dk = self.dk(eattr).reshape(-1, nh, dh)  # [E, heads, dh]
        dv = self.dv(eattr).reshape(-1, nh, 3 * dh)
        attn = (q[dst] * k[src] * dk).sum(-1)  # [E, heads]
        attn = self.act(attn) * cosine_cutoff(d, self.cutoff)[:, None]
        vj = v[src] * dv  # [E, heads, 3 dh]
        xj, a, b = vj.split(dh, dim=-1)  # each [E, heads, dh]
        msg_x = (xj * attn[..., None]).reshape(-1, hd)  # [E, H]
        a, b = a.reshape(-1, 1, hd), b.reshape(-1, 1, hd)
        msg_vec = vec[src] * a + b * unit[:, :, None]  # [E, 3, H]
        agg_x = segment_sum(msg_x, dst, n)
        agg_vec = segment_sum(msg_vec.reshape(-1, 3 * hd), dst, n).reshape(n, 3, hd)
        o1, o2, o3 = self.o(agg_x).split(hd, dim=-1)
        dx = vec_dot * o2 + o3
        dvec = vec3 * o1[:, None, :] + agg_vec
        return x + dx, vec + dvec


class GatedEquivariantBlock(nn.Module):
    """PaiNN's gated equivariant output block: scalars gate a linear map of the vectors."""

    def __init__(self, hidden: int, out_vectors: int = 1):
        super().__init__()
        self.vec1 = nn.Linear(hidden, hidden, bias=False)
        self.vec2 = nn.Linear(hidden, out_vectors, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_vectors))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:  # -> [N, 3, out_vectors]
        norm = (self.vec1(vec).pow(2).sum(dim=1) + 1e-12).sqrt()  # [N, H]
        gate = self.mlp(torch.cat([x, norm], dim=-1))  # [N, out]
        return self.vec2(vec) * gate[:, None, :]


class EquivariantTransformer(nn.Module):
    """ET velocity network: ``forward(batch, x_t, t) -> v[T, 3]`` (zero mean per graph), the EGNN's interface.

    Args:
        hidden: width of scalar and vector features; heads: attention heads; num_layers: attention layers.
        num_rbf, cutoff: radial basis size and the cosine cutoff (Å) of the attention and the basis.
        latent_dim: > 0 also takes invariant per-atom latents ``z_t`` and returns their velocity.
    """

    def __init__(
        self,
        num_atom_features: int = NUM_ATOM_FEATURES,
        num_bond_types: int = NUM_BOND_TYPES,
        hidden: int = 128,
        num_layers: int = 6,
        heads: int = 8,
        time_dim: int = 64,
        num_rbf: int = 32,
        cutoff: float = 10.0,
        latent_dim: int = 0,
    ):
        super().__init__()
        self.hidden, self.num_layers, self.time_dim, self.latent_dim = hidden, num_layers, time_dim, latent_dim
        self.embed = nn.Linear(num_atom_features + latent_dim, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.rbf = ExpNormalRBF(num_rbf, cutoff)
        self.bond_embed = nn.Embedding(num_bond_types, num_rbf)
        self.layers = nn.ModuleList(ETLayer(hidden, heads, num_rbf, cutoff) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden)
        self.head = GatedEquivariantBlock(hidden, 1)
        if latent_dim:
            self.latent_head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, latent_dim))

    @property
    def dim(self) -> int:
        return self.hidden

    def feature_dim(self, index: int) -> int:
        normalize_index(index, self.num_layers, "equivariant transformer")
        return self.hidden

    def forward_intermediates(
        self,
        batch,
        x_t: Tensor,
        t: Tensor,
        indices: int | Sequence[int] | None = None,
        z_t: Tensor | None = None,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], list[TokenSet]]:
        """``(out, [TokenSet of x_k])``: the invariant features of layer ``k`` (0 = embedding), shared convention."""
        take = feature_take_indices(self.num_layers, indices, "equivariant transformer")
        n, bidx = x_t.shape[0], batch.batch
        t = per_atom_time(t, batch, n).to(x_t.dtype)
        if (z_t is None) != (self.latent_dim == 0):
            raise ValueError(f"latent_dim={self.latent_dim} but z_t {'missing' if z_t is None else 'given'}")
        feats = batch.atom_features.to(x_t.dtype)
        x = self.embed(feats if z_t is None else torch.cat([feats, z_t], dim=-1))
        x = x + self.time_mlp(timestep_embedding(t, self.time_dim, scale=1000.0))
        vec = x.new_zeros(n, 3, self.hidden)
        edges = full_edges(bidx, batch.num_graphs)
        src, dst = edges
        rel = x_t[src] - x_t[dst]  # [E, 3] points from i = dst to j = src
        d = (rel.pow(2).sum(-1) + 1e-12).sqrt()
        unit = rel / d[:, None]
        etype = bond_edge_types(edges, batch.bond_index, batch.bond_types, n)
        eattr = self.rbf(d) + self.bond_embed(etype).to(x_t.dtype)  # [E, num_rbf]
        states = {0: x}
        for i, layer in enumerate(self.layers, start=1):
            x, vec = layer(x, vec, edges, d, unit, eattr)
            if i in take:
                states[i] = x
        h = self.out_norm(x)
        v = remove_mean(self.head(h, vec)[..., 0], bidx, batch.num_graphs)  # [T, 3]
        out = (v, self.latent_head(h)) if self.latent_dim else v
        return out, [TokenSet(states[i], bidx, None, batch.num_graphs) for i in take]

    def forward(self, batch, x_t: Tensor, t: Tensor, z_t: Tensor | None = None):
        out, _ = self.forward_intermediates(batch, x_t, t, [], z_t)
        return out


def et_tiny(num_atom_features: int = NUM_ATOM_FEATURES, num_bond_types: int = NUM_BOND_TYPES, latent_dim: int = 0):
    """Smoke tests: 2 layers of width 32, 4 heads."""
    return EquivariantTransformer(num_atom_features, num_bond_types, 32, 2, 4, 16, 16, latent_dim=latent_dim)


def et_small(num_atom_features: int = NUM_ATOM_FEATURES, num_bond_types: int = NUM_BOND_TYPES, latent_dim: int = 0):
    """CPU runs: 4 layers of width 96, 8 heads."""
    return EquivariantTransformer(num_atom_features, num_bond_types, 96, 4, 8, 32, 32, latent_dim=latent_dim)


def et_base(num_atom_features: int = NUM_ATOM_FEATURES, num_bond_types: int = NUM_BOND_TYPES, latent_dim: int = 0):
    """GPU runs: 8 layers of width 160, 8 heads."""
    return EquivariantTransformer(num_atom_features, num_bond_types, 160, 8, 8, 64, 64, latent_dim=latent_dim)
