"""MACE force fields built from hydra-friendly arguments, with per-interaction features as token sets.

MACE (Batatia et al., "MACE: Higher Order Equivariant Message Passing Neural Networks for Fast and Accurate
Force Fields", NeurIPS 2022; anchor ACEsuit/mace ``mace/modules/models.py``): :class:`MACEModel` wraps
``mace.modules.ScaleShiftMACE`` so that it takes plain numbers and strings (no e3nn objects, no classes) and
a :class:`~molecular.data.GraphBatch`. Energies are sums of per-atom readouts plus per-element reference
energies ``E0``; forces are ``-dE/dr`` by autograd (MACE's ``get_outputs``); stress by the symmetric
displacement trick when the structure is periodic.

``forward_intermediates`` returns each interaction's per-atom node features (after the product block) as a
:class:`~unirep.TokenSet`, which is where MACE-REPA attaches its projector (the invariant ``0e`` channels by
default, or the full irreps).

Dtypes: e3nn creates parameters in torch's default dtype, so the model is built inside
:func:`default_dtype`, which always restores the previous default (mace_off and SO3LR change it globally as a
side effect; MACE issues #328, #877). ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the process
environment (it makes every later ``torch.load`` unpickle); :func:`import_mace` undoes that right after import.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from molecular.data import GraphBatch, Structure, fit_atomic_energies, species_index, z_lookup
from unirep.tokens import TokenSet

__all__ = [
    "default_dtype",
    "import_mace",
    "MACEModel",
    "fit_atomic_energies",
    "fit_scale_shift",
    "energy_forces_loss",
    "resolve_dtype",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "fp32": torch.float32, "fp64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use 'float32' or 'float64'")
    return _DTYPES[dtype]


@contextmanager
def default_dtype(dtype: str | torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default dtype; the previous one is restored even if the body raises."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(resolve_dtype(dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def import_mace():
    """Import ``mace.modules`` (and e3nn) and restore the process environment ``import mace`` changes.

    e3nn 0.4.4 itself ``torch.load``s a pickled constants file at import, which torch >= 2.6 only allows with the
    variable set, so the variable is kept during the import and removed (or restored) afterwards.
    """
    before = os.environ.get(_ENV)
    try:
        os.environ[_ENV] = "1"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
            warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
            import mace  # noqa: F401
            import mace.modules as modules
    finally:
        if before is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = before
    return modules


_GATES = {"silu": torch.nn.functional.silu, "tanh": torch.tanh, "none": None}


def fit_scale_shift(
    structures: Sequence[Structure], z_table: Sequence[int], atomic_energies: Sequence[float]
) -> tuple[float, float]:
    """MACE's ScaleShift statistics: shift = mean per-atom interaction energy, scale = RMS of force components."""
    z_index = {int(z): k for k, z in enumerate(z_table)}
    e0 = np.asarray(atomic_energies)
    per_atom, forces = [], []
    for s in structures:
        per_atom.append((s.energy - e0[[z_index[int(z)] for z in s.numbers]].sum()) / len(s))
        forces.append(s.forces.reshape(-1))
    rms = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    return (rms if rms > 1e-8 else 1.0), float(np.mean(per_atom))


def energy_forces_loss(
    pred_energy: Tensor,
    pred_forces: Tensor,
    energy: Tensor,
    forces: Tensor,
    num_atoms: Tensor,
    energy_weight: float,
    forces_weight: float,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """MACE's WeightedEnergyForcesLoss (ACEsuit/mace ``mace/modules/loss.py``): ``λ_E · mean_b ((E_b - Ê_b) /
    N_b)^2 + λ_F · mean over all force components (F - F̂)^2``, both errors divided by ``scale`` first (a force
    RMS, to train on unit-scale errors)."""
    dtype = pred_energy.dtype
    loss_e = ((((energy.to(dtype) - pred_energy) / num_atoms.to(dtype)) / scale) ** 2).mean()
    loss_f = (((forces.to(pred_forces.dtype) - pred_forces) / scale) ** 2).mean()
    return {"loss": energy_weight * loss_e + forces_weight * loss_f, "loss/energy": loss_e, "loss/forces": loss_f}


class MACEModel(nn.Module):
    """A ScaleShiftMACE force field taking a :class:`GraphBatch`.

    Args:
        z_table: atomic numbers the model knows (one-hot order).
        r_max: cutoff radius in Å.
        num_channels: channels per irrep in the hidden features.
        max_L: highest ``l`` of the hidden features (0: invariant MACE, 1: MACE-OFF small/medium default, 2).
        correlation: body order of the product basis minus one (MACE: 3).
        num_interactions: message-passing layers (MACE: 2).
        max_ell: highest ``l`` of the edge spherical harmonics.
        num_bessel / num_polynomial_cutoff: radial basis size and envelope order.
        radial_mlp: hidden widths of the radial MLP.
        mlp_irreps: hidden irreps of the last (non-linear) readout.
        atomic_energies: E0 per element (eV), in ``z_table`` order; zeros when not given.
        avg_num_neighbors: message normalisation.
        scale / shift: ScaleShift statistics (eV) of the per-atom interaction energy.
        interaction: MACE interaction block class name (from ``mace.modules``).
        dtype: ``float32`` or ``float64`` parameters.
        keep_last_layer_irreps: keep the full irreps in the last layer's node features.
    """

    def __init__(
        self,
        z_table: Sequence[int],
        r_max: float = 5.0,
        num_channels: int = 32,
        max_L: int = 1,
        correlation: int = 3,
        num_interactions: int = 2,
        max_ell: int = 3,
        num_bessel: int = 8,
        num_polynomial_cutoff: int = 5,
        radial_mlp: Sequence[int] = (64, 64, 64),
        mlp_irreps: str = "16x0e",
        atomic_energies: Sequence[float] | None = None,
        avg_num_neighbors: float = 8.0,
        scale: float = 1.0,
        shift: float = 0.0,
        interaction: str = "RealAgnosticResidualInteractionBlock",
        gate: str = "silu",
        dtype: str = "float32",
        keep_last_layer_irreps: bool = False,
    ) -> None:
        super().__init__()
        modules = import_mace()
        from e3nn import o3

        self.z_table = [int(z) for z in z_table]
        if len(set(self.z_table)) != len(self.z_table) or not self.z_table:
            raise ValueError(f"z_table {list(z_table)} must be a non-empty list of distinct atomic numbers")
        if atomic_energies is None:
            atomic_energies = [0.0] * len(self.z_table)
        if len(atomic_energies) != len(self.z_table):
            raise ValueError(f"atomic_energies has {len(atomic_energies)} values for {len(self.z_table)} elements")
        if not hasattr(modules, interaction):
            raise ValueError(f"interaction {interaction!r} is not a class in mace.modules")
        if gate not in _GATES:
            raise ValueError(f"gate {gate!r}: use one of {sorted(_GATES)}")
        self.dtype = resolve_dtype(dtype)
        # everything needed to rebuild this model (the project's state-dict + JSON format)
        self.config: dict[str, Any] = dict(
            z_table=self.z_table,
            r_max=float(r_max),
            num_channels=num_channels,
            max_L=max_L,
            correlation=correlation,
            num_interactions=num_interactions,
            max_ell=max_ell,
            num_bessel=num_bessel,
            num_polynomial_cutoff=num_polynomial_cutoff,
            radial_mlp=list(radial_mlp),
            mlp_irreps=mlp_irreps,
            atomic_energies=[float(e) for e in atomic_energies],
            avg_num_neighbors=float(avg_num_neighbors),
            scale=float(scale),
            shift=float(shift),
            interaction=interaction,
            gate=gate,
            dtype=str(self.dtype).replace("torch.", ""),
            keep_last_layer_irreps=keep_last_layer_irreps,
        )
        hidden = o3.Irreps(
            " + ".join(f"{num_channels}x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(max_L + 1))
        )
        block = getattr(modules, interaction)
        with default_dtype(self.dtype), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
            self.mace = modules.ScaleShiftMACE(
                atomic_inter_scale=float(scale),
                atomic_inter_shift=float(shift),
                r_max=float(r_max),
                num_bessel=num_bessel,
                num_polynomial_cutoff=num_polynomial_cutoff,
                max_ell=max_ell,
                interaction_cls=block,
                interaction_cls_first=block,
                num_interactions=num_interactions,
                num_elements=len(self.z_table),
                hidden_irreps=hidden,
                MLP_irreps=o3.Irreps(mlp_irreps),
                atomic_energies=np.asarray(atomic_energies, dtype=np.float64),
                avg_num_neighbors=float(avg_num_neighbors),
                atomic_numbers=self.z_table,
                correlation=correlation,
                gate=_GATES[gate],
                radial_MLP=list(radial_mlp),
                keep_last_layer_irreps=keep_last_layer_irreps,
            )
        self.mace.to(self.dtype)
        self.register_buffer("z_lookup", z_lookup(self.z_table), persistent=False)
        self.register_buffer("avg_num_neighbors", torch.tensor(float(avg_num_neighbors), dtype=torch.float64))
        self.register_load_state_dict_post_hook(self._sync_avg_num_neighbors)
        self.r_max = float(r_max)
        # per-layer feature layout: irreps after each product block; scalars (0e) come first in MACE's irreps
        self.layer_irreps = [p.linear.irreps_out for p in self.mace.products]
        self.layer_dims = [ir.dim for ir in self.layer_irreps]
        self.layer_scalar_dims = [
            sum(mul for mul, ir in irreps if ir.l == 0 and ir.p == 1) for irreps in self.layer_irreps
        ]

    @classmethod
    def wrap(cls, mace_module: nn.Module) -> MACEModel:
        """Adopt an already-built ``mace.modules`` MACE/ScaleShiftMACE (e.g. a MACE-MP-0 or MACE-OFF23 file):
        its elements, cutoff, dtype and per-layer irreps are read from the module itself."""
        if not hasattr(mace_module, "products") or not hasattr(mace_module, "atomic_numbers"):
            raise TypeError(
                f"{type(mace_module).__name__} is not a mace.modules MACE model (no products/atomic_numbers)"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.mace = mace_module
        self.z_table = [int(z) for z in mace_module.atomic_numbers.tolist()]
        self.dtype = next(mace_module.parameters()).dtype
        self.r_max = float(mace_module.r_max)
        self.config = {}  # not rebuildable from arguments: save it as a whole-model file or in the project format
        self.register_buffer("z_lookup", z_lookup(self.z_table), persistent=False)
        self.register_buffer(
            "avg_num_neighbors", torch.tensor(float(mace_module.interactions[0].avg_num_neighbors), dtype=torch.float64)
        )
        self.register_load_state_dict_post_hook(self._sync_avg_num_neighbors)
        self.layer_irreps = [p.linear.irreps_out for p in mace_module.products]
        self.layer_dims = [ir.dim for ir in self.layer_irreps]
        self.layer_scalar_dims = [
            sum(mul for mul, ir in irreps if ir.l == 0 and ir.p == 1) for irreps in self.layer_irreps
        ]
        return self

    @torch.no_grad()
    def set_statistics(
        self,
        atomic_energies: Sequence[float] | None = None,
        scale: float | None = None,
        shift: float | None = None,
        avg_num_neighbors: float | None = None,
    ) -> None:
        """Set data statistics after construction (E0s, ScaleShift, message normalisation), as MACE's training
        script does before training; the constructor arguments in ``config`` follow."""
        if atomic_energies is not None:
            e0 = torch.as_tensor(list(atomic_energies), dtype=self.mace.atomic_energies_fn.atomic_energies.dtype)
            self.mace.atomic_energies_fn.atomic_energies.copy_(e0.view_as(self.mace.atomic_energies_fn.atomic_energies))
            self.config["atomic_energies"] = [float(v) for v in atomic_energies]
        if scale is not None:
            self.mace.scale_shift.scale.fill_(float(scale))
            self.config["scale"] = float(scale)
        if shift is not None:
            self.mace.scale_shift.shift.fill_(float(shift))
            self.config["shift"] = float(shift)
        if avg_num_neighbors is not None:
            self.avg_num_neighbors.fill_(float(avg_num_neighbors))
            self._sync_avg_num_neighbors()
            self.config["avg_num_neighbors"] = float(avg_num_neighbors)

    def _sync_avg_num_neighbors(self, *args: Any) -> None:
        # MACE keeps the message normalisation as a plain float attribute of each interaction block; the buffer
        # carries it through checkpoints, this copies it back after a load
        for block in self.mace.interactions:
            block.avg_num_neighbors = float(self.avg_num_neighbors)

    # -- feature sizes ----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_dims)

    def feature_dim(self, index: int, invariant: bool = True) -> int:
        """Width of interaction ``index``'s node features (its scalars only when ``invariant``)."""
        return (self.layer_scalar_dims if invariant else self.layer_dims)[index]

    # -- forward ----------------------------------------------------------------------------------------------------
    def _inputs(self, batch: GraphBatch) -> dict[str, Tensor]:
        idx = species_index(self.z_lookup, batch.numbers, self.z_table)
        node_attrs = torch.nn.functional.one_hot(idx, len(self.z_table)).to(self.dtype)
        return {
            "positions": batch.positions.to(self.dtype).clone(),  # MACE sets requires_grad on this tensor
            "node_attrs": node_attrs,
            "edge_index": batch.edge_index,
            "shifts": batch.shifts.to(self.dtype),
            "unit_shifts": batch.unit_shifts.to(self.dtype),
            "cell": batch.cell.to(self.dtype),
            "batch": batch.batch,
            "ptr": batch.ptr,
        }

    def forward(
        self, batch: GraphBatch, compute_forces: bool = True, compute_stress: bool = False, training: bool | None = None
    ) -> dict[str, Tensor | None]:
        """``energy[B]`` (eV), ``forces[T, 3]`` (eV/Å), ``stress[B, 3, 3]`` (eV/Å³, when asked), ``node_feats``.

        ``training`` keeps the force graph for a loss on forces (defaults to ``self.training``).
        """
        training = self.training if training is None else training
        data = self._inputs(batch)
        with torch.enable_grad():
            out = self.mace(data, training=training, compute_force=compute_forces, compute_stress=compute_stress)
        return {
            "energy": out["energy"],
            "forces": out["forces"],
            "stress": out["stress"],
            "node_feats": out["node_feats"],
        }

    def split_features(
        self, node_feats: Tensor, batch: GraphBatch, indices: Sequence[int] | None = None, invariant: bool = True
    ) -> list[TokenSet]:
        """Cut MACE's concatenated ``node_feats[T, sum_i dim_i]`` into one TokenSet per chosen interaction."""
        indices = list(range(self.num_layers)) if indices is None else list(indices)
        starts = np.cumsum([0] + self.layer_dims).tolist()
        out = []
        for i in indices:
            if not -self.num_layers <= i < self.num_layers:
                raise IndexError(f"interaction index {i} out of range for {self.num_layers} interactions")
            i = i % self.num_layers
            width = self.layer_scalar_dims[i] if invariant else self.layer_dims[i]
            x = node_feats[:, starts[i] : starts[i] + width]  # [T, width]; scalars are the leading channels
            out.append(TokenSet(x, batch.batch, batch.positions.to(x.dtype), batch.num_graphs))
        return out

    def forward_intermediates(
        self, batch: GraphBatch, indices: Sequence[int] | None = None, invariant: bool = True
    ) -> list[TokenSet]:
        """Per-atom node features after each chosen interaction (all by default) as TokenSets."""
        out = self.forward(batch, compute_forces=False, training=False)
        return self.split_features(out["node_feats"], batch, indices, invariant)
