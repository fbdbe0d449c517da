"""SLAE-style protein autoencoder: strictly local all-atom encoder -> per-residue latents -> structure decoder.

After SLAE (Chen et al. 2025, "Strictly Local All-atom Environment" autoencoder; ``ProteinDesignLab/SLAE``) with the
decoder interface of La-Proteina (Geffner et al. 2025, NVIDIA ``la-proteina``: the decoder takes the C-alpha trace and
the per-residue latents), so one autoencoder serves reconstruction and the partially latent flow.

Encoder (strictly local, invariant): every atom's ACE-style density invariants within ``r_max``
(:class:`molecular.tokenizers.local_ae.LocalEnvironmentEncoder`, one shell, no message passing), plus an embedding of
its atom37 name, are pooled over the residue's atoms and mapped to ``z[R, latent_dim]``. A residue's latent is thus
a function of the atoms within ``r_max`` of its own atoms and of nothing else (tested by moving every other atom).

Decoder: a transformer over the residues of each chain (sinusoidal position within the chain, chain-break aware
attention within a protein) with heads for

- residue type (21 classes),
- the C-alpha trace in an arbitrary global frame (for decoding from latents alone),
- atom37 coordinates in the residue's C-alpha-trace frame (:func:`~molecular.proteins.residues.ca_frames`): backbone
  N, C, O and the side chain; the backbone frame (N, CA, C; AlphaFold's Gram-Schmidt) follows from them,
- a 64-bin C-alpha distogram (2-22 Å) from pair features, whose P(d < 8 Å) is the contact map.

Placing atoms in frames built from the C-alpha trace makes the decoder SE(3)-equivariant given a trace (tested in
float64); reflections are deliberately not a symmetry (chirality).

Losses (SLAE's release has no training code; the paper's heads are kept, its pairwise energy heads are not):
cross-entropy on residue type; MSE of the C-alpha trace after Kabsch superposition; MSE of the frame-local atom37
coordinates given the true trace (La-Proteina's decoder setting); distogram cross-entropy; MSE of C-alpha distances
below 15 Å. Latent noise augmentation during training (as RAE / the local autoencoder) prepares the decoder for the
errors of a latent flow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molecular.data import regraph
from molecular.tokenizers.local_ae import DEFAULT_Z_TABLE, LocalEnvironmentEncoder, kabsch_align
from unirep.tokenizers import Tokenizer
from unirep.tokens import TokenSet, segment_mean

from .constants import ATOM37, ATOM37_INDEX, CHI1_ATOM, NUM_RESIDUE_TYPES, RESIDUES
from .residues import ProteinBatch, ca_frames, dihedral, to_atom37

__all__ = [
    "LocalResidueEncoder",
    "ResidueDecoder",
    "ProteinAutoencoder",
    "local_atom37",
    "distogram_bins",
    "reconstruction_metrics",
    "slae_tiny",
    "slae_small",
]

NUM_BINS, BIN_MIN, BIN_MAX = 64, 2.0, 22.0
_BACKBONE_SLOTS = [ATOM37_INDEX[a] for a in ("N", "CA", "C", "O")]


def distogram_bins(d: Tensor) -> Tensor:
    """Bin index of distances (Å): 64 bins, the first up to 2 Å, the last from 22 Å."""
    edges = torch.linspace(BIN_MIN, BIN_MAX, NUM_BINS - 1, device=d.device, dtype=d.dtype)
    return torch.bucketize(d, edges)


def local_atom37(x37: Tensor, ca: Tensor, chain: Tensor) -> Tensor:
    """Atom37 coordinates ``[R, 37, 3]`` expressed in each residue's C-alpha-trace frame (origin CA)."""
    rot = ca_frames(ca, chain)  # [R, 3, 3], columns are the axes
    return torch.einsum("rji,raj->rai", rot, x37 - ca[:, None])


def _trace_features(ca: Tensor, chain: Tensor, rot: Tensor) -> Tensor:
    """Invariant geometry of the trace around each residue: CA[i±1], CA[i±2] in frame i (zeros across chain ends),
    ``[R, 12]``."""
    r = ca.shape[0]
    idx = torch.arange(r, device=ca.device)
    feats = []
    for k in (-2, -1, 1, 2):
        j = (idx + k).clamp(0, r - 1)
        same = (chain[j] == chain) & (idx + k >= 0) & (idx + k < r)
        local = torch.einsum("rji,rj->ri", rot, ca[j] - ca)
        feats.append(local * same[:, None].to(ca.dtype))
    return torch.cat(feats, -1)


class LocalResidueEncoder(nn.Module):
    """Strictly local all-atom encoder: atom environments within ``r_max`` -> per-residue latents."""

    def __init__(
        self,
        z_table: Sequence[int] = DEFAULT_Z_TABLE,
        r_max: float = 5.0,
        channels: int = 16,
        atom_dim: int = 64,
        hidden: int = 128,
        latent_dim: int = 8,
    ):
        super().__init__()
        self.atoms = LocalEnvironmentEncoder(
            z_table, r_max, channels=channels, num_invariant=channels, hidden=hidden, latent_dim=atom_dim
        )
        self.names = nn.Embedding(len(ATOM37) + 1, atom_dim)  # atom37 slot, the last row for H and other names
        self.head = nn.Sequential(
            nn.Linear(atom_dim, hidden), nn.SiLU(), nn.LayerNorm(hidden), nn.Linear(hidden, latent_dim)
        )
        self.r_max, self.latent_dim, self.atom_dim = float(r_max), latent_dim, atom_dim

    def atom_features(self, batch: ProteinBatch, positions: Tensor | None = None) -> Tensor:
        """Per-atom invariant features ``[T, atom_dim]`` (before pooling); needs ``batch`` with a radius graph of at
        least ``r_max`` (the encoder keeps only the edges within ``r_max``)."""
        pos = batch.positions if positions is None else positions
        h = self.atoms(batch.numbers, pos, batch.edge_index, batch.shifts)
        slot = batch.atom37_slot.clone()
        slot[slot < 0] = len(ATOM37)
        return torch.nn.functional.silu(h) * (1 + self.names(slot))

    def forward(self, batch: ProteinBatch, positions: Tensor | None = None) -> Tensor:
        h = self.atom_features(batch, positions)
        pooled = segment_mean(h, batch.atom_residue, batch.num_residues)  # [R, atom_dim]
        return self.head(pooled)


class ResidueDecoder(nn.Module):
    """Per-residue latents (+ a C-alpha trace, optional) -> type logits, trace, frame-local atom37, distogram."""

    def __init__(self, latent_dim: int, width: int = 128, depth: int = 3, heads: int = 4, pair_dim: int = 32):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(latent_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.type_head = nn.Linear(width, NUM_RESIDUE_TYPES)
        self.ca_head = nn.Linear(width, 3)
        self.local_head = nn.Sequential(
            nn.Linear(width + 12, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 37 * 3)
        )
        self.pair_a, self.pair_b = nn.Linear(width, pair_dim), nn.Linear(width, pair_dim)
        self.relpos = nn.Embedding(65, pair_dim)  # sequence separation clipped to ±32
        self.pair_head = nn.Sequential(nn.SiLU(), nn.Linear(pair_dim, NUM_BINS))

    def _position_embedding(self, position: Tensor, dtype: torch.dtype) -> Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=position.device, dtype=dtype) / half)
        ang = position.to(dtype)[:, None] * freqs
        return torch.cat([torch.sin(ang), torch.cos(ang)], -1)

    def trunk(self, z: Tensor, batch: ProteinBatch) -> Tensor:
        """Residue states ``[R, width]``: attention within each protein, positions within each chain."""
        x = self.inp(z) + self._position_embedding(batch.residue_position, z.dtype)
        dense, mask = TokenSet(x, batch.residue_batch, None, batch.num_graphs).to_dense()  # [B, N, W]
        out = self.norm(self.blocks(dense, src_key_padding_mask=~mask))
        # residues of a protein are contiguous and in order, so the mask gives back the token order
        return out[mask]

    def forward(self, z: Tensor, batch: ProteinBatch, ca: Tensor | None = None) -> dict[str, Tensor]:
        """Decode; ``ca[R, 3]`` conditions the atom placement on a given trace (the flow's, or the true one in
        training), otherwise the decoder's own trace is used."""
        h = self.trunk(z, batch)
        ca_pred = self.ca_head(h)
        trace = ca_pred if ca is None else ca.to(h.dtype)
        rot = ca_frames(trace, batch.residue_chain)
        feats = _trace_features(trace, batch.residue_chain, rot)
        local = self.local_head(torch.cat([h, feats], -1)).view(-1, 37, 3)
        local = local.clone()
        local[:, ATOM37_INDEX["CA"]] = 0.0  # CA is the frame's origin
        x37 = trace[:, None] + torch.einsum("rij,raj->rai", rot, local)
        return {
            "type_logits": self.type_head(h),
            "ca": ca_pred,
            "local": local,
            "atom37": x37,
            "distogram": self._distogram(h, batch),
        }

    def _distogram(self, h: Tensor, batch: ProteinBatch) -> Tensor:
        """Distogram logits of residue pairs within each protein, ``[P, 64]`` in :func:`residue_pairs` order."""
        i, j = residue_pairs(batch)
        sep = (batch.residue_position[j] - batch.residue_position[i]).clamp(-32, 32) + 32
        sep = torch.where(batch.residue_chain[i] == batch.residue_chain[j], sep, torch.full_like(sep, 64))
        a, b = self.pair_a(h), self.pair_b(h)
        pair = a[i] + b[j] + a[j] + b[i] + self.relpos(sep)  # symmetric in i, j except for the separation sign
        return self.pair_head(pair)


def residue_pairs(batch: ProteinBatch) -> tuple[Tensor, Tensor]:
    """All ordered pairs ``i < j`` of residues in the same protein (global residue indices)."""
    rb = batch.residue_batch
    i, j = torch.triu_indices(rb.numel(), rb.numel(), 1, device=rb.device)
    keep = rb[i] == rb[j]
    return i[keep], j[keep]


class ProteinAutoencoder(Tokenizer):
    """Tokenizer over proteins: ``encode(batch) -> z[R, latent_dim]`` (normalised), ``decode(z, batch, ca=None)``.

    Batches are :class:`~molecular.proteins.residues.ProteinBatch` es; the encoder's radius graph is (re)built at
    ``r_max``.
    """

    def __init__(self, encoder: LocalResidueEncoder, decoder: ResidueDecoder, latent_noise: float = 0.0):
        super().__init__(stat_shape=(encoder.latent_dim,))
        self.encoder, self.decoder, self.latent_noise = encoder, decoder, latent_noise
        self.r_max = encoder.r_max

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def graph(self, batch: ProteinBatch) -> ProteinBatch:
        """The batch with a radius graph of ``r_max`` (kept when it already has one at least that large)."""
        from dataclasses import replace

        if batch.edge_index is not None:
            g = regraph(batch, self.r_max)
        else:
            g = batch.radius_graph(self.r_max)
        return replace(
            batch, edge_index=g.edge_index, shifts=g.shifts, unit_shifts=g.unit_shifts, cell=g.cell, pbc=g.pbc
        )

    def _encode(self, batch: ProteinBatch) -> Tensor:
        g = self.graph(batch)
        return self.encoder(g, g.positions.to(self.latent_mean.dtype))

    def _decode(self, z: Tensor) -> Tensor:
        raise TypeError("ProteinAutoencoder decodes whole proteins: call decode(z, batch, ca=None)")

    def decode(self, z: Tensor, batch: ProteinBatch, ca: Tensor | None = None) -> dict[str, Tensor]:  # type: ignore[override]
        """Decode normalised latents ``z[R, L]`` of the residues of ``batch`` (a given trace ``ca[R, 3]``)."""
        return self.decoder(self.denormalize(z), batch, ca)

    def losses(self, batch: ProteinBatch, noise: bool = False, weights: dict[str, float] | None = None):
        """``(total, logs, outputs)`` with the losses of the module docstring."""
        w = {"type": 1.0, "ca": 1.0, "local": 1.0, "distogram": 0.5, "distance": 0.5, **(weights or {})}
        g = self.graph(batch)
        dtype = self.latent_mean.dtype
        pos = g.positions.to(dtype)
        z = self.encoder(g, pos)
        if noise and self.latent_noise > 0:
            z = z + self.latent_noise * z.detach().std(0, keepdim=True) * torch.randn_like(z)
        x37, mask = to_atom37(pos, g)
        ca = g.ca_positions(pos)
        out = self.decoder(z, g, ca)  # atoms placed on the true trace; the trace head is trained below
        loss_type = nn.functional.cross_entropy(out["type_logits"], g.residue_type)
        aligned = kabsch_align(out["ca"], ca, g.residue_batch, g.num_graphs)
        loss_ca = ((aligned - ca) ** 2).sum(-1).mean()
        target_local = local_atom37(x37, ca, g.residue_chain)
        err = ((out["local"] - target_local) ** 2).sum(-1)
        loss_local = (err * mask).sum() / mask.sum().clamp_min(1)
        i, j = residue_pairs(g)
        d_true = (ca[i] - ca[j]).norm(dim=-1)
        loss_dgram = nn.functional.cross_entropy(out["distogram"], distogram_bins(d_true))
        near = d_true < 15.0
        d_pred = (out["ca"][i] - out["ca"][j]).norm(dim=-1)
        loss_dist = ((d_pred - d_true)[near] ** 2).mean() if near.any() else pos.new_zeros(())
        total = (
            w["type"] * loss_type
            + w["ca"] * loss_ca
            + w["local"] * loss_local
            + w["distogram"] * loss_dgram
            + w["distance"] * loss_dist
        )
        logs = {
            "loss/type": loss_type.detach(),
            "loss/ca": loss_ca.detach(),
            "loss/local": loss_local.detach(),
            "loss/distogram": loss_dgram.detach(),
            "loss/distance": loss_dist.detach(),
        }
        return total, logs, {"z": z, "x37": x37, "mask": mask, "ca": ca, "graph": g, **out}


@torch.no_grad()
def reconstruction_metrics(model: ProteinAutoencoder, batch: ProteinBatch) -> dict[str, float]:
    """Per protein, then averaged: all-atom and backbone RMSD after Kabsch (decoding from latents alone, and given
    the true C-alpha trace), side-chain RMSD in the residue frame, chi1 accuracy (within 40°), residue-type
    accuracy, distogram contact precision (top-L pairs at |i-j| >= 6 with P(d < 8 Å), C-alpha)."""
    from .residues import kabsch_rmsd

    g = model.graph(batch)
    dtype = model.latent_mean.dtype
    pos = g.positions.to(dtype)
    z = model.encoder(g, pos)
    x37, mask = to_atom37(pos, g)
    ca = g.ca_positions(pos)
    free = model.decoder(z, g, None)  # from latents alone
    given = model.decoder(z, g, ca)  # on the true trace
    side = mask.clone()
    side[:, _BACKBONE_SLOTS] = False
    rows: dict[str, list[float]] = {k: [] for k in ("rmsd_all", "rmsd_backbone", "rmsd_all_given_ca", "rmsd_ca")}
    for b in range(g.num_graphs):
        r = g.residue_batch == b
        m = mask[r]
        bb = torch.zeros_like(m)
        bb[:, _BACKBONE_SLOTS] = m[:, _BACKBONE_SLOTS]
        rows["rmsd_all"].append(float(kabsch_rmsd(free["atom37"][r][m], x37[r][m])))
        rows["rmsd_backbone"].append(float(kabsch_rmsd(free["atom37"][r][bb], x37[r][bb])))
        rows["rmsd_all_given_ca"].append(float(kabsch_rmsd(given["atom37"][r][m], x37[r][m])))
        rows["rmsd_ca"].append(float(kabsch_rmsd(free["ca"][r], ca[r])))
    out = {k: sum(v) / len(v) for k, v in rows.items()}
    target_local = local_atom37(x37, ca, g.residue_chain)
    sc_err = ((given["local"] - target_local) ** 2).sum(-1)
    out["rmsd_side_chain_local"] = float((sc_err * side).sum() / side.sum().clamp_min(1)) ** 0.5
    out["type_acc"] = float((free["type_logits"].argmax(-1) == g.residue_type).float().mean())
    out["chi1_acc_40"] = _chi1_accuracy(given["atom37"], x37, mask, g.residue_type)
    out["contact_precision_L"] = _contact_precision(free["distogram"], g, ca)
    return out


def _chi1_accuracy(pred37: Tensor, true37: Tensor, mask: Tensor, types: Tensor) -> float:
    n, ca, cb = (ATOM37_INDEX[a] for a in ("N", "CA", "CB"))
    hits, total = 0, 0
    for k, res in enumerate(RESIDUES):
        if res not in CHI1_ATOM:
            continue
        g = ATOM37_INDEX[CHI1_ATOM[res]]
        sel = (types == k) & mask[:, n] & mask[:, ca] & mask[:, cb] & mask[:, g]
        if not sel.any():
            continue
        chi_p = dihedral(pred37[sel, n], pred37[sel, ca], pred37[sel, cb], pred37[sel, g])
        chi_t = dihedral(true37[sel, n], true37[sel, ca], true37[sel, cb], true37[sel, g])
        diff = torch.remainder(chi_p - chi_t + math.pi, 2 * math.pi) - math.pi
        hits += int((diff.abs() < math.radians(40)).sum())
        total += int(sel.sum())
    return hits / max(total, 1)


def _contact_precision(dgram: Tensor, batch: ProteinBatch, ca: Tensor) -> float:
    i, j = residue_pairs(batch)
    edges = torch.linspace(BIN_MIN, BIN_MAX, NUM_BINS - 1, device=dgram.device)
    below = int(torch.bucketize(torch.tensor(8.0), edges)) + 1  # bins entirely below 8 Å
    p_contact = dgram.softmax(-1)[:, :below].sum(-1)
    true = (ca[i] - ca[j]).norm(dim=-1) < 8.0
    far = (batch.residue_position[j] - batch.residue_position[i]).abs() >= 6
    precisions = []
    for b in range(batch.num_graphs):
        sel = (batch.residue_batch[i] == b) & far
        length = int((batch.residue_batch == b).sum())
        if sel.sum() == 0:
            continue
        top = p_contact[sel].topk(min(length, int(sel.sum()))).indices
        precisions.append(float(true[sel][top].float().mean()))
    return sum(precisions) / len(precisions) if precisions else float("nan")


def slae_tiny(latent_dim: int = 4, r_max: float = 4.0, latent_noise: float = 0.0) -> ProteinAutoencoder:
    """Preset for tests and smoke runs (tens of thousands of parameters)."""
    enc = LocalResidueEncoder(r_max=r_max, channels=8, atom_dim=16, hidden=32, latent_dim=latent_dim)
    return ProteinAutoencoder(enc, ResidueDecoder(latent_dim, width=32, depth=1, heads=2, pair_dim=8), latent_noise)


def slae_small(latent_dim: int = 8, r_max: float = 5.0, latent_noise: float = 0.05) -> ProteinAutoencoder:
    """Preset for CPU training on peptides and small-protein crops."""
    enc = LocalResidueEncoder(r_max=r_max, channels=16, atom_dim=64, hidden=128, latent_dim=latent_dim)
    return ProteinAutoencoder(enc, ResidueDecoder(latent_dim, width=128, depth=3, heads=4, pair_dim=32), latent_noise)
