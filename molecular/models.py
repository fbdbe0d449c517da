"""MACE force fields built from hydra-friendly arguments, with per-interaction features as token sets.

MACE (Batatia et al., "MACE: Higher Order Equivariant Message Passing Neural Networks for Fast and Accurate
Force Fields", NeurIPS 2022; anchor ACEsuit/mace ``mace/modules/models.py``): :class:`MACEModel` wraps
``mace.modules.ScaleShiftMACE`` so that it takes plain numbers and strings (no e3nn objects, no classes) and
a :class:`~molecular.data.GraphBatch`. Energies are sums of per-atom readouts plus per-element reference
energies ``E0``; forces are ``-dE/dr`` by autograd (MACE's ``get_outputs``); stress by the symmetric
displacement trick when the structure is periodic.

``forward_intermediates(batch, indices) -> (out, tokens)`` follows :mod:`unirep.intermediates`: index 0 is the node
embedding, ``k`` the per-atom features after interaction ``k`` (its product block), negative from the end; ``out``
holds energy and forces from the same pass. This is where MACE-REPA attaches its projector: the invariant ``0e``
channels by default, the invariant contraction (``0e`` plus the norm of each equivariant channel), or the full
irreps (equivariant; refused against an invariant teacher by :class:`~molecular.task.MaceTask`).

Dtypes: e3nn creates parameters in torch's default dtype, so the model is built inside
:func:`default_dtype`, which always restores the previous default (mace_off and SO3LR change it globally as a
side effect; MACE issues #328, #877). ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the process
environment (it makes every later ``torch.load`` unpickle); :func:`import_mace` undoes that right after import.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from molecular.data import GraphBatch, Structure, fit_atomic_energies, species_index, z_lookup
from unirep.intermediates import feature_take_indices, normalize_index
from unirep.tokens import TokenSet

__all__ = [
    "default_dtype",
    "import_mace",
    "MACEModel",
    "fit_atomic_energies",
    "fit_scale_shift",
    "energy_forces_loss",
    "resolve_dtype",
    "contract_irreps",
    "contracted_dim",
    "load_mace_state",
    "mace_hyperparameters",
    "FEATURE_MODES",
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


FEATURE_MODES = ("scalars", "norms", "full")


def contract_irreps(x: Tensor, irreps: Any, mode: str = "scalars", eps: float = 1e-12) -> Tensor:
    """Per-atom features ``x[T, irreps.dim]`` (e3nn's ``mul x ir`` layout) as chosen for alignment.

    ``scalars``: the ``0e`` channels only (rotation invariant); ``norms``: the ``0e`` channels plus the norm of every
    other channel (``|x_c|`` over its ``2l + 1`` components; an invariant contraction, so the equivariant channels take
    part without breaking the symmetry; ``eps`` keeps the gradient finite at zero); ``full``: everything (equivariant:
    the loss then depends on the molecule's orientation unless the target rotates with it).
    """
    if mode == "full":
        return x
    if mode not in FEATURE_MODES:
        raise ValueError(f"features={mode!r}: use one of {FEATURE_MODES}")
    parts, start = [], 0
    for mul, ir in irreps:
        width = mul * ir.dim
        block = x[:, start : start + width]
        if ir.l == 0 and ir.p == 1:
            parts.append(block)
        elif mode == "norms":
            parts.append((block.reshape(-1, mul, ir.dim).square().sum(-1) + eps).sqrt())  # [T, mul]
        start += width
    return torch.cat(parts, dim=-1) if parts else x[:, :0]


def contracted_dim(irreps: Any, mode: str = "scalars") -> int:
    """Width of :func:`contract_irreps`'s output."""
    if mode == "full":
        return int(irreps.dim)
    if mode == "scalars":
        return sum(mul for mul, ir in irreps if ir.l == 0 and ir.p == 1)
    return sum(mul for mul, _ in irreps)


def has_equivariant_channels(irreps: Any) -> bool:
    return any(not (ir.l == 0 and ir.p == 1) for _, ir in irreps)


def load_mace_state(model: nn.Module, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a state dict into ``model`` (a :class:`MACEModel` or a ``mace.modules`` model), mapping the layouts.

    mace-torch stores the E0s as ``[num_heads, n]`` and the scale/shift as ``[num_heads]`` (older files: ``[n]`` and a
    0-d scale); keys may or may not carry the ``mace.`` prefix of :class:`MACEModel`. Tensors are reshaped to the
    target's shape when their sizes agree, and cast to its dtype; anything else that does not fit is refused by name.
    """
    target = model.state_dict()
    prefix = "mace." if any(k.startswith("mace.") for k in target) else ""
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key[len("mace.") :] if key.startswith("mace.") else key
        k = prefix + k
        if k not in target:
            if k.endswith("avg_num_neighbors"):  # MACEModel's own buffer (mace keeps it on each interaction)
                continue
            mapped[k] = value
            continue
        ref = target[k]
        if value.shape != ref.shape:
            if value.numel() != ref.numel():
                raise ValueError(
                    f"weight {key}: shape {tuple(value.shape)} in the file vs {tuple(ref.shape)} in the model "
                    "(another architecture or element table?)"
                )
            value = value.reshape(ref.shape)
        mapped[k] = value.to(ref.dtype) if value.is_floating_point() else value
    if not prefix and "avg_num_neighbors" in state and hasattr(model, "interactions"):
        for block in model.interactions:  # a bare mace module keeps the normalisation as a float per interaction
            block.avg_num_neighbors = float(state["avg_num_neighbors"])
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("avg_num_neighbors")]
    if strict and (missing or unexpected):
        raise ValueError(f"weights do not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}")


class MACEModel(nn.Module):
    """A ScaleShiftMACE force field taking a :class:`GraphBatch`.

    Defaults are ``mace_run_train``'s (mace-torch 0.3.16 ``tools/arg_parser.py``): 8 Bessel functions, polynomial
    envelope 5, ``max_ell`` 3, correlation 3, two interactions with ``RealAgnosticInteractionBlock`` first and
    ``RealAgnosticResidualInteractionBlock`` after, radial MLP ``[64, 64, 64]``, readout ``16x0e``,
    ``use_reduced_cg=False``, float64.

    Args:
        z_table: atomic numbers the model knows (one-hot order); recipes derive it from the training split.
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
        interaction: interaction block class name (from ``mace.modules``) of layers 2..L.
        interaction_first: the first layer's block (``mace_run_train``: ``RealAgnosticInteractionBlock``; ``None``:
            the same as ``interaction``).
        use_reduced_cg: mace-torch's reduced Clebsch-Gordan option (``mace_run_train`` default: False).
        dtype: ``float32`` or ``float64`` parameters.
        keep_last_layer_irreps: keep the full irreps in the last layer's node features.
        features: what :meth:`forward_intermediates` returns per layer by default: ``scalars``, ``norms`` (scalars
            plus per-irrep norms) or ``full`` (see :func:`contract_irreps`).
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
        interaction_first: str | None = "RealAgnosticInteractionBlock",
        use_reduced_cg: bool = False,
        gate: str = "silu",
        dtype: str = "float64",
        keep_last_layer_irreps: bool = False,
        features: str = "scalars",
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
        interaction_first = interaction_first or interaction
        for name in (interaction, interaction_first):
            if not hasattr(modules, name):
                raise ValueError(f"interaction {name!r} is not a class in mace.modules")
        if gate not in _GATES:
            raise ValueError(f"gate {gate!r}: use one of {sorted(_GATES)}")
        if features not in FEATURE_MODES:
            raise ValueError(f"features={features!r}: use one of {FEATURE_MODES}")
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
            interaction_first=interaction_first,
            use_reduced_cg=bool(use_reduced_cg),
            gate=gate,
            dtype=str(self.dtype).replace("torch.", ""),
            keep_last_layer_irreps=keep_last_layer_irreps,
            features=features,
        )
        hidden = o3.Irreps(
            " + ".join(f"{num_channels}x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(max_L + 1))
        )
        with default_dtype(self.dtype), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript type system.*")
            self.mace = modules.ScaleShiftMACE(
                atomic_inter_scale=float(scale),
                atomic_inter_shift=float(shift),
                r_max=float(r_max),
                num_bessel=num_bessel,
                num_polynomial_cutoff=num_polynomial_cutoff,
                max_ell=max_ell,
                interaction_cls=getattr(modules, interaction),
                interaction_cls_first=getattr(modules, interaction_first),
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
                use_reduced_cg=bool(use_reduced_cg),
            )
        self.mace.to(self.dtype)
        self._adopt(features)

    def _adopt(self, features: str) -> None:
        """Buffers and layer layout read from ``self.mace`` (shared by ``__init__`` and :meth:`wrap`)."""
        self.features = features
        self.r_max = float(self.mace.r_max)
        self.register_buffer("z_lookup", z_lookup(self.z_table), persistent=False)
        self.register_buffer(
            "avg_num_neighbors",
            torch.tensor(float(self.mace.interactions[0].avg_num_neighbors), dtype=torch.float64),
        )
        self.register_load_state_dict_post_hook(self._sync_avg_num_neighbors)
        # irreps of each index of the intermediates convention: 0 the node embedding, k the product block of
        # interaction k (MACE's irreps order puts the scalars first)
        self.layer_irreps = [self.mace.node_embedding.linear.irreps_out] + [
            p.linear.irreps_out for p in self.mace.products
        ]

    @classmethod
    def wrap(cls, mace_module: nn.Module, features: str = "scalars") -> MACEModel:
        """Adopt an already-built ``mace.modules`` MACE/ScaleShiftMACE as it is (a MACE-MP-0 or MACE-OFF23 file);
        :meth:`from_mace` rebuilds it from its hyperparameters instead, so it can be saved in the project format."""
        if not hasattr(mace_module, "products") or not hasattr(mace_module, "atomic_numbers"):
            raise TypeError(
                f"{type(mace_module).__name__} is not a mace.modules MACE model (no products/atomic_numbers)"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.mace = mace_module
        self.z_table = [int(z) for z in mace_module.atomic_numbers.tolist()]
        self.dtype = next(mace_module.parameters()).dtype
        self.config = {}  # not rebuildable from arguments: see from_mace
        self._adopt(features)
        return self

    @classmethod
    def from_mace(cls, mace_module: nn.Module, features: str = "scalars") -> MACEModel:
        """A :class:`MACEModel` with the hyperparameters and the weights of a ``mace.modules`` ScaleShiftMACE (what
        ``mace_run_train`` writes), bit for bit; refuses features this wrapper cannot rebuild (use :meth:`wrap`)."""
        config = mace_hyperparameters(mace_module)
        model = cls(**config, features=features)
        load_mace_state(model, mace_module.state_dict())
        return model

    def set_dtype(self, dtype: str | torch.dtype) -> MACEModel:
        """Cast the parameters (and the inputs :meth:`forward` builds) to ``dtype``."""
        self.dtype = resolve_dtype(dtype)
        self.mace.to(self.dtype)
        if self.config:
            self.config["dtype"] = str(self.dtype).replace("torch.", "")
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

    # -- feature sizes (unirep.intermediates convention) ------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L, the number of interactions (intermediates are indexed 0 = node embedding, 1..L)."""
        return len(self.layer_irreps) - 1

    @property
    def layer_names(self) -> list[str]:
        return ["embedding"] + [f"interaction{k}" for k in range(1, self.num_layers + 1)]

    def feature_dim(self, index: int, features: str | None = None) -> int:
        """Width of the per-atom features at ``index`` (0: embedding, k: after interaction k) in ``features`` mode."""
        k = normalize_index(int(index), self.num_layers, "MACE model")
        return contracted_dim(self.layer_irreps[k], features or self.features)

    def equivariant_at(self, index: int, features: str | None = None) -> bool:
        """Whether the features at ``index`` in ``features`` mode hold l >= 1 (or odd-parity) channels."""
        k = normalize_index(int(index), self.num_layers, "MACE model")
        return (features or self.features) == "full" and has_equivariant_channels(self.layer_irreps[k])

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
        out, _ = self.forward_intermediates(
            batch, [], compute_forces=compute_forces, compute_stress=compute_stress, training=training
        )
        return out

    def forward_intermediates(
        self,
        batch: GraphBatch,
        indices: int | Sequence[int] | None = None,
        features: str | None = None,
        compute_forces: bool = True,
        compute_stress: bool = False,
        training: bool | None = None,
    ) -> tuple[dict[str, Tensor | None], list[TokenSet]]:
        """``(out, tokens)``: ``out`` as :meth:`forward` (energy, forces, stress, ``node_feats``) and the per-atom
        features at ``indices`` (0: the node embedding, k: after interaction k, negative from the end; ``None``: all)
        from the same pass, in ``features`` mode (default ``self.features``), as TokenSets with gradients."""
        take = feature_take_indices(self.num_layers, indices, "MACE model")
        mode = features or self.features
        training = self.training if training is None else training
        data = self._inputs(batch)
        embedded: list[Tensor] = []
        hook = self.mace.node_embedding.register_forward_hook(lambda m, i, o: embedded.append(o)) if 0 in take else None
        try:
            with torch.enable_grad():
                raw = self.mace(data, training=training, compute_force=compute_forces, compute_stress=compute_stress)
        finally:
            if hook is not None:
                hook.remove()
        out = {
            "energy": raw["energy"],
            "forces": raw["forces"],
            "stress": raw["stress"],
            "node_feats": raw["node_feats"],
        }
        starts = np.cumsum([0] + [ir.dim for ir in self.layer_irreps[1:]]).tolist()
        tokens = []
        pos = batch.positions.to(self.dtype)
        for k in take:
            irreps = self.layer_irreps[k]
            x = embedded[0] if k == 0 else raw["node_feats"][:, starts[k - 1] : starts[k - 1] + irreps.dim]
            tokens.append(TokenSet(contract_irreps(x, irreps, mode), batch.batch, pos, batch.num_graphs))
        return out, tokens


def mace_hyperparameters(module: nn.Module) -> dict[str, Any]:
    """:class:`MACEModel` arguments that rebuild a ``mace.modules`` ScaleShiftMACE (read from its submodules)."""
    if type(module).__name__ != "ScaleShiftMACE":
        raise TypeError(
            f"{type(module).__name__}: only ScaleShiftMACE models are rebuilt here (MACEModel.wrap adopts others)"
        )
    hidden = module.products[0].linear.irreps_out
    channels = {mul for mul, _ in hidden}
    if len(channels) != 1:
        raise ValueError(f"hidden irreps {hidden} have several multiplicities: MACEModel takes one num_channels")
    radial = module.radial_embedding
    first, rest = module.interactions[0], module.interactions[-1]
    conv = first.conv_tp_weights
    widths = [layer.weight.shape[1] if hasattr(layer, "weight") else None for layer in getattr(conv, "layers", [])]
    hidden_mlp = [int(h) for h in conv.hs[1:-1]] if hasattr(conv, "hs") else [w for w in widths if w][:-1]
    readout = module.readouts[-1]
    corr = module.products[0].symmetric_contractions.contractions[0].correlation
    gate = getattr(readout, "non_linearity", None)
    act = getattr(getattr(gate, "acts", [None])[0], "f", None) if gate is not None else None
    gate_name = {torch.nn.functional.silu: "silu", torch.tanh: "tanh"}.get(act, "silu")
    return dict(
        z_table=[int(z) for z in module.atomic_numbers.tolist()],
        r_max=float(module.r_max),
        num_channels=int(next(iter(channels))),
        max_L=max(ir.l for _, ir in hidden),
        correlation=int(corr),
        num_interactions=int(module.num_interactions),
        max_ell=int(module.spherical_harmonics.irreps_out.lmax),
        num_bessel=int(radial.out_dim),
        num_polynomial_cutoff=int(radial.cutoff_fn.p),
        radial_mlp=hidden_mlp,
        mlp_irreps=str(readout.hidden_irreps),
        atomic_energies=module.atomic_energies_fn.atomic_energies.reshape(-1).tolist(),
        avg_num_neighbors=float(first.avg_num_neighbors),
        scale=float(module.scale_shift.scale.reshape(-1)[0]),
        shift=float(module.scale_shift.shift.reshape(-1)[0]),
        interaction=type(rest).__name__,
        interaction_first=type(first).__name__,
        use_reduced_cg=bool(getattr(module, "use_reduced_cg", True)),
        gate=gate_name,
        dtype=str(next(module.parameters()).dtype).replace("torch.", ""),
        keep_last_layer_irreps=module.products[-1].linear.irreps_out == hidden and len(module.products) > 1,
    )
