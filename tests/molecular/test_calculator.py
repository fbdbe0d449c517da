"""ASE calculator: energy conservation in NVE (velocity Verlet) for a trained tiny MACE, Verlet's dt^2 error law,
geometry optimisation, stress for a periodic cell."""

from pathlib import Path

import numpy as np
import pytest
import torch

from molecular.calculator import MACECalculator
from molecular.data import read_structures
from molecular.quickstart import pretrain_mace

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "molecular_sample"


@pytest.fixture(scope="module")
def trained():
    # a tiny MACE fitted for a few seconds on the committed GFN2-xTB ethanol MD frames, in float64
    return pretrain_mace(
        SAMPLE / "md_ethanol.extxyz",
        [1, 6, 8],
        steps=100,
        batch_size=8,
        seed=0,
        r_max=4.0,
        num_channels=8,
        max_L=1,
        num_interactions=2,
        max_ell=2,
        correlation=2,
        radial_mlp=(16,),
        mlp_irreps="8x0e",
        dtype="float64",
    )


def _nve_deviation(model, dt_fs: float, duration_fs: float = 30.0) -> tuple[float, float]:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    atoms = read_structures(SAMPLE / "md_ethanol.extxyz")[0].to_atoms()
    atoms.calc = MACECalculator(model)
    # thermalise briefly with Langevin (300 K), then switch the thermostat off
    Langevin(
        atoms, 0.5 * units.fs, temperature_K=300, friction=0.05 / units.fs, rng=np.random.RandomState(0), fixcm=False
    ).run(20)
    dyn = VelocityVerlet(atoms, dt_fs * units.fs)
    etot, epot = [], []
    for _ in range(int(round(duration_fs / dt_fs))):
        dyn.run(1)
        epot.append(atoms.get_potential_energy())
        etot.append(epot[-1] + atoms.get_kinetic_energy())
    etot, epot = np.array(etot), np.array(epot)
    return float(np.abs(etot - etot[0]).max()), float(epot.max() - epot.min())


def test_nve_energy_conservation(trained):
    dev_half, swing = _nve_deviation(trained, 0.5)
    dev_quarter, _ = _nve_deviation(trained, 0.25)
    # Tolerance: potential and kinetic energy exchange `swing` eV during the run; a conservative force field
    # integrated by velocity Verlet keeps their sum constant up to O(dt^2) shadow-Hamiltonian fluctuations, which
    # at 0.5 fs for an organic molecule are ~1 % of that swing. A non-conservative or noisy model (forces not
    # -dE/dr, discontinuities at the cutoff) drifts by a sizeable fraction of it.
    assert swing > 0.02  # the molecule really moves (kT at 300 K is 0.026 eV)
    assert dev_half < 0.03 * swing, (dev_half, swing)
    # Verlet's error law: halving dt cuts the deviation about 4x (>= 2.5x allowed for the finite run)
    assert dev_quarter < dev_half / 2.5, (dev_quarter, dev_half)
    assert torch.get_default_dtype() == torch.float32


def test_geometry_optimisation_lowers_energy(trained):
    from ase.optimize import BFGS

    atoms = read_structures(SAMPLE / "md_ethanol.extxyz")[10].to_atoms()
    atoms.calc = MACECalculator(trained)
    e0 = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_forces()).max() < 0.05 * np.sqrt(3) + 1e-9


def test_stress_for_periodic_cell_matches_finite_strain(trained):
    from ase import Atoms

    mol = read_structures(SAMPLE / "md_ethanol.extxyz")[0]
    atoms = Atoms(numbers=mol.numbers, positions=mol.positions + 1.0, cell=np.diag([6.0, 6.5, 7.0]), pbc=True)
    atoms.calc = MACECalculator(trained)
    stress = atoms.get_stress(voigt=False)
    # stress = (1/V) dE/d(strain): central differences of the energy under a homogeneous strain
    h, vol, cell0, pos0 = 1e-5, atoms.get_volume(), atoms.get_cell().copy(), atoms.get_positions().copy()
    num = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            es = []
            for sgn in (1, -1):
                eps = np.eye(3)
                eps[i, j] += sgn * h
                atoms.set_cell(cell0 @ eps, scale_atoms=False)
                atoms.set_positions(pos0 @ eps)
                es.append(atoms.get_potential_energy())
            num[i, j] = (es[0] - es[1]) / (2 * h) / vol
    atoms.set_cell(cell0)
    atoms.set_positions(pos0)
    np.testing.assert_allclose(0.5 * (num + num.T), stress, atol=1e-6)
    with pytest.raises(Exception, match="periodic"):
        mol_atoms = mol.to_atoms()
        mol_atoms.calc = MACECalculator(trained)
        mol_atoms.get_stress()
