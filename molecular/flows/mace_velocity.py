"""A MACE velocity network for the conformer flow, optionally initialised from a MACE force field (shared backbone).

The unification in the title of MACE-REPA ("Unifying Force Prediction and Molecular Conformation Generation Through
Representation Alignment"): one equivariant network serves as force field and as generator. Here the trunk of the
conformer generator *is* the project's MACE (:class:`~molecular.models.MACEModel`, a ``mace.modules.ScaleShiftMACE``;
Batatia et al. 2022, ACEsuit/mace ``mace/modules/models.py`` ``ScaleShiftMACE.forward``): node embedding, Bessel
radial basis with the polynomial envelope, spherical harmonics of the edge vectors, then per interaction the
interaction block (``mace/modules/blocks.py``) and the symmetric-contraction product block, called in MACE's own
order with MACE's own modules, so :meth:`MACEVelocityNet.from_force_field` starts from a force field trained by
``experiment=molecular/foundation`` (or any file :func:`molecular.teachers.load_mace_model` reads) bit for bit.
The energy readouts, E0s and scale/shift are kept (so the state dict mirrors the force field's) but frozen: the
velocity does not use them.

What the flow adds around the trunk, as the EGNN (:mod:`molecular.flows.egnn`) and the ET (:mod:`molecular.flows.et`)
do, with the same interface (``forward_intermediates(batch, x_t, t, indices) -> (v, list[TokenSet])``,
``feature_dim``, ``num_layers``):

- the element one-hot over the trunk's element table is MACE's node attribute (the data's elements are mapped onto
  the force field's table by atomic number; an element it lacks stops with its symbol);
- time and the other atom features (charge, aromaticity, hybridisation, ring) enter as an invariant embedding: a
  sinusoidal time embedding (scale 1000, as the EGNN/ET) concatenated with the atom features, an MLP, and one
  *zero-initialised* linear per interaction that adds it to the scalar (``0e``) channels of that interaction's input.
  Zero-initialised so that, at the start, every trunk feature equals the force field's (adaLN-zero's reasoning:
  the pretrained function is the starting point, the conditioning is learned as a perturbation of it);
- the bond graph enters on the edges: a zero-initialised embedding of the bond order (``padding_idx`` 0: no bond)
  added to the radial features of every bonded pair. Edges are every pair within the cutoff (MACE's radius graph on
  ``x_t``) plus every bond, at any length, so a stretched noisy molecule stays connected along its bonds; a pair
  beyond the cutoff that is not bonded has zero radial features and would carry no message anyway;
- the velocity is read out from the ``1o`` channels (polar vectors) of every layer that has them: a bias-free linear
  mix of those channels, gated per channel by an MLP of the invariant features (all layers' scalars and the time
  embedding), summed to one vector per atom, then the zero-centre-of-mass projection.

Why a linear readout of the ``1o`` channels rather than minus the gradient of a time-conditioned scalar: the flow's
velocity field need not be conservative (a gradient field is curl-free; the marginal velocity of Kabsch-aligned,
bridge-noised pairs has no reason to be), and the gradient readout needs a second backward pass through the trunk
in every training step (``create_graph``), roughly doubling the cost on CPU. The ``1o`` channels already rotate as
vectors, so a linear map on them is equivariant by construction.

Symmetry: only distances, the spherical harmonics of edge vectors and invariant inputs enter; ``1o`` channels
transform as polar vectors and the gates are invariant, so ``v`` is O(3)-equivariant (rotations *and* reflections)
and translation-invariant, like ET-Flow's ``qm9-o3`` network: chirality is corrected post hoc by the task.

Intermediates (``unirep.intermediates`` convention): index 0 is the node embedding plus the first conditioning
injection, ``k`` the product-block output of interaction ``k``, in ``features`` mode (``scalars`` by default:
invariant, what conformer REPA aligns).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from molecular.conformers.data import NUM_ATOM_FEATURES, NUM_BOND_TYPES
from molecular.data import species_index
from molecular.models import MACEModel, contract_irreps, contracted_dim, default_dtype
from unirep.intermediates import feature_take_indices, normalize_index
from unirep.nn import timestep_embedding
from unirep.tokens import TokenSet

from .egnn import bond_edge_types, full_edges, per_atom_time, remove_mean

__all__ = ["MACEVelocityNet", "ForceFieldMACEVelocityNet", "check_trunk_elements"]


def _scalar_count(irreps) -> int:
    return sum(mul for mul, ir in irreps if ir.l == 0 and ir.p == 1)


def _vector_slices(irreps) -> list[tuple[int, int]]:
    """``(start, multiplicity)`` of every ``1o`` block in e3nn's ``mul x ir`` layout (``[mul, 3]`` per block)."""
    out, start = [], 0
    for mul, ir in irreps:
        if ir.l == 1 and ir.p == -1:
            out.append((start, mul))
        start += mul * ir.dim
    return out


def check_trunk_elements(
    numbers: Tensor | Sequence[int], z_table: Sequence[int], source: str = "the MACE trunk"
) -> None:
    """Refuse atomic numbers outside ``z_table`` with their element symbols, the table and the fix."""
    from ase.data import chemical_symbols

    found = {int(z) for z in (numbers.unique().tolist() if isinstance(numbers, Tensor) else numbers)}
    missing = sorted(found - {int(z) for z in z_table})
    if missing:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
        raise ValueError(
            f"{source} does not know element(s) {names} of the data (its element table is "
            f"{[chemical_symbols[int(z)] for z in z_table]}): use a force field trained on those elements, drop those "
            "molecules, or train the MACE velocity network from scratch with a larger z_table "
            "(experiment=molecular/conformer_mace task.model.trunk.z_table=[...])"
        )


class MACEVelocityNet(nn.Module):
    """Conformer velocity ``v[T, 3]`` (zero mean per molecule) from a MACE trunk conditioned on time and the graph.

    Args:
        trunk: a built :class:`~molecular.models.MACEModel` (random, or a force field: :meth:`from_force_field`);
            it needs ``1o`` channels in some layer (``max_L >= 1``).
        num_atom_features / num_bond_types: the conformer data's atom feature width and bond orders.
        hidden: width of the conditioning MLP and of the velocity head's channels.
        time_dim: size of the sinusoidal time embedding.
        features: intermediates mode (:func:`molecular.models.contract_irreps`): ``scalars``, ``norms`` or ``full``.
    """

    def __init__(
        self,
        trunk: MACEModel,
        num_atom_features: int = NUM_ATOM_FEATURES,
        num_bond_types: int = NUM_BOND_TYPES,
        hidden: int = 64,
        time_dim: int = 32,
        features: str = "scalars",
    ) -> None:
        super().__init__()
        if not isinstance(trunk, MACEModel):
            raise TypeError(f"trunk must be a molecular.models.MACEModel, got {type(trunk).__name__}")
        self.trunk = trunk
        self.time_dim, self.hidden, self.features = time_dim, hidden, features
        irreps = trunk.layer_irreps  # index 0 the embedding, k the product block of interaction k
        self._vectors = [_vector_slices(ir) for ir in irreps[1:]]
        num_vec = sum(m for sl in self._vectors for _, m in sl)
        if num_vec == 0:
            raise ValueError(
                f"MACE trunk has no 1o (vector) channels in any layer ({[str(i) for i in irreps]}): the velocity is "
                "read from them; use max_L >= 1"
            )
        self._scalars = [_scalar_count(ir) for ir in irreps]
        # the energy head is not part of the generator: frozen, kept only so the state dict mirrors the force field
        for part in (trunk.mace.readouts, trunk.mace.atomic_energies_fn, trunk.mace.scale_shift):
            part.requires_grad_(False)
        with default_dtype(trunk.dtype):
            self.cond = nn.Sequential(
                nn.Linear(time_dim + num_atom_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
            )
            # one injection per interaction, into the scalar channels of its input; zero so the trunk starts as given
            self.inject = nn.ModuleList(nn.Linear(hidden, self._scalars[k]) for k in range(self.num_layers))
            num_bessel = int(trunk.mace.radial_embedding.out_dim)
            self.bond_embed = nn.Embedding(num_bond_types, num_bessel, padding_idx=0)
            self.vec_mix = nn.Linear(num_vec, hidden, bias=False)
            self.gate = nn.Sequential(
                nn.Linear(sum(self._scalars[1:]) + hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            self.vec_out = nn.Linear(hidden, 1, bias=False)
        for lin in self.inject:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.bond_embed.weight)

    # -- construction from a force field ----------------------------------------------------------------------------
    @classmethod
    def from_force_field(
        cls,
        path: str | os.PathLike,
        elements: Sequence[int] | None = None,
        dtype: str | None = None,
        trust_pickle: bool = False,
        trust_config: bool = False,
        random_init: bool = False,
        **head: int | str,
    ) -> MACEVelocityNet:
        """A velocity network whose trunk is the MACE force field at ``path``, weights bit for bit.

        Loading and the element-table check are :class:`molecular.finetune.FoundationMACE`'s (the project format
        that ``task.export`` writes, a unirep checkpoint folder, or a trusted pickled MACE file). ``elements``: the
        data's atomic numbers, each of which the force field must know (refused by symbol otherwise); ``dtype``:
        ``None`` keeps the force field's. The conditioning and the velocity head (``head``: ``hidden``,
        ``time_dim``, ...) start fresh; the conditioning injections and the bond embedding start at zero.
        ``random_init``: a small random stand-in force field (smoke runs only; ``path`` is not read).
        """
        return cls(_force_field_trunk(path, elements, dtype, trust_pickle, trust_config, random_init), **head)

    # -- intermediates convention -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.trunk.num_layers

    @property
    def dim(self) -> int:
        return self.feature_dim(-1)

    def feature_dim(self, index: int) -> int:
        k = normalize_index(int(index), self.num_layers, "MACE velocity network")
        return contracted_dim(self.trunk.layer_irreps[k], self.features)

    # -- forward ----------------------------------------------------------------------------------------------------
    def _graph(self, batch, pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Edges within the cutoff on ``pos`` plus every bond: ``(edge_index [2, E], bond order [E], vectors, lengths)``
        in MACE's convention (``edge_index[0]`` sender, ``[1]`` receiver, vector = receiver - sender)."""
        n = pos.shape[0]
        edges = full_edges(batch.batch, batch.num_graphs)
        etype = bond_edge_types(edges, batch.bond_index, batch.bond_types, n)
        vectors = pos[edges[1]] - pos[edges[0]]  # [E, 3]
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)  # [E, 1]
        keep = (lengths[:, 0] < self.trunk.r_max) | (etype > 0)
        return edges[:, keep], etype[keep], vectors[keep], lengths[keep]

    def forward_intermediates(
        self, batch, x_t: Tensor, t: Tensor, indices: int | Sequence[int] | None = None
    ) -> tuple[Tensor, list[TokenSet]]:
        """``(v[T, 3], [TokenSet per index])``: 0 the embedding (with the first conditioning), k interaction k."""
        take = feature_take_indices(self.num_layers, indices, "MACE velocity network")
        trunk, mace = self.trunk, self.trunk.mace
        dtype, n, bidx = trunk.dtype, x_t.shape[0], batch.batch
        check_trunk_elements(batch.numbers, trunk.z_table)
        idx = species_index(trunk.z_lookup, batch.numbers, trunk.z_table, "MACE velocity network")
        node_attrs = nn.functional.one_hot(idx, len(trunk.z_table)).to(dtype)  # [T, n_elements]
        pos = x_t.to(dtype)
        t = per_atom_time(t, batch, n).to(dtype)
        temb = timestep_embedding(t, self.time_dim, scale=1000.0)
        cond = self.cond(torch.cat([temb, batch.atom_features.to(dtype)], dim=-1))  # [T, hidden], invariant
        edges, etype, vectors, lengths = self._graph(batch, pos)
        edge_attrs = mace.spherical_harmonics(vectors)  # [E, (max_ell + 1)^2]
        edge_feats, cutoff = mace.radial_embedding(lengths, node_attrs, edges, mace.atomic_numbers)  # [E, n_bessel]
        edge_feats = edge_feats + self.bond_embed(etype)
        h = mace.node_embedding(node_attrs)  # [T, C x 0e]
        states: dict[int, Tensor] = {}
        for i, (interaction, product) in enumerate(zip(mace.interactions, mace.products, strict=True)):
            c = self._scalars[i]
            h = torch.cat([h[:, :c] + self.inject[i](cond), h[:, c:]], dim=-1)  # time into the 0e channels
            if i == 0:
                states[0] = h
            h, sc = interaction(
                node_attrs=node_attrs,
                node_feats=h,
                edge_attrs=edge_attrs,
                edge_feats=edge_feats,
                edge_index=edges,
                cutoff=cutoff,
                first_layer=(i == 0),
            )
            h = product(node_feats=h, sc=sc, node_attrs=node_attrs)  # [T, layer_irreps[i + 1].dim]
            states[i + 1] = h
        vec = torch.cat(
            [
                states[k + 1][:, s : s + 3 * m].reshape(n, m, 3)
                for k, slices in enumerate(self._vectors)
                for s, m in slices
            ],
            dim=1,
        ).transpose(1, 2)  # [T, 3, num_vec]: channels last for the bias-free (equivariant) mixing
        scal = torch.cat([states[k][:, : self._scalars[k]] for k in range(1, self.num_layers + 1)] + [cond], dim=-1)
        gated = self.vec_mix(vec) * self.gate(scal)[:, None, :]  # [T, 3, hidden]
        v = remove_mean(self.vec_out(gated)[..., 0], bidx, batch.num_graphs).to(x_t.dtype)  # [T, 3]
        tokens = [
            TokenSet(contract_irreps(states[k], trunk.layer_irreps[k], self.features), bidx, None, batch.num_graphs)
            for k in take
        ]
        return v, tokens

    def forward(self, batch, x_t: Tensor, t: Tensor) -> Tensor:
        v, _ = self.forward_intermediates(batch, x_t, t, [])
        return v

    def extra_repr(self) -> str:
        return f"elements={self.trunk.z_table}, r_max={self.trunk.r_max}, hidden={self.hidden}"


def _force_field_trunk(
    path: str | os.PathLike,
    elements: Sequence[int] | None,
    dtype: str | None,
    trust_pickle: bool,
    trust_config: bool,
    random_init: bool,
) -> MACEModel:
    from molecular.finetune import FoundationMACE

    return FoundationMACE(
        path,
        z_table=None if elements is None else [int(z) for z in elements],
        trust_pickle=trust_pickle,
        trust_config=trust_config,
        dtype=dtype,
        random_init=random_init,
    )


class ForceFieldMACEVelocityNet(MACEVelocityNet):
    """:meth:`MACEVelocityNet.from_force_field` as a class (the hydra target of ``conformer_mace_ff``; a class, so a
    checkpoint's stored config may rebuild it). Rebuilding reads the force field at ``path`` again before the
    checkpoint's weights replace it, so that file must still exist when a trained generator is loaded."""

    def __init__(
        self,
        path: str,
        elements: Sequence[int] | None = None,
        dtype: str | None = None,
        trust_pickle: bool = False,
        trust_config: bool = False,
        random_init: bool = False,
        num_atom_features: int = NUM_ATOM_FEATURES,
        num_bond_types: int = NUM_BOND_TYPES,
        hidden: int = 64,
        time_dim: int = 32,
        features: str = "scalars",
    ) -> None:
        trunk = _force_field_trunk(path, elements, dtype, trust_pickle, trust_config, random_init)
        super().__init__(trunk, num_atom_features, num_bond_types, hidden, time_dim, features)
        self.force_field = str(path)

    def extra_repr(self) -> str:
        return f"force_field={self.force_field!r}, " + super().extra_repr()
