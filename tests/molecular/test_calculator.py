"""ASE calculator: energy conservation in NVE (velocity Verlet) for a trained tiny MACE, Verlet's dt^2 error law,
geometry optimisation, stress for a periodic cell."""

from pathlib import Path

import numpy as np
import pytest
import torch

from molecular.calculator import MACECalculator
from molecular.data import read_structures

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "molecular_sample"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # a tiny MACE fitted for a few seconds on the committed GFN2-xTB ethanol MD frames, in float64, by the mace recipe
    # on the one Trainer (EMA 0.99 with warm-up)
    from unirep.cli import compose, run_train
    from unirep.train import load_task

    out = tmp_path_factory.mktemp("calc")
    overrides = [
        "experiment=molecular/mace",
        f"data.train={SAMPLE / 'md_ethanol.extxyz'}",
        "data.n_val=4",
        "data.generate=null",
        "data.cache_dir=null",
        "data.r_max=4.0",
        "task.model.num_channels=8",
        "task.model.max_ell=2",
        "task.model.correlation=2",
        "task.model.radial_mlp=[16]",
        "task.model.mlp_irreps=8x0e",
        "trainer.max_steps=100",
        "trainer.batch_size=8",
        "trainer.ema_decay=0.99",
        "trainer.eval_at_end=false",
        "trainer.ckpt_every=100",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.num_threads=1",
        f"out_dir={out}",
    ]
    task, _ = load_task(run_train(compose("train", overrides))["checkpoint"], ema=True)
    return task.model.eval()


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
