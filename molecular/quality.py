"""Quality of atomistic models on one common labelled test set: the quality axis of the convergence study.

Edamadaka et al. 2025 ask whether interatomic potentials "converge as they improve"; that needs every model's
error on the *same* labelled structures, not each model's own validation number. :func:`force_mae` is a
``quality_fn`` of :mod:`unirep.converge` (``quality_fn: {_target_: molecular.quality.force_mae, _partial_: true,
data: {...}}``): it predicts forces with any model that has energies/forces and returns the force MAE (eV/Å)
against the data set's labels (GFN2-xTB via tblite for :class:`molecular.graphnets.MoleculeSet`). Forces, not
energies: the models were trained on different levels of theory (wB97X, CCSD(T)*, PBE, r2SCAN, GFN2-xTB) whose
energy zeros differ by per-element constants, which forces do not see. Descriptors and other encoders without
energies return ``None`` (no quality; the study leaves them out of the test).

Adapters (:func:`predict_forces`, one registered function per encoder type, so new types add one function):
ANI members (torchani; Hartree -> eV), CHGNet (``predict_structure(task="ef")``), DIEP (its ASE calculator),
graph nets trained here (their potential's forward); any encoder with a ``predict_forces(atoms_list)`` method.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

__all__ = ["predict_forces", "force_mae"]

HARTREE_EV = 27.211386245988  # CODATA 2018


@functools.singledispatch
def predict_forces(encoder: Any, batch: Any) -> list[np.ndarray] | None:
    """Forces (eV/Å) ``[n_atoms, 3]`` per structure of a ``GraphBatch``, or ``None`` if the encoder has none."""
    fn = getattr(encoder, "predict_forces", None)
    if fn is None:
        return None
    from molecular.teachers.external import as_atoms_list

    return [np.asarray(f, dtype=np.float64) for f in fn(as_atoms_list(batch))]


def _register() -> None:
    """Register the adapters of the installed packages (an import error only disables that adapter)."""
    from molecular.teachers import external as ext

    @predict_forces.register(ext.ANIEncoder)
    def _(encoder: Any, batch: Any) -> list[np.ndarray]:
        atoms = ext.as_atoms_list(batch)
        out = []
        for a in atoms:  # one molecule at a time: no padding, exact per-structure gradients
            z = torch.as_tensor(a.numbers, dtype=torch.long)[None]
            pos = torch.as_tensor(a.positions, dtype=torch.float32)[None].requires_grad_(True)
            with torch.enable_grad():
                species, _ = encoder.species_converter((z, pos))
                aev = encoder.aev_computer((species, pos)).aevs
                energy = encoder.network((species, aev)).energies.sum()  # Hartree; self-energies are constant
                (grad,) = torch.autograd.grad(energy, pos)
            out.append(-grad[0].double().numpy() * HARTREE_EV)
        return out

    @predict_forces.register(ext.CHGNetEncoder)
    def _(encoder: Any, batch: Any) -> list[np.ndarray]:
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = ext.as_atoms_list(batch)
        structures = [AseAtomsAdaptor.get_structure(ext._boxed(a, encoder.gap)) for a in atoms]
        with torch.enable_grad():
            preds = encoder.model.predict_structure(structures, task="ef", batch_size=len(structures))
        preds = preds if isinstance(preds, list) else [preds]
        return [np.asarray(p["f"], dtype=np.float64) for p in preds]

    @predict_forces.register(ext.DIEPEncoder)
    def _(encoder: Any, batch: Any) -> list[np.ndarray]:
        from diep.pretrained import DIEPCalculator

        calc = DIEPCalculator(potential=encoder.potential, stress_unit="eV/A3")
        out = []
        for a in ext.as_atoms_list(batch):
            boxed = ext._boxed(a, encoder.gap)
            boxed.calc = calc
            with torch.enable_grad():
                out.append(np.asarray(boxed.get_forces(), dtype=np.float64))
        return out

    try:
        from molecular.graphnets import GraphNetEncoder
    except ImportError:  # pragma: no cover - graph nets need torch-geometric blocks
        return

    @predict_forces.register(GraphNetEncoder)
    def _(encoder: Any, batch: Any) -> list[np.ndarray]:
        with torch.enable_grad():
            forces = encoder.model(batch)["forces"].detach().double().numpy()
        ptr = batch.ptr.tolist()
        return [forces[a:b] for a, b in zip(ptr[:-1], ptr[1:], strict=True)]


_register()


def force_mae(encoder: Any, data: Any, batch_size: int = 16, limit: int | None = None) -> float | None:
    """Force MAE (eV/Å, mean over all force components) of ``encoder`` on the labelled structures of ``data``
    (a data set with ``collate`` returning a ``GraphBatch`` with ``forces``); ``None`` if the encoder predicts no
    forces. ``limit`` scores the first structures only."""
    n = len(data) if limit is None else min(len(data), int(limit))
    if n == 0:
        raise ValueError("force_mae: the labelled data set is empty")
    err, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = data.collate([data[i] for i in range(start, min(n, start + batch_size))])
        pred = predict_forces(encoder, batch)
        if pred is None:
            return None
        ref = batch.forces.detach().double().numpy()
        got = np.concatenate(pred)
        if got.shape != ref.shape:
            raise ValueError(
                f"force_mae: {type(encoder).__name__} returned forces {got.shape} for labels {ref.shape} "
                f"(structures {start}..{min(n, start + batch_size) - 1})"
            )
        err += float(np.abs(got - ref).sum())
        count += ref.size
    value = err / count
    return value if math.isfinite(value) else None
