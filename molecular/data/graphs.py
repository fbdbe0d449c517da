"""Neighbour graphs and the one batch type of atomistic data.

Atoms are tokens: a batch of structures is one :class:`GraphBatch` whose ``batch`` vector (graph index per atom,
the torch_geometric convention) turns any per-atom feature matrix into a :class:`unirep.TokenSet`. The same class
carries a radius graph (force fields, teachers, the local autoencoder), a molecule's bond graph and rdkit atom
features (conformer generation), or both; the parts a batch lacks are ``None``.

The radius-graph layout is the one MACE's modules consume (ACEsuit/mace ``mace/data/neighborhood.py``,
``mace/modules/utils.py``): ``edge_index = [sender, receiver]``, edge vector ``r_receiver - r_sender + shifts``
with ``shifts = unit_shifts @ cell``. Neighbour lists come from ``matscipy.neighbours.neighbour_list`` (pyg-lib's
``radius_graph`` does not install here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from unirep.tokens import TokenSet

from .structure import Structure, StructureError

__all__ = ["neighbour_graph", "AtomicGraph", "GraphBatch", "collate_graphs", "regraph", "z_lookup", "species_index"]


def z_lookup(z_table: Sequence[int]) -> Tensor:
    """``lookup[119]``: the index of each atomic number in ``z_table``, ``-1`` for the elements not in it."""
    lookup = torch.full((119,), -1, dtype=torch.long)
    lookup[torch.as_tensor([int(z) for z in z_table], dtype=torch.long)] = torch.arange(len(z_table))
    return lookup


def species_index(lookup: Tensor, numbers: Tensor, z_table: Sequence[int], owner: str = "model") -> Tensor:
    """``z_table`` indices of atomic ``numbers`` through a :func:`z_lookup` table; an element outside the table
    raises a ``ValueError`` naming it, the table and the fix."""
    lookup = lookup.to(numbers.device)
    idx = lookup[numbers.clamp(0, lookup.numel() - 1)]
    bad_mask = (idx < 0) | (numbers >= lookup.numel()) | (numbers < 0)
    if bad_mask.any():
        bad = sorted({int(z) for z in numbers[bad_mask].tolist()})
        raise ValueError(
            f"atomic number(s) {bad} not in the {owner}'s z_table {list(z_table)}; remove those structures or "
            f"build the {owner} with a larger z_table"
        )
    return idx


def neighbour_graph(
    positions: np.ndarray, r_max: float, cell: np.ndarray | None = None, pbc: Sequence[bool] = (False, False, False)
) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges within ``r_max`` (self-edges excluded): ``edge_index[2, E]`` (sender, receiver) and
    integer ``unit_shifts[E, 3]`` such that the edge vector is ``r[receiver] - r[sender] + unit_shifts @ cell``."""
    from matscipy.neighbours import neighbour_list

    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        # matscipy needs a box; a molecule gets one larger than its extent, with no periodicity
        extent = positions.max(0) - positions.min(0) if len(positions) else np.zeros(3)
        cell = np.diag(extent + 2 * r_max + 1.0)
        pos = positions - positions.min(0) + r_max + 0.5 if len(positions) else positions
    else:
        if abs(np.linalg.det(cell)) < 1e-8:
            raise StructureError("periodic structure with a singular cell; give a proper cell or pbc=False")
        pos = positions
    i, j, S = neighbour_list("ijS", positions=pos, cell=cell, pbc=pbc, cutoff=float(r_max))
    # matscipy: D = r[j] - r[i] + S @ cell, i.e. i sends to j. MACE uses r[receiver] - r[sender] + shifts.
    keep = ~((i == j) & (S == 0).all(1))
    edge_index = np.stack([i[keep], j[keep]]).astype(np.int64)
    return edge_index, S[keep].astype(np.int64)


@dataclass
class AtomicGraph:
    """A single structure as tensors, ready for collation."""

    numbers: Tensor  # [N] long
    positions: Tensor  # [N, 3] float64
    edge_index: Tensor  # [2, E] long
    unit_shifts: Tensor  # [E, 3] float64 (integer values)
    cell: Tensor  # [3, 3] float64
    pbc: Tensor  # [3] bool
    energy: Tensor | None  # [] float64
    forces: Tensor | None  # [N, 3] float64
    id: str

    @classmethod
    def from_structure(cls, s: Structure, r_max: float) -> AtomicGraph:
        ei, us = neighbour_graph(s.positions, r_max, s.cell, s.pbc)
        return cls(
            numbers=torch.as_tensor(s.numbers, dtype=torch.long),
            positions=torch.as_tensor(s.positions, dtype=torch.float64),
            edge_index=torch.as_tensor(ei),
            unit_shifts=torch.as_tensor(us, dtype=torch.float64),
            cell=torch.as_tensor(s.cell, dtype=torch.float64),
            pbc=torch.tensor(s.pbc, dtype=torch.bool),
            energy=None if s.energy is None else torch.tensor(s.energy, dtype=torch.float64),
            forces=None if s.forces is None else torch.as_tensor(s.forces, dtype=torch.float64),
            id=s.id,
        )


@dataclass
class GraphBatch:
    """A padding-free batch of atomic structures (atoms are tokens, ``batch[T]`` the graph index).

    Always present: ``numbers``, ``positions``, ``batch``, ``ptr`` (graph ``i`` owns atoms ``ptr[i]:ptr[i+1]``)
    and ``ids``. The radius graph (``edge_index`` ... ``pbc``) is set by :func:`collate_graphs` and
    :meth:`radius_graph`; ``energy[B]`` and ``forces[T, 3]`` when every structure is labelled; the molecular graph
    (``atom_types`` ... ``smiles``) by ``molecular.conformers.collate_molecules``.
    """

    numbers: Tensor  # [T] atomic numbers
    positions: Tensor  # [T, 3] Å
    batch: Tensor  # [T]
    ptr: Tensor  # [B + 1]
    ids: list[str] = field(default_factory=list)  # one per graph (teacher-feature cache keys)
    # radius graph
    edge_index: Tensor | None = None  # [2, E], offsets applied
    shifts: Tensor | None = None  # [E, 3] Å
    unit_shifts: Tensor | None = None  # [E, 3]
    cell: Tensor | None = None  # [B, 3, 3]
    pbc: Tensor | None = None  # [B, 3] bool
    # labels
    energy: Tensor | None = None  # [B] eV
    forces: Tensor | None = None  # [T, 3] eV/Å
    # molecular graph
    atom_types: Tensor | None = None  # [T] index into molecular.conformers.SUPPORTED_ELEMENTS
    atom_features: Tensor | None = None  # [T, F]
    bond_index: Tensor | None = None  # [2, 2 * bonds] global atom indices, both directions
    bond_types: Tensor | None = None  # [2 * bonds]
    mol_index: Tensor | None = None  # [B] index of each graph's molecule in its data set
    smiles: list[str] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        return int(self.ptr.numel() - 1)

    @property
    def num_atoms(self) -> Tensor:
        """Atoms per graph ``[B]``."""
        return self.ptr[1:] - self.ptr[:-1]

    def to(self, device: torch.device | str) -> GraphBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})

    def tokens(self, x: Tensor | None = None) -> TokenSet:
        """A :class:`TokenSet` over the atoms: ``x`` per-atom features (default: atomic numbers as a column),
        ``pos`` the coordinates."""
        if x is None:
            x = self.numbers.to(self.positions.dtype)[:, None]
        return TokenSet(x, self.batch, self.positions, self.num_graphs)

    def radius_graph(self, r_max: float, positions: Tensor | None = None) -> GraphBatch:
        """The same structures (at ``positions``, default ``self.positions``) with a radius graph of ``r_max`` Å
        (float64 positions, no cell, no labels, no molecular graph): the input of the atomistic teachers and of the
        local autoencoder for a batch of molecules."""
        positions = self.positions if positions is None else positions
        numbers, pos, index = self.numbers.cpu(), positions.detach().cpu().double(), self.batch.cpu()
        graphs = []
        for g in range(self.num_graphs):
            m = index == g  # atoms of graph g, wherever they sit in the batch
            s = Structure(numbers[m].numpy(), pos[m].numpy(), id=self.ids[g] if self.ids else "")
            graphs.append(AtomicGraph.from_structure(s, r_max))
        return collate_graphs(graphs).to(self.positions.device)

    def select(self, items: Sequence[int]) -> GraphBatch:
        """A sub-batch with the given graphs (used to split a batch for evaluation); needs the radius graph."""
        return collate_graphs([self.graph(i) for i in items])

    def graph(self, i: int) -> AtomicGraph:
        if self.edge_index is None:
            raise ValueError("GraphBatch.graph: this batch has no radius graph; call radius_graph(r_max) first")
        a, b = int(self.ptr[i]), int(self.ptr[i + 1])
        emask = (self.edge_index[0] >= a) & (self.edge_index[0] < b)
        return AtomicGraph(
            self.numbers[a:b],
            self.positions[a:b],
            self.edge_index[:, emask] - a,
            self.unit_shifts[emask],
            self.cell[i],
            self.pbc[i],
            None if self.energy is None else self.energy[i],
            None if self.forces is None else self.forces[a:b],
            self.ids[i],
        )


def regraph(batch: GraphBatch, r_max: float) -> GraphBatch:
    """The same structures with neighbour lists recomputed for another cutoff (a teacher's ``r_max``)."""
    graphs = []
    for i in range(batch.num_graphs):
        g = batch.graph(i)
        ei, us = neighbour_graph(
            g.positions.detach().cpu().double().numpy(), r_max, g.cell.cpu().double().numpy(), g.pbc.cpu().tolist()
        )
        graphs.append(
            replace(
                g,
                edge_index=torch.as_tensor(ei, device=g.positions.device),
                unit_shifts=torch.as_tensor(us, dtype=g.unit_shifts.dtype, device=g.positions.device),
            )
        )
    return collate_graphs(graphs)


def collate_graphs(graphs: Sequence[AtomicGraph]) -> GraphBatch:
    """Concatenate graphs: node offsets on ``edge_index``, ``shifts = unit_shifts @ cell`` per graph."""
    if len(graphs) == 0:
        raise ValueError("collate_graphs: empty list of graphs")
    device = graphs[0].positions.device
    counts = torch.tensor([g.numbers.numel() for g in graphs], dtype=torch.long, device=device)
    ptr = torch.zeros(len(graphs) + 1, dtype=torch.long, device=device)
    ptr[1:] = torch.cumsum(counts, 0)
    edge_index = torch.cat([g.edge_index + ptr[k] for k, g in enumerate(graphs)], dim=1)
    shifts = torch.cat([g.unit_shifts @ g.cell for g in graphs])  # [E, 3] Å
    labelled = all(g.energy is not None and g.forces is not None for g in graphs)
    return GraphBatch(
        numbers=torch.cat([g.numbers for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        edge_index=edge_index,
        shifts=shifts,
        unit_shifts=torch.cat([g.unit_shifts for g in graphs]),
        cell=torch.stack([g.cell for g in graphs]),
        pbc=torch.stack([g.pbc for g in graphs]),
        batch=torch.arange(len(graphs), device=device).repeat_interleave(counts),
        ptr=ptr,
        energy=torch.stack([g.energy for g in graphs]) if labelled else None,
        forces=torch.cat([g.forces for g in graphs]) if labelled else None,
        ids=[g.id for g in graphs],
    )
