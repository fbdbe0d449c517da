"""Offline pretrained interatomic potentials as frozen :class:`~unirep.encoders.Encoder` s (per-atom features).

Each adapter turns a potential whose weights ship inside its pip package into an encoder whose tokens are atoms
(``batch`` = structure index) and which exposes several layers through ``encode_layers`` (the convergence
protocol of :mod:`unirep.converge`). Used for platonic-convergence studies across architectures and training
data (Edamadaka et al. 2025; Li & Walsh 2025) and as MACE-REPA teachers.

- :class:`ANIEncoder`: ``torchani==2.0`` (aiqm/torchani; Smith et al. 2017, 2019), ANI-1x (wB97X) and ANI-1ccx
  (CCSD(T)-corrected); layers: the AEV (384) and the last hidden layer of one ensemble member (96).
- :class:`CHGNetEncoder`: ``chgnet`` (CederGroupHub/chgnet; Deng et al. 2023), MPtrj PBE (0.2.0, 0.3.0) and
  r2SCAN; layers: every atom-convolution layer (64).
- :class:`DIEPEncoder`: ``diep``, MatPES r2SCAN; layers: every graph layer's node features (64).
- :class:`SO3LREncoder`: ``so3krates-torch`` (Kabylda et al. 2024, SO3LR), molecular DFT; invariant features (128).
- :class:`SevenNetEncoder`: ``sevenn`` (MDIL-SNU/SevenNet; Park et al. 2024), MPtrj PBE; every gate's output.

All inputs are molecules (no periodicity). Materials models (CHGNet, DIEP, SevenNet) get each molecule in a
periodic box whose vacuum gap exceeds their cutoff, so no atom sees a periodic image. A package that is not
installed raises :class:`ImportError` naming the pip command, so a convergence config can mark the model
``optional``.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unirep.intermediates import feature_take_indices, normalize_index
from unirep.tokens import TokenSet

__all__ = ["as_atoms_list", "ANIEncoder", "CHGNetEncoder", "DIEPEncoder", "SO3LREncoder", "SevenNetEncoder"]


def as_atoms_list(sample: Any) -> list:
    """``ase.Atoms`` per structure from a ``molecular.data.GraphBatch``, a list of ``Structure``/``AtomicGraph``
    or a list of ``ase.Atoms`` (molecules; cells are ignored)."""
    from ase import Atoms

    if hasattr(sample, "ptr") and hasattr(sample, "numbers"):  # GraphBatch
        ptr = sample.ptr.tolist()
        return [
            Atoms(numbers=sample.numbers[a:b].cpu().numpy(), positions=sample.positions[a:b].detach().cpu().numpy())
            for a, b in zip(ptr[:-1], ptr[1:], strict=True)
        ]
    if isinstance(sample, Atoms):
        sample = [sample]
    out = []
    for k, s in enumerate(sample):
        if isinstance(s, Atoms):
            out.append(Atoms(numbers=s.numbers, positions=s.positions))
        elif hasattr(s, "numbers") and hasattr(s, "positions"):
            numbers = s.numbers.cpu().numpy() if isinstance(s.numbers, Tensor) else np.asarray(s.numbers)
            pos = s.positions.detach().cpu().numpy() if isinstance(s.positions, Tensor) else np.asarray(s.positions)
            out.append(Atoms(numbers=numbers, positions=pos))
        else:
            raise TypeError(f"item {k} of the sample is a {type(s).__name__}: give ase.Atoms, Structure or GraphBatch")
    return out


def _token_sets(feats: list[Tensor], counts: Sequence[int], positions: Tensor | None = None) -> TokenSet:
    batch = torch.arange(len(counts)).repeat_interleave(torch.as_tensor(list(counts)))
    x = torch.cat(feats) if isinstance(feats, list) else feats
    return TokenSet(x.detach().float(), batch, positions, len(counts))


def _keep(store: list[Tensor], key: Any, module: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook body: keep ``output[key]`` (a layer that returns a tuple or dict)."""
    store.append(output[key].detach())


def _boxed(atoms, gap: float):
    """A copy of a molecule in an orthorhombic periodic box with ``gap`` Å of vacuum to its images."""
    a = atoms.copy()
    ext = a.positions.max(0) - a.positions.min(0)
    a.set_cell(np.diag(ext + gap))
    a.positions = a.positions - a.positions.min(0) + gap / 2
    a.pbc = True
    return a


def _missing(package: str, pip: str) -> ImportError:
    return ImportError(
        f"{package} is not installed: `.venv/bin/pip install -c constraints.txt {pip}` (or the "
        f"[teachers] extra) to use this encoder"
    )


@contextlib.contextmanager
def _keep_default_dtype() -> Iterator[None]:
    """Some packages switch torch's global default dtype on load (SO3LR, SevenNet): undo it on exit."""
    before = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class _Frozen(nn.Module, abc.ABC):
    """Common parts: frozen, eval mode, ``encode`` = last layer, ``layer_names``, and the intermediates contract
    (:mod:`unirep.intermediates`): ``layer_names[0]`` is index 0 (the embedded atoms where the model exposes them),
    ``layer_names[k]`` index k; ``num_layers`` = L; content keys for the feature cache (:meth:`item_digests`)."""

    dim: int
    layer_names: list[str]
    layer_dims: list[int] | None = None  # per index; None: every layer is ``dim`` wide
    elements: list[int] | None = None  # atomic numbers the model knows (None: not stated)
    invariant = True  # every adapter here returns rotation-invariant per-atom features

    def train(self, mode: bool = True) -> _Frozen:  # a pretrained teacher never leaves eval mode
        return super().train(False)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names) - 1

    def feature_dim(self, index: int | None = None) -> int:
        if index is None:
            return self.dim
        k = normalize_index(int(index), self.num_layers, type(self).__name__)
        return int(self.layer_dims[k]) if self.layer_dims else self.dim

    def item_digests(self, sample: Any) -> list[str]:
        from molecular.teachers.base import structure_digests

        return structure_digests(sample if hasattr(sample, "ptr") else as_atoms_list(sample))

    def forward_intermediates(self, sample: Any, indices: Any = None) -> tuple[None, list[TokenSet]]:
        take = feature_take_indices(self.num_layers, indices, type(self).__name__)
        layers = self.encode_layers(sample)
        return None, [layers[k] for k in take]

    def encode(self, sample: Any) -> TokenSet:
        return self.encode_layers(sample)[-1]

    @abc.abstractmethod
    def encode_layers(self, sample: Any) -> list[TokenSet]:
        """Per-atom features of every named layer (``layer_names``), first to last."""


# ---------------------------------------------------------------------------------------------------------------
# ANI-1x / ANI-1ccx (torchani 2.0)
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _load_ani(model: str) -> nn.Module:
    """The whole ensemble, loaded once per process (each load reads all 8 members, about 2-4 s)."""
    import torchani

    return getattr(torchani.models, model)(periodic_table_index=True).requires_grad_(False).eval()


class ANIEncoder(_Frozen):
    """One member of the ANI-1x or ANI-1ccx ensemble (8 members each, same architecture, different data/seeds).

    Layers: ``aev`` (the 384-d atomic environment vector, shared by all members of a model) and ``hidden`` (the
    96-d output of the member's last hidden layer, the only hidden width shared by H, C, N and O networks).

    Args:
        model: ``ANI1x`` or ``ANI1ccx``.
        member: ensemble member 0..7.
    """

    def __init__(self, model: str = "ANI1x", member: int = 0):
        super().__init__()
        try:
            import torchani
        except ImportError as err:
            raise _missing("torchani", "'torchani==2.0' 'setuptools<81'") from err
        if model not in ("ANI1x", "ANI1ccx"):
            raise ValueError(f"ANIEncoder(model={model!r}): use 'ANI1x' or 'ANI1ccx' (ANI-2x is not available offline)")
        ani = _load_ani(model)
        if not 0 <= member < len(ani.neural_networks):
            raise ValueError(f"ANIEncoder(member={member}): {model} has members 0..{len(ani.neural_networks) - 1}")
        self.species_converter = ani.species_converter
        self.aev_computer = ani.aev_computer
        self.network = ani.neural_networks[member]  # ANIModel: one Sequential per element, in species order
        self.elements = list(ani.species)  # e.g. ['H', 'C', 'N', 'O']
        self.model_name, self.member = model, member
        self.cache_key = f"ani-{model}-{member}-torchani{torchani.__version__}"
        self.layer_names = ["aev", "hidden"]  # 0: the AEV (the embedded environment), 1: the hidden layer
        self.layer_dims = [384, 96]
        self.elements = [1, 6, 7, 8]
        self.dim = 96
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def encode_layers(self, sample: Any) -> list[TokenSet]:
        atoms = as_atoms_list(sample)
        counts = [len(a) for a in atoms]
        n_max = max(counts)
        z = torch.full((len(atoms), n_max), -1, dtype=torch.long)  # -1 pads, as torchani expects
        pos = torch.zeros(len(atoms), n_max, 3)
        for k, a in enumerate(atoms):
            z[k, : len(a)] = torch.as_tensor(a.numbers)
            pos[k, : len(a)] = torch.as_tensor(a.positions, dtype=torch.float32)
        known = {1, 6, 7, 8}
        bad = sorted(set(int(v) for v in z[z >= 0].tolist()) - known)
        if bad:
            raise ValueError(f"ANI ({self.model_name}) knows only H, C, N, O; the sample has atomic numbers {bad}")
        species, _ = self.species_converter((z, pos))
        aev = self.aev_computer((species, pos)).aevs  # [B, n_max, 384]
        mask = species >= 0
        aev_flat, sp_flat = aev[mask], species[mask]  # [T, 384], [T] in item order (row-major mask)
        hidden = aev_flat.new_zeros(aev_flat.shape[0], self.dim)
        for k, net in enumerate(self.network.values()):
            sel = sp_flat == k
            if sel.any():
                hidden[sel] = net[:-1](aev_flat[sel])  # every layer but the final energy Linear
        pos_flat = pos[mask]
        return [_token_sets(aev_flat, counts, pos_flat), _token_sets(hidden, counts, pos_flat)]


# ---------------------------------------------------------------------------------------------------------------
# CHGNet (0.2.0, 0.3.0, r2scan)
# ---------------------------------------------------------------------------------------------------------------
class CHGNetEncoder(_Frozen):
    """CHGNet's per-atom features after each atom-convolution layer (64-d each).

    CHGNet's own ``return_atom_feas`` output is layer ``conv2`` (the second-to-last, where it reads magnetic
    moments); ``conv3`` is the last layer, before the readout normalisation.

    Args:
        model_name: ``0.2.0``, ``0.3.0`` or ``r2scan`` (weights inside the ``chgnet`` wheel).
        gap: vacuum between periodic images in Å (above the 5 Å atom-graph cutoff).
    """

    def __init__(self, model_name: str = "0.3.0", gap: float = 8.0):
        super().__init__()
        try:
            import chgnet
            from chgnet.model import CHGNet
        except ImportError as err:
            raise _missing("chgnet", "chgnet") from err
        self.model = CHGNet.load(model_name=model_name, use_device="cpu", verbose=False)
        self.gap = float(gap)
        # 0: the atom embedding, k: after atom-convolution layer k
        self.layer_names = ["embed"] + [f"conv{i}" for i in range(len(self.model.atom_conv_layers))]
        self.dim = 64
        self.elements = list(range(1, 95))
        self.cache_key = f"chgnet-{model_name}-pkg{chgnet.__version__}-gap{gap}"
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def encode_layers(self, sample: Any) -> list[TokenSet]:
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = as_atoms_list(sample)
        structures = [AseAtomsAdaptor.get_structure(_boxed(a, self.gap)) for a in atoms]
        outs: list[Tensor] = []
        hooks = [
            layer.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
            for layer in [self.model.atom_embedding, *self.model.atom_conv_layers]
        ]
        try:
            # CHGNet computes forces by autograd inside predict_structure, so grad mode stays on here
            with torch.enable_grad():
                self.model.predict_structure(structures, task="e", batch_size=len(structures))
        finally:
            for h in hooks:
                h.remove()
        counts = [len(a) for a in atoms]
        if len(outs) != len(self.layer_names) or outs[0].shape[0] != sum(counts):
            raise RuntimeError(
                f"CHGNet hooks captured {len(outs)} layers of {outs[0].shape[0] if outs else 0} atoms; "
                f"expected {len(self.layer_names)} layers of {sum(counts)} atoms"
            )
        return [_token_sets(o, counts) for o in outs]


# ---------------------------------------------------------------------------------------------------------------
# DIEP (MatPES r2SCAN)
# ---------------------------------------------------------------------------------------------------------------
class DIEPEncoder(_Frozen):
    """DIEP's node features after each graph layer (64-d), one structure at a time through its ASE calculator.

    Args:
        path: exported model folder (default: the released ``diep_fold1`` inside the package).
        gap: vacuum between periodic images in Å (above the 5 Å cutoff).
    """

    def __init__(self, path: str | None = None, gap: float = 8.0):
        super().__init__()
        try:
            import diep
            from diep.pretrained import load_potential
        except ImportError as err:
            raise _missing("diep", "diep") from err
        self.potential = load_potential(path, stress=False)
        self.layers_ = self.potential.model.graph_layers
        # 0: the node embedding, k: after graph layer k
        self.layer_names = ["embed"] + [f"graph{i}" for i in range(len(self.layers_))]
        self.dim = 64
        self.elements = list(range(1, 90))
        self.gap = float(gap)
        self.cache_key = f"diep-{path or 'fold1'}-pkg{getattr(diep, '__version__', '?')}-gap{gap}"
        self.requires_grad_(False)
        self.eval()

    def encode_layers(self, sample: Any) -> list[TokenSet]:
        from diep.pretrained import DIEPCalculator

        atoms = as_atoms_list(sample)
        calc = DIEPCalculator(potential=self.potential, stress_unit="eV/A3")
        per_layer: list[list[Tensor]] = [[] for _ in self.layer_names]
        for a in atoms:
            outs: list[Tensor] = []
            # the node embedding returns [n, 64]; each graph layer returns (edge_feat, node_feat, state_feat)
            embed = self.potential.model.embedding.layer_node_embedding
            hooks = [embed.register_forward_hook(functools.partial(_keep, outs, slice(None)))]
            hooks += [layer.register_forward_hook(functools.partial(_keep, outs, 1)) for layer in self.layers_]
            try:
                boxed = _boxed(a, self.gap)
                boxed.calc = calc
                with torch.enable_grad():  # the calculator takes forces by autograd even for the energy
                    boxed.get_potential_energy()
            finally:
                for h in hooks:
                    h.remove()
            if len(outs) != len(self.layer_names) or outs[0].shape[0] != len(a):
                raise RuntimeError(f"DIEP hooks captured {len(outs)} layers for a {len(a)}-atom structure")
            for li, o in enumerate(outs):
                per_layer[li].append(o)
        counts = [len(a) for a in atoms]
        return [_token_sets(chunks, counts) for chunks in per_layer]


# ---------------------------------------------------------------------------------------------------------------
# SO3LR (so3krates-torch; optional: it pins torch-geometric 2.7.0)
# ---------------------------------------------------------------------------------------------------------------
class SO3LREncoder(_Frozen):
    """SO3LR's 128-d invariant per-atom features (``get_descriptors``), one structure at a time."""

    def __init__(self) -> None:
        super().__init__()
        try:
            with _keep_default_dtype():
                from so3krates_torch.calculator.so3 import SO3LRCalculator

                self.calc = SO3LRCalculator(device="cpu", default_dtype="float32")
        except ImportError as err:
            raise _missing("so3krates-torch", "--no-deps so3krates-torch pydantic") from err
        self.layer_names = ["invariant"]
        self.dim = 128
        self.cache_key = "so3lr-invariant"

    def encode_layers(self, sample: Any) -> list[TokenSet]:
        atoms = as_atoms_list(sample)
        with _keep_default_dtype(), torch.enable_grad():
            feats = [torch.as_tensor(self.calc.get_descriptors(a)["invariant_features"][0]) for a in atoms]
        return [_token_sets(feats, [len(a) for a in atoms])]


# ---------------------------------------------------------------------------------------------------------------
# SevenNet (optional: needs e3nn >= 0.5, which conflicts with mace-torch's pin)
# ---------------------------------------------------------------------------------------------------------------
class SevenNetEncoder(_Frozen):
    """SevenNet's per-atom features after each equivariant gate (scalars kept), one structure at a time.

    Args:
        model: a pretrained name known to ``sevenn`` (``7net-0``, ``7net-l3i5``, ``7net-mf-0``).
        gap: vacuum between periodic images in Å.
    """

    def __init__(self, model: str = "7net-0", gap: float = 8.0, modal: str | None = None):
        super().__init__()
        try:
            with _keep_default_dtype():
                from sevenn.calculator import SevenNetCalculator

                self.calc = SevenNetCalculator(model, device="cpu", **({"modal": modal} if modal else {}))
        except ImportError as err:
            raise _missing("sevenn", "sevenn (in a separate environment: it needs e3nn>=0.5)") from err
        self.gates = [(n, m) for n, m in self.calc.model.named_modules() if n.endswith("equivariant_gate")]
        if not self.gates:
            raise RuntimeError(f"SevenNet model {model!r} has no '*equivariant_gate' modules to read features from")
        self.layer_names = [n for n, _ in self.gates]
        self.gap = float(gap)
        self.dim = -1
        self.cache_key = f"sevenn-{model}-{modal}-gap{gap}"

    def encode_layers(self, sample: Any) -> list[TokenSet]:
        atoms = as_atoms_list(sample)
        per_layer: list[list[Tensor]] = [[] for _ in self.gates]
        for a in atoms:
            outs: list[Tensor] = []
            hooks = [m.register_forward_hook(functools.partial(_keep, outs, "x")) for _, m in self.gates]
            try:
                boxed = _boxed(a, self.gap)
                boxed.calc = self.calc
                with torch.enable_grad():
                    boxed.get_potential_energy()
            finally:
                for h in hooks:
                    h.remove()
            for li, o in enumerate(outs):
                per_layer[li].append(o)
        return [_token_sets(chunks, [len(a) for a in atoms]) for chunks in per_layer]


def environment_report() -> dict[str, str]:
    """Which adapters can be built here and the versions of their packages (for docs/convergence.md)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torchani", "chgnet", "diep", "so3krates-torch", "sevenn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "")
    return out
