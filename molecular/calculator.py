"""An ASE calculator for trained MACE models: run ASE MD and geometry optimisation with them.

The counterpart of ACEsuit/mace ``mace/calculators/mace.py`` (``MACECalculator``) for this project's checkpoints:
energies in eV, forces in eV/Å, stress in eV/Å³ (Voigt order, ASE's sign convention, periodic cells only).

    from molecular.calculator import MACECalculator
    atoms.calc = MACECalculator.from_checkpoint("outputs/molecular_quickstart")   # newest checkpoint, EMA weights
    atoms.calc = MACECalculator.from_model("data/molecular/foundation_quick")      # a saved MACE (project format)

For MD, float64 (``dtype="float64"``) conserves energy better than float32, as for MACE itself.
"""

from __future__ import annotations

import os

import torch
from ase.calculators.calculator import Calculator, all_changes

from molecular.data import AtomicGraph, Structure, collate_graphs
from molecular.models import MACEModel

__all__ = ["MACECalculator"]


class MACECalculator(Calculator):
    """ASE calculator around a :class:`~molecular.models.MACEModel`.

    Args:
        model: the trained model.
        device: where it runs.
        dtype: ``float32``/``float64`` to convert the model to (``None``: keep).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: MACEModel, device: str | torch.device = "cpu", dtype: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if dtype is not None:
            model = model.set_dtype("float64" if dtype in ("float64", "fp64") else "float32")
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, ema: bool = True, device: str = "cpu", dtype: str | None = None
    ) -> MACECalculator:
        """From a unirep checkpoint (or run folder: its newest checkpoint) of a MACE task."""
        from unirep.train import load_task

        task, _ = load_task(path, ema=ema, device="cpu")
        model = getattr(task, "model", None)
        if not isinstance(model, MACEModel):
            raise TypeError(f"{path}: the checkpoint's task.model is {type(model).__name__}, not a MACEModel")
        return cls(model, device=device, dtype=dtype)

    @classmethod
    def from_model(
        cls, path: str | os.PathLike, trust_pickle: bool = False, device: str = "cpu", dtype: str | None = None
    ) -> MACECalculator:
        """From any MACE model file :func:`molecular.teachers.load_mace_model` reads."""
        from molecular.teachers.mace import load_mace_model

        return cls(load_mace_model(path, trust_pickle=trust_pickle), device=device, dtype=dtype)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        s = Structure.from_atoms(self.atoms)
        s.energy, s.forces = None, None  # labels of an attached calculator are not inputs
        periodic = any(s.pbc)
        batch = collate_graphs([AtomicGraph.from_structure(s, self.model.r_max)]).to(self.device)
        out = self.model(batch, compute_forces=True, compute_stress=periodic and "stress" in properties, training=False)
        energy = float(out["energy"].detach().double().cpu()[0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = out["forces"].detach().double().cpu().numpy()
        if periodic and out["stress"] is not None:
            from ase.stress import full_3x3_to_voigt_6_stress

            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"].detach().double().cpu().numpy()[0])
        elif "stress" in properties:
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError("stress is defined for periodic cells only")
