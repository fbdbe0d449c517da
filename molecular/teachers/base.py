"""Frozen atomistic teachers: the generic machinery that turns an atomistic model into a core ``Encoder``.

MACE-REPA (ICML 2025 GenBio workshop, "Unifying Force Prediction and Molecular Conformation Generation Through
Representation Alignment") aligns a force field's per-atom features to a frozen foundation model's per-atom
features. Any model with per-atom features can be that teacher. An :class:`AtomisticEncoder` maps a
:class:`~molecular.data.GraphBatch` to a :class:`~unirep.TokenSet` (atoms are tokens, ``batch`` the graph index);
wrapped in :class:`unirep.encoders.FrozenEncoder` with ``ids = batch.ids`` its features are cached per structure,
so a fixed training set costs one teacher pass per structure, not one per step.

Three ways in:

- subclass and implement ``features(batch) -> Tensor[T, D]`` (see :mod:`molecular.teachers.mace`);
- :class:`HookEncoder`: any ``torch.nn.Module`` plus the name of the submodule whose output holds the per-atom
  features; a forward hook catches that output (the pattern of timm's ``forward_intermediates`` for models
  that do not expose one);
- :class:`AtomsFunctionEncoder`: a function ``ase.Atoms -> array[N, D]`` called per structure (ASE-calculator
  style teachers such as SO3LR's ``get_descriptors`` or CHGNet's ``predict_structure(return_atom_feas=True)``).

Teachers are frozen and usually trained on other data, so per-element offsets dominate raw features (ANCHORS:
linear CKA 0.94-0.97 between unrelated models, mostly by element). ``center`` subtracts a per-element mean
fitted with :meth:`AtomisticEncoder.fit_element_means`, so alignment and comparisons see the environment
signal rather than the element identity.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from molecular.data import GraphBatch
from molecular.models import default_dtype
from unirep.converge import group_centre
from unirep.intermediates import feature_take_indices
from unirep.tokens import TokenSet, segment_mean

__all__ = [
    "AtomisticEncoder",
    "HookEncoder",
    "AtomsFunctionEncoder",
    "batch_to_atoms",
    "structure_digests",
    "check_teacher_elements",
    "teacher_elements",
]


def _digest(numbers: Any, positions: Any, cell: Any = None, pbc: Any = None) -> str:
    h = hashlib.sha1(b"atoms/1|")
    for part in (numbers, positions, cell, pbc):
        if part is None:
            h.update(b"-")
            continue
        arr = part.detach().cpu().numpy() if isinstance(part, Tensor) else np.asarray(part)
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float64)
        elif arr.dtype.kind in "iub":
            arr = arr.astype(np.int64)
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def structure_digests(sample: Any) -> list[str]:
    """Content keys of the structures of a sample (the teacher feature cache's keys, see
    :class:`unirep.encoders.FrozenEncoder`): sha1 of atomic numbers, positions (float64), cell and pbc of each
    structure of a :class:`~molecular.data.GraphBatch`, or of each ``ase.Atoms`` / ``Structure`` in a list."""
    if hasattr(sample, "ptr") and hasattr(sample, "numbers"):
        ptr = sample.ptr.tolist()
        cell = getattr(sample, "cell", None)
        pbc = getattr(sample, "pbc", None)
        return [
            _digest(
                sample.numbers[a:b],
                sample.positions[a:b],
                None if cell is None else cell[i],
                None if pbc is None else pbc[i],
            )
            for i, (a, b) in enumerate(zip(ptr[:-1], ptr[1:], strict=True))
        ]
    items = [sample] if hasattr(sample, "get_positions") else list(sample)
    out = []
    for s in items:
        if hasattr(s, "get_positions"):  # ase.Atoms
            out.append(_digest(s.numbers, s.positions, np.asarray(s.cell), np.asarray(s.pbc)))
        else:
            out.append(_digest(s.numbers, s.positions, getattr(s, "cell", None), getattr(s, "pbc", None)))
    return out


def teacher_elements(teacher: Any) -> list[int] | None:
    """The atomic numbers a teacher knows (its ``elements`` attribute, through a FrozenEncoder), or ``None``."""
    inner = getattr(teacher, "encoder", teacher)
    z = getattr(inner, "elements", None)
    return None if z is None else sorted(int(v) for v in z)


def check_teacher_elements(teacher: Any, numbers: Sequence[int], what: str = "the training data") -> None:
    """Stop, naming them, when the data holds elements the teacher does not know."""
    known = teacher_elements(teacher)
    if known is None:
        return
    from ase.data import chemical_symbols

    missing = sorted(set(int(z) for z in numbers) - set(known))
    if missing:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
        inner = getattr(teacher, "encoder", teacher)
        raise ValueError(
            f"teacher {type(inner).__name__} does not know element(s) {names} found in {what}; it knows "
            f"{[chemical_symbols[z] for z in known]}. Choose a teacher that covers every element of the data, or "
            "remove those structures"
        )


def batch_to_atoms(batch: GraphBatch) -> list:
    """One ``ase.Atoms`` per graph of a batch (positions, numbers, cell, pbc)."""
    from ase import Atoms

    out = []
    for i in range(batch.num_graphs):
        a, b = int(batch.ptr[i]), int(batch.ptr[i + 1])
        out.append(
            Atoms(
                numbers=batch.numbers[a:b].cpu().numpy(),
                positions=batch.positions[a:b].detach().cpu().double().numpy(),
                cell=batch.cell[i].cpu().double().numpy(),
                pbc=batch.pbc[i].cpu().numpy(),
            )
        )
    return out


class AtomisticEncoder(nn.Module, abc.ABC):
    """Base of atomistic teachers: ``encode(batch) -> TokenSet`` of per-atom features ``[T, dim]``.

    Args:
        dim: feature width.
        center: subtract the per-element feature mean (after :meth:`fit_element_means`).
        dtype: torch's default dtype while the teacher runs (restored afterwards; some teachers build tensors
            with the default dtype).
    """

    def __init__(self, dim: int, center: bool = False, dtype: str | torch.dtype = "float32") -> None:
        super().__init__()
        self.dim = int(dim)
        self.center = bool(center)
        self.run_dtype = dtype
        # per-element means [119, dim]; zeros until fitted
        self.register_buffer("element_mean", torch.zeros(119, self.dim))
        self.register_buffer("element_mean_fitted", torch.zeros((), dtype=torch.bool))

    #: one layer (index 0 = -1) unless a subclass exposes more (unirep.intermediates)
    num_layers = 0
    #: the teacher's features are rotation invariant (an l >= 1 student channel must not be aligned to them)
    invariant = True
    #: atomic numbers the teacher knows (``None``: not stated)
    elements: Sequence[int] | None = None

    @abc.abstractmethod
    def features(self, batch: GraphBatch) -> Tensor:
        """Per-atom features ``[T, dim]`` in the batch's atom order."""

    def feature_dim(self, index: int | None = None) -> int:
        return self.dim

    def item_digests(self, sample: Any) -> list[str]:
        return structure_digests(sample)

    def forward_intermediates(self, batch: GraphBatch, indices: Any = None) -> tuple[None, list[TokenSet]]:
        """The one-layer contract: index 0 (= -1) is :meth:`encode`'s output."""
        take = feature_take_indices(self.num_layers, indices, type(self).__name__)
        ts = self.encode(batch)
        return None, [ts for _ in take]

    @torch.no_grad()
    def encode(self, batch: GraphBatch) -> TokenSet:
        with default_dtype(self.run_dtype):
            x = self.features(batch)
        if x.shape != (batch.numbers.shape[0], self.dim):
            raise ValueError(
                f"{type(self).__name__} returned features of shape {tuple(x.shape)}; expected "
                f"[{batch.numbers.shape[0]} atoms, {self.dim}]: check dim and the feature selection"
            )
        x = x.float()
        if self.center:
            if not bool(self.element_mean_fitted):
                raise RuntimeError(f"{type(self).__name__}(center=True): call fit_element_means(batches) first")
            x = x - self.element_mean.to(x.device)[batch.numbers]
        return TokenSet(x, batch.batch, batch.positions.float(), batch.num_graphs)

    @torch.no_grad()
    def fit_element_means(self, batches: Sequence[GraphBatch]) -> None:
        """Per-element mean feature over a few batches (a training set); elements never seen keep a zero mean."""
        feats, numbers = [], []
        center, self.center = self.center, False
        try:
            for b in batches:
                feats.append(self.encode(b).x.double().cpu())
                numbers.append(b.numbers.cpu())
        finally:
            self.center = center
        x, z = torch.cat(feats), torch.cat(numbers)
        means = torch.zeros(119, self.dim, dtype=torch.float64)
        means[z] = x - group_centre(x, z)  # each atom's row minus its centred row: its element's mean
        self.element_mean.copy_(means.to(self.element_mean.dtype))
        self.element_mean_fitted.fill_(True)

    @torch.no_grad()
    def encode_pooled(self, batch: GraphBatch) -> Tensor:
        """Mean over each structure's atoms ``[B, dim]``."""
        t = self.encode(batch)
        return segment_mean(t.x, t.batch, t.num_items)


def _default_select(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        for key in ("node_feats", "x", "features", "h"):
            if key in output:
                return output[key]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"hooked output of type {type(output).__name__}: pass select= to pick the per-atom tensor")


class HookEncoder(AtomisticEncoder):
    """Any torch atomistic model as a teacher: run it, catch a submodule's output with a forward hook.

    Args:
        model: the (pretrained) model; frozen here.
        layer: dotted name of the submodule (``dict(model.named_modules())`` key) whose output holds per-atom
            features.
        dim: feature width of that output (after ``select``).
        prepare: ``prepare(batch) -> (args, kwargs)`` building the model's inputs from a GraphBatch.
        select: picks the ``[T, dim]`` tensor from the hooked output (default: the tensor itself, a dict's
            ``node_feats``/``x``, or a tuple's first element).
        per_structure: call the model once per structure (models that take one structure at a time); the
            features are concatenated in batch order.
        center / dtype: see :class:`AtomisticEncoder`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        dim: int,
        prepare: Callable[[GraphBatch], tuple[tuple, dict]],
        select: Callable[[Any], Tensor] | None = None,
        per_structure: bool = False,
        center: bool = False,
        dtype: str | torch.dtype = "float32",
    ) -> None:
        super().__init__(dim, center=center, dtype=dtype)
        modules = dict(model.named_modules())
        if layer not in modules:
            near = [n for n in modules if n and (layer in n or n in layer)][:8]
            raise KeyError(f"HookEncoder: {type(model).__name__} has no submodule {layer!r}; similar names: {near}")
        self.model = model.eval().requires_grad_(False)
        self.layer = layer
        self.prepare = prepare
        self.select = select or _default_select
        self.per_structure = per_structure
        self._captured: list[Any] = []
        modules[layer].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured.append(output)

    def _run(self, batch: GraphBatch) -> Tensor:
        self._captured.clear()
        args, kwargs = self.prepare(batch)
        with torch.enable_grad():  # many force fields differentiate energies inside forward
            self.model(*args, **kwargs)
        if not self._captured:
            raise RuntimeError(f"HookEncoder: submodule {self.layer!r} did not run in the forward pass")
        return self.select(self._captured[-1]).detach()

    def features(self, batch: GraphBatch) -> Tensor:
        if not self.per_structure:
            return self._run(batch)
        return torch.cat([self._run(batch.select([i])) for i in range(batch.num_graphs)])


class AtomsFunctionEncoder(AtomisticEncoder):
    """A teacher given as ``fn(atoms: ase.Atoms) -> array[N, dim]`` (run per structure).

    ``module`` (optional) is registered so its weights identify the teacher in the feature cache.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        dim: int,
        module: nn.Module | None = None,
        center: bool = False,
        dtype: str | torch.dtype = "float32",
        name: str = "",
    ) -> None:
        super().__init__(dim, center=center, dtype=dtype)
        self.fn = fn
        self.module = module
        self.name = name or getattr(fn, "__name__", "fn")

    def features(self, batch: GraphBatch) -> Tensor:
        feats = [torch.as_tensor(np.asarray(self.fn(atoms)), dtype=torch.float32) for atoms in batch_to_atoms(batch)]
        return torch.cat(feats).to(batch.positions.device)
