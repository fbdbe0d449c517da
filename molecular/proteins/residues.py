"""Residue-level token sets: batches of proteins, per-residue pooling of atom tokens, the atom37 layout, frames.

A :class:`ProteinBatch` is a :class:`molecular.data.GraphBatch` (atoms are tokens; every encoder of the molecular
backend takes it) with the residue structure on top: ``atom_residue[T]`` maps each atom to its residue in the
batch (``0 .. R-1``), ``residue_batch[R]`` each residue to its protein. :func:`pool_residues` turns a
:class:`~unirep.tokens.TokenSet` over atoms into one over residues (mean of the residue's atoms, or its CA atom),
so alignment (``unirep.align``) and the platonic metrics (``unirep.metrics``) work per residue as they do per atom;
:func:`to_atom37` lays per-atom values out as ``[R, 37, k]`` with a mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from molecular.data import AtomicGraph, GraphBatch, Structure
from unirep.tokens import TokenSet, segment_mean, segment_sum

from .constants import ATOM37, ATOM37_INDEX
from .io import ProteinStructure

__all__ = [
    "ProteinBatch",
    "collate_proteins",
    "pool_residues",
    "to_atom37",
    "residue_frames",
    "ca_frames",
    "dihedral",
    "backbone_torsions",
    "kabsch_rmsd",
]


@dataclass
class ProteinBatch(GraphBatch):
    """A :class:`GraphBatch` of proteins with per-residue structure (R residues in the batch).

    Attributes (beyond :class:`GraphBatch`):
        atom_residue: residue of each atom in the batch ``[T]`` (``0 .. R-1``).
        atom37_slot: atom37 slot of each atom, ``-1`` for hydrogens and other names ``[T]``.
        residue_batch: protein of each residue ``[R]``.
        residue_type: residue type (``constants.RESIDUES`` order, 20 = unknown) ``[R]``.
        residue_chain: chain of each residue, numbered across the batch ``[R]`` (chain breaks for sequence models).
        residue_position: index of the residue within its chain ``[R]``.
        ca_atom: atom index of each residue's CA, ``-1`` where absent ``[R]``.
    """

    atom_residue: Tensor | None = None
    atom37_slot: Tensor | None = None
    residue_batch: Tensor | None = None
    residue_type: Tensor | None = None
    residue_chain: Tensor | None = None
    residue_position: Tensor | None = None
    ca_atom: Tensor | None = None

    @property
    def num_residues(self) -> int:
        return int(self.residue_batch.numel())

    def residue_tokens(self, x: Tensor, pos: Tensor | None = None) -> TokenSet:
        """A :class:`TokenSet` over residues (``x[R, D]``; ``pos`` defaults to the CA coordinates)."""
        if pos is None:
            pos = self.ca_positions()
        return TokenSet(x, self.residue_batch, pos, self.num_graphs)

    def select(self, items: Sequence[int]) -> ProteinBatch:
        """A sub-batch of the given proteins (residue structure kept; no radius graph, no labels)."""
        items = [int(i) for i in items]
        atoms = torch.cat([torch.arange(int(self.ptr[i]), int(self.ptr[i + 1]), device=self.ptr.device) for i in items])
        res = torch.cat([torch.nonzero(self.residue_batch == i).squeeze(1) for i in items])
        counts = torch.stack([self.ptr[i + 1] - self.ptr[i] for i in items])
        rcounts = torch.stack([(self.residue_batch == i).sum() for i in items])
        ptr = torch.zeros(len(items) + 1, dtype=torch.long, device=self.ptr.device)
        ptr[1:] = torch.cumsum(counts, 0)
        new_items = torch.arange(len(items), device=self.ptr.device)
        # atoms -> residues: renumber residues consecutively in the new order
        remap = torch.full((self.num_residues,), -1, dtype=torch.long, device=self.ptr.device)
        remap[res] = torch.arange(res.numel(), device=res.device)
        ca = self.ca_atom[res]
        _, chain = torch.unique_consecutive(self.residue_chain[res], return_inverse=True)
        atom_remap = torch.full((self.numbers.numel(),), -1, dtype=torch.long, device=self.ptr.device)
        atom_remap[atoms] = torch.arange(atoms.numel(), device=atoms.device)
        return ProteinBatch(
            numbers=self.numbers[atoms],
            positions=self.positions[atoms],
            batch=new_items.repeat_interleave(counts),
            ptr=ptr,
            ids=[self.ids[i] for i in items] if self.ids else [],
            atom_residue=remap[self.atom_residue[atoms]],
            atom37_slot=self.atom37_slot[atoms],
            residue_batch=new_items.repeat_interleave(rcounts),
            residue_type=self.residue_type[res],
            residue_chain=chain,
            residue_position=self.residue_position[res],
            ca_atom=torch.where(ca >= 0, atom_remap[ca.clamp_min(0)], ca),
        )

    def item_digests(self) -> list[str]:
        """A content key per protein (elements, coordinates, residue assignment)."""
        import hashlib

        out = []
        for g in range(self.num_graphs):
            a, b = int(self.ptr[g]), int(self.ptr[g + 1])
            h = hashlib.sha1(self.numbers[a:b].cpu().numpy().tobytes())
            h.update(self.positions[a:b].detach().cpu().float().numpy().tobytes())
            h.update((self.atom_residue[a:b] - self.atom_residue[a]).cpu().numpy().tobytes())
            out.append(h.hexdigest())
        return out

    def ca_positions(self, positions: Tensor | None = None) -> Tensor:
        """CA coordinates ``[R, 3]`` (a residue without CA gets the mean of its atoms)."""
        positions = self.positions if positions is None else positions
        mean = segment_mean(positions, self.atom_residue, self.num_residues)
        has = self.ca_atom >= 0
        return torch.where(has[:, None], positions[self.ca_atom.clamp_min(0)], mean)


def collate_proteins(proteins: Sequence[ProteinStructure], r_max: float | None = None) -> ProteinBatch:
    """Batch proteins; ``r_max`` builds the radius graph (every encoder needs one), ``None`` leaves it out."""
    if len(proteins) == 0:
        raise ValueError("collate_proteins: empty list of proteins")
    for k, p in enumerate(proteins):
        if not isinstance(p, ProteinStructure):
            raise TypeError(f"collate_proteins: item {k} is a {type(p).__name__}, not a ProteinStructure")
    if r_max is not None:
        from molecular.data import collate_graphs

        base = collate_graphs([AtomicGraph.from_structure(p, r_max) for p in proteins])
    else:
        counts = torch.tensor([len(p) for p in proteins])
        ptr = torch.zeros(len(proteins) + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(counts, 0)
        base = GraphBatch(
            numbers=torch.cat([torch.as_tensor(p.numbers) for p in proteins]),
            positions=torch.cat([torch.as_tensor(p.positions) for p in proteins]),
            batch=torch.arange(len(proteins)).repeat_interleave(counts),
            ptr=ptr,
            ids=[p.id for p in proteins],
        )
    res_off, atom_off, chain_off = 0, 0, 0
    atom_residue, slots, rbatch, rtype, rchain, rpos, ca = [], [], [], [], [], [], []
    for k, p in enumerate(proteins):
        nr = p.num_residues
        atom_residue.append(torch.as_tensor(p.residue_index) + res_off)
        slots.append(torch.as_tensor(p.atom37_slot))
        rbatch.append(torch.full((nr,), k, dtype=torch.long))
        rtype.append(torch.as_tensor(p.residue_types))
        _, chains = np.unique(p.residue_chains, return_inverse=True)
        chains = chains.reshape(-1)
        rchain.append(torch.as_tensor(chains) + chain_off)
        position = np.zeros(nr, dtype=np.int64)
        for c in np.unique(chains):
            position[chains == c] = np.arange(int((chains == c).sum()))
        rpos.append(torch.as_tensor(position))
        ca_idx = torch.as_tensor(p.atom_index("CA"))
        ca.append(torch.where(ca_idx >= 0, ca_idx + atom_off, ca_idx))
        res_off, atom_off, chain_off = res_off + nr, atom_off + len(p), chain_off + int(chains.max()) + 1
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return ProteinBatch(
        **fields,
        atom_residue=torch.cat(atom_residue),
        atom37_slot=torch.cat(slots),
        residue_batch=torch.cat(rbatch),
        residue_type=torch.cat(rtype),
        residue_chain=torch.cat(rchain),
        residue_position=torch.cat(rpos),
        ca_atom=torch.cat(ca),
    )


def pool_residues(tokens: TokenSet, batch: ProteinBatch, reduce: str = "mean", atoms: Tensor | None = None) -> TokenSet:
    """Atom tokens -> residue tokens (``pos``: CA coordinates).

    ``reduce``: ``"mean"`` or ``"sum"`` over the residue's atoms, or ``"ca"`` (the CA atom's token: for a strictly
    local encoder the environment centred on CA). ``atoms[T]`` (bool) restricts the pooled atoms (e.g. heavy atoms
    only); a residue with none of them gets zeros.
    """
    if tokens.x.shape[0] != batch.atom_residue.shape[0]:
        raise ValueError(f"pool_residues: {tokens.x.shape[0]} atom tokens for a batch of {batch.atom_residue.shape[0]}")
    r = batch.num_residues
    index = batch.atom_residue.to(tokens.x.device)
    if reduce == "ca":
        if (batch.ca_atom < 0).any():
            raise ValueError("pool_residues(reduce='ca'): some residues have no CA atom; use reduce='mean'")
        x = tokens.x[batch.ca_atom.to(tokens.x.device)]
    elif reduce in ("mean", "sum"):
        x, idx = tokens.x, index
        if atoms is not None:
            x, idx = x[atoms], idx[atoms]
        x = segment_mean(x, idx, r) if reduce == "mean" else segment_sum(x, idx, r)
    else:
        raise ValueError(f"pool_residues: unknown reduce {reduce!r}; use 'mean', 'sum' or 'ca'")
    pos = batch.ca_positions().to(x)
    return TokenSet(x, batch.residue_batch.to(x.device), pos, batch.num_graphs)


def to_atom37(values: Tensor, batch: ProteinBatch) -> tuple[Tensor, Tensor]:
    """Per-atom ``values[T, k]`` -> ``[R, 37, k]`` and the mask ``[R, 37]`` (hydrogens and other names left out)."""
    keep = batch.atom37_slot >= 0
    out = values.new_zeros((batch.num_residues, len(ATOM37), values.shape[-1]))
    mask = torch.zeros(batch.num_residues, len(ATOM37), dtype=torch.bool, device=values.device)
    out[batch.atom_residue[keep], batch.atom37_slot[keep]] = values[keep]
    mask[batch.atom_residue[keep], batch.atom37_slot[keep]] = True
    return out, mask


def residue_frames(n: Tensor, ca: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Backbone frames (AlphaFold's Gram-Schmidt on N, CA, C): rotations ``[R, 3, 3]`` (columns = axes) and origins
    (CA) ``[R, 3]``. Global coordinates of a local point ``p``: ``rot @ p + ca``."""
    e1 = torch.nn.functional.normalize(c - ca, dim=-1)
    u2 = n - ca
    e2 = torch.nn.functional.normalize(u2 - (u2 * e1).sum(-1, keepdim=True) * e1, dim=-1)
    e3 = torch.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1), ca


def ca_frames(ca: Tensor, chain: Tensor) -> Tensor:
    """Frames from a CA trace alone ``[R, 3, 3]``: for residue i, e1 along ``CA[i+1] - CA[i-1]`` and e2 towards the
    bisector ``2 CA[i] - CA[i-1] - CA[i+1]`` (chain ends use their two nearest neighbours in the chain).

    Built only from differences of CA coordinates, so the frames rotate with the trace (SE(3)-equivariant): a
    decoder that places atoms in these frames from invariant inputs is SE(3)-equivariant by construction.
    """
    r = ca.shape[0]
    idx = torch.arange(r, device=ca.device)
    # first and last residue of each residue's chain (chains are contiguous runs of residues)
    new_chain = torch.ones(r, dtype=torch.bool, device=ca.device)
    new_chain[1:] = chain[1:] != chain[:-1]
    start = torch.cummax(torch.where(new_chain, idx, torch.zeros_like(idx)), 0).values
    end_flag = torch.ones(r, dtype=torch.bool, device=ca.device)
    end_flag[:-1] = chain[1:] != chain[:-1]
    end = torch.flip(torch.cummin(torch.flip(torch.where(end_flag, idx, torch.full_like(idx, r)), [0]), 0).values, [0])
    # the triangle (m-1, m, m+1) with m the residue itself, moved inwards at chain ends (chains of >= 3 residues)
    m = torch.minimum(torch.maximum(idx, start + 1), end - 1).clamp(0, r - 1)
    a, b, cc = (m - 1).clamp(0, r - 1), m, (m + 1).clamp(0, r - 1)
    pa, pb, pc = ca[a], ca[b], ca[cc]
    e1 = torch.nn.functional.normalize(pc - pa, dim=-1, eps=1e-8)
    u2 = 2 * pb - pa - pc
    u2 = u2 - (u2 * e1).sum(-1, keepdim=True) * e1
    e2 = torch.nn.functional.normalize(u2, dim=-1, eps=1e-8)
    e3 = torch.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1)


def dihedral(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    """Dihedral angle (radians, in (-π, π]) of four points ``[..., 3]`` each."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = torch.nn.functional.normalize(b1, dim=-1)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


def backbone_torsions(atom37: Tensor, mask: Tensor, chain: Tensor) -> tuple[Tensor, Tensor]:
    """phi and psi per residue ``[R, 2]`` (radians) and their validity mask ``[R, 2]`` (chain ends, missing atoms).

    phi_i = C_{i-1}-N_i-CA_i-C_i, psi_i = N_i-CA_i-C_i-N_{i+1}.
    """
    n_, ca_, c_ = (ATOM37_INDEX[a] for a in ("N", "CA", "C"))
    r = atom37.shape[0]
    idx = torch.arange(r, device=atom37.device)
    prev, nxt = (idx - 1).clamp_min(0), (idx + 1).clamp_max(r - 1)
    phi = dihedral(atom37[prev, c_], atom37[:, n_], atom37[:, ca_], atom37[:, c_])
    psi = dihedral(atom37[:, n_], atom37[:, ca_], atom37[:, c_], atom37[nxt, n_])
    bb = mask[:, n_] & mask[:, ca_] & mask[:, c_]
    ok_phi = bb & (idx > 0) & (chain == chain[prev]) & mask[prev, c_]
    ok_psi = bb & (idx < r - 1) & (chain == chain[nxt]) & mask[nxt, n_]
    # a chain break inside one chain id (missing residues): the peptide bond is longer than 2 Å
    ok_phi &= (atom37[prev, c_] - atom37[:, n_]).norm(dim=-1) < 2.0
    ok_psi &= (atom37[:, c_] - atom37[nxt, n_]).norm(dim=-1) < 2.0
    return torch.stack([phi, psi], -1), torch.stack([ok_phi, ok_psi], -1)


def kabsch_rmsd(mobile: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """RMSD (Å) of two point sets ``[N, 3]`` after optimal proper superposition (weights: a 0/1 mask ``[N]``)."""
    mobile, target = mobile.double(), target.double()
    w = torch.ones(mobile.shape[0], dtype=mobile.dtype, device=mobile.device) if weights is None else weights.double()
    if w.sum() < 1:
        return mobile.new_tensor(math.nan)
    cm = (w[:, None] * mobile).sum(0) / w.sum()
    ct = (w[:, None] * target).sum(0) / w.sum()
    m0, t0 = mobile - cm, target - ct
    h = (w[:, None, None] * m0[:, :, None] * t0[:, None, :]).sum(0)
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(u @ vt))
    rot = u @ torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d])) @ vt
    diff = m0 @ rot - t0
    return ((w * (diff**2).sum(-1)).sum() / w.sum()).sqrt()


def structures_of(batch: ProteinBatch) -> list[Structure]:
    """Plain structures of a batch (an encoder that wants a list)."""
    out = []
    for g in range(batch.num_graphs):
        a, b = int(batch.ptr[g]), int(batch.ptr[g + 1])
        out.append(Structure(batch.numbers[a:b].cpu().numpy(), batch.positions[a:b].detach().cpu().double().numpy()))
    return out
