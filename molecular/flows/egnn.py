"""E(3)-equivariant velocity network for conformers (and per-atom latents): an EGNN conditioned on the graph.

Architecture after the E(n)-equivariant graph network of Satorras et al. 2021 in the form EDM/GeoLDM use it
(Hoogeboom et al. 2022, ``ehoogeboom/e3_diffusion_for_molecules`` ``egnn/egnn_new.py``; Xu et al. 2023, GeoLDM):
messages from invariant node features, squared distances and edge attributes; coordinates updated along
``x_i - x_j`` normalised by ``d_ij + 1``; features updated residually. Conditioning follows ET-Flow (Hassan et al.
2024): atom types, formal charges, aromaticity and hybridisation on the nodes, bond orders on the edges of the fully
connected molecular graph, and the flow time as a sinusoidal embedding added to every node.

Equivariance is exact by construction: only distances and differences of coordinates enter, so the output velocity
``v = x_L - x_0`` rotates with the input and is unchanged by translations; node features are invariant. The
per-atom hidden features after every layer are exposed (``forward_intermediates``) for representation alignment.
With ``latent_dim > 0`` the network also takes invariant per-atom latents ``z_t`` and returns their velocity
(GeoLDM-style joint flow on coordinates and latents).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molecular.conformers.data import NUM_ATOM_FEATURES, NUM_BOND_TYPES
from unirep.intermediates import feature_take_indices, normalize_index
from unirep.nn import timestep_embedding
from unirep.tokens import TokenSet, segment_mean, segment_sum

__all__ = ["EGNNLayer", "EquivariantVelocityNet", "full_edges", "per_atom_time", "remove_mean"]


def remove_mean(x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Subtract each graph's centre (unweighted mean of its atoms): ``x[T, 3]`` -> zero centre of mass."""
    return x - segment_mean(x, batch, num_graphs)[batch]


def full_edges(batch: Tensor, num_graphs: int) -> Tensor:
    """All ordered pairs ``(i, j), i != j`` within each graph: ``[2, sum_g n_g (n_g - 1)]`` global indices.

    Atoms of a graph need not be contiguous: pairs are built on the stably sorted order and mapped back.
    """
    order = torch.argsort(batch, stable=True)
    counts = torch.bincount(batch, minlength=num_graphs)
    starts = torch.cumsum(counts, 0) - counts
    src, dst = [], []
    for n, s in zip(counts.tolist(), starts.tolist(), strict=True):
        idx = torch.arange(n, device=batch.device)
        i, j = torch.meshgrid(idx, idx, indexing="ij")
        keep = i != j
        src.append(i[keep] + s)
        dst.append(j[keep] + s)
    return order[torch.stack([torch.cat(src), torch.cat(dst)])]


def bond_edge_types(edges: Tensor, bond_index: Tensor, bond_types: Tensor, num_nodes: int) -> Tensor:
    """Bond order (0 = not bonded) of every edge in ``edges``, looked up from the sparse bond list."""
    key = edges[0] * num_nodes + edges[1]
    table = torch.zeros(num_nodes * num_nodes, dtype=torch.long, device=edges.device)
    if bond_index.numel():
        table[bond_index[0] * num_nodes + bond_index[1]] = bond_types
    return table[key]


class EGNNLayer(nn.Module):
    """One equivariant layer: message MLP -> coordinate update -> residual feature update."""

    def __init__(self, hidden: int, edge_dim: int, update_coords: bool = True, coord_range: float = 15.0):
        super().__init__()
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * hidden + 1 + edge_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.att = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())  # soft edge gate (EDM's attention)
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.update_coords = update_coords
        self.coord_range = coord_range
        if update_coords:
            last = nn.Linear(hidden, 1, bias=False)
            # small init keeps early coordinate updates gentle (EDM uses xavier gain 0.001 on this layer)
            nn.init.xavier_uniform_(last.weight, gain=0.001)
            self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)

    def forward(self, h: Tensor, x: Tensor, edges: Tensor, edge_attr: Tensor) -> tuple[Tensor, Tensor]:
        src, dst = edges
        diff = x[src] - x[dst]  # [E, 3]
        d2 = (diff**2).sum(-1, keepdim=True)  # [E, 1]
        m = self.edge_mlp(torch.cat([h[src], h[dst], d2, edge_attr], dim=-1))  # [E, H]
        m = m * self.att(m)
        n = h.shape[0]
        if self.update_coords:
            # tanh bounds a single update; dividing by (d + 1) keeps far pairs from dominating (EDM's norm_diff)
            w = torch.tanh(self.coord_mlp(m)) * self.coord_range  # [E, 1]
            shift = diff / (d2.sqrt() + 1.0) * w
            deg = torch.bincount(src, minlength=n).clamp_min(1).to(x.dtype)[:, None]
            x = x + segment_sum(shift, src, n) / deg
        agg = segment_sum(m, src, n)  # [T, H]
        h = h + self.node_mlp(torch.cat([self.norm(h), agg], dim=-1))
        return h, x


class EquivariantVelocityNet(nn.Module):
    """Graph-conditioned EGNN predicting the velocity of coordinates (and of invariant per-atom latents).

    ``forward(batch, x_t, t, z_t=None)`` with ``x_t[T, 3]``, per-atom time ``t[T]`` (or per graph ``[B]``) and
    optional latents ``z_t[T, latent_dim]`` returns ``v_x[T, 3]`` (zero mean per graph) or ``(v_x, v_z)``.
    ``forward_intermediates(batch, x_t, t, indices)`` also returns the node states (:mod:`unirep.intermediates`).
    """

    def __init__(
        self,
        num_atom_features: int = NUM_ATOM_FEATURES,
        num_bond_types: int = NUM_BOND_TYPES,
        hidden: int = 128,
        num_layers: int = 6,
        time_dim: int = 64,
        latent_dim: int = 0,
        coord_range: float = 15.0,
    ):
        super().__init__()
        self.hidden = hidden
        self.num_layers = num_layers
        self.latent_dim = latent_dim
        self.time_dim = time_dim
        self.num_bond_types = num_bond_types
        self.embed = nn.Linear(num_atom_features + latent_dim, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.edge_embed = nn.Embedding(num_bond_types, 16)
        self.layers = nn.ModuleList(EGNNLayer(hidden, 16, True, coord_range) for _ in range(num_layers))
        if latent_dim:
            self.latent_head = nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, latent_dim)
            )

    @property
    def dim(self) -> int:
        """Width of the per-atom features returned by ``forward_intermediates``."""
        return self.hidden

    def feature_dim(self, index: int) -> int:
        """Width of hidden state ``index`` (every layer, and the embedding, have ``hidden`` channels)."""
        normalize_index(index, self.num_layers, "EGNN")
        return self.hidden

    def forward_intermediates(
        self,
        batch,
        x_t: Tensor,
        t: Tensor,
        indices: int | Sequence[int] | None = None,
        z_t: Tensor | None = None,
    ) -> tuple[Tensor | tuple[Tensor, Tensor], list[TokenSet]]:
        """``(out, [TokenSet of h_k])`` in the shared convention (:mod:`unirep.intermediates`): ``out`` is what
        :meth:`forward` returns; ``h_0`` is the embedded input, ``h_k`` the node state after layer ``k``, negative
        indices count from the end, ``None`` returns all of ``0 .. L``. Node states are invariant ``[T, hidden]``."""
        take = feature_take_indices(self.num_layers, indices, "EGNN")
        n = x_t.shape[0]
        bidx = batch.batch
        t = per_atom_time(t, batch, n).to(x_t.dtype)
        if (z_t is None) != (self.latent_dim == 0):
            raise ValueError(f"latent_dim={self.latent_dim} but z_t {'missing' if z_t is None else 'given'}")
        feats = batch.atom_features.to(x_t.dtype)
        h = self.embed(feats if z_t is None else torch.cat([feats, z_t], dim=-1))
        # times in [0, 1] scaled by 1000, so the frequencies are those of integer DDPM-style timesteps (as DiT)
        h = h + self.time_mlp(timestep_embedding(t, self.time_dim, scale=1000.0))
        edges = full_edges(bidx, batch.num_graphs)
        etype = bond_edge_types(edges, batch.bond_index, batch.bond_types, n)
        eattr = self.edge_embed(etype).to(x_t.dtype)
        x0 = remove_mean(x_t, bidx, batch.num_graphs)
        x = x0
        states = {0: h}
        for i, layer in enumerate(self.layers, start=1):
            h, x = layer(h, x, edges, eattr)
            if i in take:
                states[i] = h
        v = remove_mean(x - x0, bidx, batch.num_graphs)
        out = (v, self.latent_head(h)) if self.latent_dim else v
        return out, [TokenSet(states[i], bidx, None, batch.num_graphs) for i in take]

    def forward(self, batch, x_t: Tensor, t: Tensor, z_t: Tensor | None = None):
        """``v_x[T, 3]`` (zero mean per graph), or ``(v_x, v_z[T, latent_dim])`` with latents."""
        out, _ = self.forward_intermediates(batch, x_t, t, [], z_t)
        return out


def per_atom_time(t: Tensor | float, batch, n: int) -> Tensor:
    """A time given as a scalar, ``[1]``, per graph ``[B]`` or per atom ``[T]`` as one time per atom ``[T]``."""
    t = torch.as_tensor(t, device=batch.batch.device)
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(1).expand(n)
    if t.shape[0] == batch.num_graphs and t.shape[0] != n:
        return t[batch.batch]  # per-graph time -> per-atom
    return t.reshape(n)


def egnn_tiny(
    num_atom_features: int = NUM_ATOM_FEATURES, num_bond_types: int = NUM_BOND_TYPES, latent_dim: int = 0
) -> EquivariantVelocityNet:
    """Preset for smoke tests: 2 layers of width 32."""
    return EquivariantVelocityNet(num_atom_features, num_bond_types, 32, 2, 16, latent_dim)


def egnn_small(
    num_atom_features: int = NUM_ATOM_FEATURES, num_bond_types: int = NUM_BOND_TYPES, latent_dim: int = 0
) -> EquivariantVelocityNet:
    """Preset for CPU runs: 4 layers of width 96."""
    return EquivariantVelocityNet(num_atom_features, num_bond_types, 96, 4, 32, latent_dim)


def egnn_base(
    num_atom_features: int = NUM_ATOM_FEATURES, num_bond_types: int = NUM_BOND_TYPES, latent_dim: int = 0
) -> EquivariantVelocityNet:
    """Preset for GPU runs: 8 layers of width 256."""
    return EquivariantVelocityNet(num_atom_features, num_bond_types, 256, 8, 64, latent_dim)
