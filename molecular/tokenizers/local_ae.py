"""Local all-atom autoencoder: strictly local equivariant encoder -> per-atom latent -> global structure decoder.

After SLAE ("strictly local all-atom environment" autoencoder, ``ProteinDesignLab/SLAE``): every atom's latent is a
function of the atoms within a cutoff (6 Å) of it and nothing else, so latents of a residue or functional group do
not change with far-away context and can be reused across molecules and proteins; a global transformer decoder
reconstructs the whole structure (types and coordinates) from the set of latents, with losses on types
(cross-entropy), coordinates after optimal superposition (Kabsch), and inter-atomic distances within the cutoff.
GeoLDM (Xu et al. 2023) uses such per-atom latents as the space an equivariant latent flow is trained in
(:class:`molecular.flows.LatentFlowTask`).

Encoder (rotation-invariant by construction, exact in float64): an atomic density expansion in the style of ACE /
MACE's first interaction (Drautz 2019; Batatia et al. 2022) restricted to one centre's neighbourhood,
``A_i,c,lm = Σ_j R_cl(r_ij) h_c(Z_j) Y_lm(r̂_ij)`` with Bessel radial functions times a smooth polynomial cutoff and
real spherical harmonics up to l = 2, then its invariants: the channel-mixed power spectrum ``Σ_m A_k,lm A'_k,lm``
(three-body) and pseudoscalar triple products of l = 1 channels ``(a × b) · c`` (so mirror images get different
latents, as chirality requires). An MLP maps these and the centre's element to the latent ``z_i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molecular.data.graphs import regraph, species_index, z_lookup
from unirep.tokenizers import Tokenizer
from unirep.tokens import TokenSet, segment_sum

__all__ = [
    "real_spherical_harmonics",
    "LocalEnvironmentEncoder",
    "StructureDecoder",
    "LocalAtomicAutoencoder",
    "kabsch_align",
    "local_ae_tiny",
    "local_ae_small",
]

# H C N O F P S Cl Br: organic molecules and proteins
DEFAULT_Z_TABLE: tuple[int, ...] = (1, 6, 7, 8, 9, 15, 16, 17, 35)


def real_spherical_harmonics(u: Tensor) -> Tensor:
    """Real spherical harmonics l = 0, 1, 2 of unit vectors ``u[E, 3]`` -> ``[E, 9]`` (e3nn's "component"
    normalisation: each l block has mean square 1 over the sphere, and each block rotates by an orthogonal matrix)."""
    x, y, z = u.unbind(-1)
    s3, s5, s15 = math.sqrt(3.0), math.sqrt(5.0), math.sqrt(15.0)
    return torch.stack(
        [
            torch.ones_like(x),
            s3 * x,
            s3 * y,
            s3 * z,
            s15 * x * y,
            s15 * y * z,
            0.5 * s5 * (3 * z * z - 1),
            s15 * x * z,
            0.5 * s15 * (x * x - y * y),
        ],
        dim=-1,
    )


_L_OF_M = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2])  # degree l of each of the 9 harmonic components


def bessel_basis(r: Tensor, r_max: float, num: int) -> Tensor:
    """``sqrt(2/r_c) sin(n π r / r_c) / r`` for n = 1..num (DimeNet, MACE) -> ``[E, num]``."""
    n = torch.arange(1, num + 1, device=r.device, dtype=r.dtype)
    return math.sqrt(2.0 / r_max) * torch.sin(n * math.pi * r[:, None] / r_max) / r[:, None]


def polynomial_cutoff(r: Tensor, r_max: float, p: int = 6) -> Tensor:
    """Envelope that is 1 at r = 0 and reaches 0 smoothly at ``r_max`` (DimeNet's and MACE's, p = 6)."""
    d = r / r_max
    env = 1.0 - (p + 1.0) * (p + 2.0) / 2.0 * d**p + p * (p + 2.0) * d ** (p + 1) - p * (p + 1.0) / 2.0 * d ** (p + 2)
    return env * (d < 1.0)


class LocalEnvironmentEncoder(nn.Module):
    """Strictly local invariant encoder of each atom's environment within ``r_max`` (see module docstring).

    ``forward(numbers[T], positions[T, 3], edge_index[2, E], shifts[E, 3]) -> z[T, latent_dim]``; ``edge_index`` is
    the radius graph (``molecular.data.neighbour_graph``): edge (i, j) carries ``r_j - r_i + shift``, i the centre.
    """

    def __init__(
        self,
        z_table: Sequence[int] = DEFAULT_Z_TABLE,
        r_max: float = 6.0,
        channels: int = 16,
        num_radial: int = 8,
        num_invariant: int = 16,
        num_pseudo: int = 4,
        hidden: int = 64,
        latent_dim: int = 8,
    ):
        super().__init__()
        self.z_table = [int(z) for z in z_table]
        self.r_max, self.channels, self.num_radial = float(r_max), channels, num_radial
        self.register_buffer("z_lookup", z_lookup(self.z_table), persistent=False)
        self.species = nn.Linear(len(self.z_table), channels, bias=False)
        self.radial = nn.Sequential(nn.Linear(num_radial, 32), nn.SiLU(), nn.Linear(32, 3 * channels))  # per l, c
        # equivariant channel mixings (same weights for every m of an l block)
        self.mix_u = nn.Parameter(torch.randn(3, channels, num_invariant) / math.sqrt(channels))
        self.mix_v = nn.Parameter(torch.randn(3, channels, num_invariant) / math.sqrt(channels))
        self.mix_p = nn.Parameter(torch.randn(3, channels, num_pseudo) / math.sqrt(channels))  # a, b, c of (a×b)·c
        n_inv = channels + 3 * num_invariant + num_pseudo
        self.head = nn.Sequential(
            nn.LayerNorm(n_inv),
            nn.Linear(n_inv, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, latent_dim),
        )
        self.latent_dim = latent_dim

    def species_index(self, numbers: Tensor) -> Tensor:
        return species_index(self.z_lookup, numbers, self.z_table, owner="autoencoder")

    def forward(self, numbers: Tensor, positions: Tensor, edge_index: Tensor, shifts: Tensor | None = None) -> Tensor:
        n = numbers.shape[0]
        onehot = nn.functional.one_hot(self.species_index(numbers), len(self.z_table)).to(positions.dtype)
        h = self.species(onehot)  # [T, C]
        centre, nb = edge_index
        vec = positions[nb] - positions[centre]  # [E, 3]
        if shifts is not None and shifts.numel():
            vec = vec + shifts.to(vec.dtype)
        r = vec.norm(dim=-1).clamp_min(1e-9)
        keep = r < self.r_max  # the graph may be built with a larger radius: stay strictly local
        vec, r, centre, nb = vec[keep], r[keep], centre[keep], nb[keep]
        y = real_spherical_harmonics(vec / r[:, None])  # [E, 9]
        rad = self.radial(bessel_basis(r, self.r_max, self.num_radial)) * polynomial_cutoff(r, self.r_max)[:, None]
        rad = rad.view(-1, 3, self.channels)[:, _L_OF_M.to(r.device)]  # [E, 9, C]: radial weight of each (l, m)
        msg = rad * h[nb][:, None, :] * y[:, :, None]  # [E, 9, C]
        a = segment_sum(msg, centre, n)  # atomic density [T, 9, C]
        lm = _L_OF_M.to(r.device)
        u = torch.einsum("tmc,mck->tmk", a, self.mix_u[lm])  # [T, 9, K]
        v = torch.einsum("tmc,mck->tmk", a, self.mix_v[lm])
        power = torch.stack([(u[:, lm == ell] * v[:, lm == ell]).sum(1) for ell in range(3)], dim=1)  # [T, 3, K]
        p = torch.einsum("tmc,xck->txmk", a[:, 1:4], self.mix_p)  # three l=1 mixings [T, 3, 3(m), P]
        pseudo = (torch.cross(p[:, 0], p[:, 1], dim=1) * p[:, 2]).sum(1)  # (a × b) · c [T, P]
        feats = torch.cat([h, power.flatten(1), pseudo], dim=-1)
        return self.head(feats)


class StructureDecoder(nn.Module):
    """Global transformer decoder: per-atom latents of a structure -> element logits, coordinates, aux properties.

    The latents carry no order; a sinusoidal embedding of the atom's index within its structure is added so that
    atoms with identical environments (symmetry-equivalent hydrogens) can still be placed apart. Coordinates come
    out in an arbitrary frame; losses superimpose them (Kabsch) or use distances.
    """

    def __init__(
        self, latent_dim: int, num_types: int, width: int = 128, depth: int = 3, heads: int = 4, num_aux: int = 0
    ):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(latent_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.type_head = nn.Linear(width, num_types)
        self.pos_head = nn.Linear(width, 3)
        self.aux_head = nn.Linear(width, num_aux) if num_aux else None

    def _index_embedding(self, slot: Tensor, dtype: torch.dtype) -> Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=slot.device, dtype=dtype) / half)
        ang = slot.to(dtype)[..., None] * freqs
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)

    def forward(self, z: Tensor, batch: Tensor, num_graphs: int) -> dict[str, Tensor]:
        dense, mask = TokenSet(z, batch, None, num_graphs).to_dense()  # [B, N, L], [B, N]
        slot = torch.arange(dense.shape[1], device=z.device).expand(dense.shape[0], -1)
        x = self.inp(dense) + self._index_embedding(slot, dense.dtype)
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))[mask]  # back to [T, W] in token order
        # to_dense keeps the order of atoms within each item, so [mask] restores the stable-sorted token order
        order = torch.argsort(batch, stable=True)
        out = torch.empty_like(x)
        out[order] = x
        res = {"type_logits": self.type_head(out), "pos": self.pos_head(out)}
        if self.aux_head is not None:
            res["aux"] = self.aux_head(out)
        return res


def kabsch_align(mobile: Tensor, target: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Rigidly superimpose ``mobile[T, 3]`` onto ``target[T, 3]`` per structure (proper rotations only).

    The rotation is computed without gradient (as a fixed frame), so gradients flow through ``mobile`` only.
    """
    from unirep.tokens import segment_mean

    cm = segment_mean(mobile, batch, num_graphs)
    ct = segment_mean(target, batch, num_graphs)
    m0, t0 = mobile - cm[batch], target - ct[batch]
    with torch.no_grad():
        h = segment_sum(m0[:, :, None] * t0[:, None, :], batch, num_graphs)  # covariance [B, 3, 3]
        u, _, vt = torch.linalg.svd(h.double())
        d = torch.sign(torch.linalg.det(u @ vt))
        diag = torch.ones(num_graphs, 3, dtype=h.dtype if h.dtype == torch.float64 else torch.float64, device=h.device)
        diag[:, 2] = d
        rot = (u @ torch.diag_embed(diag) @ vt).to(mobile.dtype)  # maps centred mobile rows onto target: m0 @ rot
    return torch.einsum("ti,tij->tj", m0, rot[batch]) + ct[batch]


class LocalAtomicAutoencoder(Tokenizer):
    """Tokenizer over molecules: ``encode(graph_batch) -> z[T, latent_dim]`` (normalised), ``decode(z, batch, B)``.

    Input batches are ``molecular.data.GraphBatch``: with a radius graph (re-graphed at ``r_max``) or without one
    (molecules from ``molecular.conformers``, given one with ``radius_graph(r_max)``).
    """

    def __init__(self, encoder: LocalEnvironmentEncoder, decoder: StructureDecoder, latent_noise: float = 0.0):
        super().__init__(stat_shape=(encoder.latent_dim,))
        self.encoder, self.decoder = encoder, decoder
        self.latent_noise = latent_noise
        self.r_max = encoder.r_max
        self.z_table = encoder.z_table

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def as_graph_batch(self, batch):
        """A ``GraphBatch`` with this encoder's ``r_max`` radius graph (a batch of molecules gets one; a batch
        graphed for another cutoff is re-graphed, so the environment is always the full 6 Å)."""
        if batch.edge_index is None:  # molecules: no radius graph yet
            return batch.radius_graph(self.r_max)
        return regraph(batch, self.r_max)

    def _encode(self, batch) -> Tensor:
        g = self.as_graph_batch(batch)
        return self.encoder(g.numbers, g.positions.to(self.latent_mean.dtype), g.edge_index, g.shifts)

    def _decode(self, z: Tensor) -> Tensor:
        raise TypeError(
            "LocalAtomicAutoencoder decodes whole structures: call decode(z, batch, num_graphs) with the structure "
            "index of every atom"
        )

    def decode(self, z: Tensor, batch: Tensor, num_graphs: int) -> dict[str, Tensor]:  # type: ignore[override]
        """Decode normalised latents ``z[T, L]`` of ``num_graphs`` structures (``batch[T]`` the structure index)."""
        return self.decoder(self.denormalize(z), batch, num_graphs)

    def type_targets(self, numbers: Tensor) -> Tensor:
        return self.encoder.species_index(numbers)


def local_ae_tiny(
    z_table: Sequence[int] = DEFAULT_Z_TABLE, latent_dim: int = 4, r_max: float = 6.0, num_aux: int = 0
) -> LocalAtomicAutoencoder:
    """Preset for smoke tests (a few thousand parameters)."""
    enc = LocalEnvironmentEncoder(
        z_table, r_max, channels=8, num_radial=6, num_invariant=8, num_pseudo=2, hidden=32, latent_dim=latent_dim
    )
    return LocalAtomicAutoencoder(enc, StructureDecoder(latent_dim, len(z_table), 32, 1, 2, num_aux))


def local_ae_small(
    z_table: Sequence[int] = DEFAULT_Z_TABLE,
    latent_dim: int = 8,
    r_max: float = 6.0,
    num_aux: int = 0,
    latent_noise: float = 0.05,
) -> LocalAtomicAutoencoder:
    """Preset for CPU training on small molecules and peptides."""
    enc = LocalEnvironmentEncoder(
        z_table, r_max, channels=24, num_radial=8, num_invariant=24, num_pseudo=8, hidden=128, latent_dim=latent_dim
    )
    return LocalAtomicAutoencoder(enc, StructureDecoder(latent_dim, len(z_table), 128, 4, 4, num_aux), latent_noise)
