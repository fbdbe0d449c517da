"""Is the potential usable? NVE energy drift and Langevin structure distributions against GFN2-xTB reference MD.

For each model (``--run label=<run dir or checkpoint>``; a run dir of ``scripts/bench_mace_repa.py`` uses the
checkpoint early stopping chose, from its ``result.json``) and molecule, through the project's ASE calculator
(``molecular.calculator.MACECalculator``, float64):

1. NVE (velocity Verlet, ``--nve-dt`` fs) for ``--nve-ps`` ps from a 300 K reference frame with Maxwell-Boltzmann
   velocities at 300 K: the total-energy drift per atom per ps (slope of a linear fit, meV/atom/ps), the largest
   excursion, and whether it blew up (a non-finite energy or a bond stretched past twice its reference length; the
   time is reported);
2. Langevin MD at 300 K (``--langevin-ps`` ps, 1 fs, friction 0.02 / fs, a frame every 10 fs: the settings of the
   GFN2-xTB reference ``data/molecular/ref_<molecule>_300K.extxyz`` made by ``scripts/make_molecular_data.py
   --sets ref_<molecule>``): the distributions of every bond length by bond type (bins of 0.005 Å) and of one
   dihedral (ethanol H-O-C-C, aspirin C(=O)-O-c:c; bins of 10°) compared with the reference's by the
   Jensen-Shannon divergence (base 2: 0 identical, 1 disjoint), plus the force MAE on 200 reference frames. The
   sampling-noise floor is the JSD of reference segments as long as the model's run against the whole reference.

Resumable: each stage of each model saves its result (``<out>/<molecule>/<label>/{nve,langevin}.json``) and is
skipped on a rerun; the MD itself checkpoints every 500 steps (NVE) or 100 frames (Langevin) and continues.

    python scripts/bench_md_stability.py --molecule ethanol \
        --run mace=outputs/bench/mace_repa_ethanol/runs/mace_n25_s0 \
        --run mace_repa=outputs/bench/mace_repa_ethanol/runs/mace_repa_best_n25_s0
    python scripts/bench_md_stability.py ... --nve-ps 2 --langevin-ps 10        # a reduced run

Writes ``<out>/<molecule>/results.json`` and ``md_stability.png`` (energy traces, bond-length and dihedral
histograms). Reports whatever comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# one dihedral per molecule: a SMARTS on the molecule with explicit hydrogens and the four atoms of it to use
DIHEDRALS = {
    "ethanol": ("[CH3][CH2][OX2][H]", (0, 1, 2, 3), "C-C-O-H"),
    "aspirin": ("[CX3](=O)[OX2]c:c", (0, 2, 3, 4), "C(=O)-O-c:c"),
}
BOND_BINS = np.arange(0.8, 2.0001, 0.005)
DIHEDRAL_BINS = np.linspace(-180.0, 180.0, 37)


def _atomic_write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def resolve_checkpoint(spec: str) -> Path:
    """A checkpoint folder from a bench run dir (its early-stopping choice), a run dir, or a checkpoint itself."""
    p = Path(spec)
    result = p / "result.json"
    if result.exists():
        return p / "checkpoints" / f"step_{json.loads(result.read_text())['best_step']:08d}"
    return p


def calculator(ckpt: Path):
    from molecular.calculator import MACECalculator

    try:
        return MACECalculator.from_checkpoint(ckpt, ema=True, dtype="float64")
    except (KeyError, ValueError, RuntimeError):  # a run without EMA weights
        return MACECalculator.from_checkpoint(ckpt, ema=False, dtype="float64")


def bond_pairs(numbers: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Covalent bonds of a geometry (distance < 1.25 x the sum of covalent radii) and their types (``C-H``)."""
    from ase.data import chemical_symbols, covalent_radii

    r = covalent_radii[numbers]
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    i, j = np.nonzero(np.triu(d < 1.25 * (r[:, None] + r[None]), k=1))
    kinds = [
        "-".join(sorted((chemical_symbols[numbers[a]], chemical_symbols[numbers[b]])))
        for a, b in zip(i, j, strict=True)
    ]
    return np.stack([i, j], 1), kinds


def dihedral_atoms(molecule: str, numbers: np.ndarray, positions: np.ndarray) -> tuple[int, int, int, int]:
    from rdkit import Chem

    from molecular.data import MMFFCalculator, Structure

    smarts, pick, _ = DIHEDRALS[molecule]
    mol = MMFFCalculator()._molecule(Structure(numbers, positions).to_atoms())  # bonds perceived from the geometry
    match = mol.GetSubstructMatch(Chem.MolFromSmarts(smarts))
    if not match:
        raise RuntimeError(f"{molecule}: dihedral pattern {smarts} not found")
    return tuple(int(match[k]) for k in pick)


def dihedral(x: np.ndarray, a: tuple[int, int, int, int]) -> np.ndarray:
    """Dihedral angles in degrees of frames ``x[T, N, 3]``."""
    b0, b1, b2 = x[:, a[0]] - x[:, a[1]], x[:, a[2]] - x[:, a[1]], x[:, a[3]] - x[:, a[2]]
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    return np.degrees(np.arctan2((np.cross(b1n, v) * w).sum(-1), (v * w).sum(-1)))


def jsd(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2) of two histograms."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p + 1e-12, q + 1e-12, base=2) ** 2)


def distributions(x: np.ndarray, pairs: np.ndarray, kinds: list[str], dih: tuple) -> dict[str, np.ndarray]:
    d = np.linalg.norm(x[:, pairs[:, 0]] - x[:, pairs[:, 1]], axis=-1)  # [T, bonds]
    out = {}
    for kind in sorted(set(kinds)):
        cols = [k for k, t in enumerate(kinds) if t == kind]
        out[f"bond {kind}"] = np.histogram(d[:, cols].reshape(-1), BOND_BINS)[0].astype(float)
    out["dihedral"] = np.histogram(dihedral(x, dih), DIHEDRAL_BINS)[0].astype(float)
    return out


def run_nve(calc, start, ps: float, dt_fs: float, seed: int, ckpt: Path, max_stretch: float = 2.0) -> dict:
    """NVE from ``start`` with 300 K velocities; resumable from ``ckpt`` (positions, momenta, energies so far)."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    atoms = start.to_atoms()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.RandomState(seed))
    Stationary(atoms)
    ZeroRotation(atoms)
    pairs, _ = bond_pairs(start.numbers, start.positions)
    ref_len = np.linalg.norm(start.positions[pairs[:, 0]] - start.positions[pairs[:, 1]], axis=-1)
    n_steps, every = int(round(ps * 1000 / dt_fs)), 10
    t, etot, epot = [], [], []
    step = 0
    if ckpt.exists():
        st = np.load(ckpt)
        atoms.set_positions(st["x"])
        atoms.set_momenta(st["p"])
        step, t, etot, epot = int(st["step"]), st["t"].tolist(), st["etot"].tolist(), st["epot"].tolist()
    dyn = VelocityVerlet(atoms, dt_fs * units.fs)
    blew_up_ps = None
    t0 = time.time()
    while step < n_steps:
        dyn.run(every)
        step += every
        e_pot = float(atoms.get_potential_energy())
        e_tot = e_pot + float(atoms.get_kinetic_energy())
        x = atoms.get_positions()
        stretch = np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=-1) / ref_len
        t.append(step * dt_fs / 1000)
        etot.append(e_tot)
        epot.append(e_pot)
        if not np.isfinite(e_tot) or stretch.max() > max_stretch:
            blew_up_ps = step * dt_fs / 1000
            break
        if step % 500 == 0:
            tmp = ckpt.with_name(ckpt.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, x=x, p=atoms.get_momenta(), step=step, t=t, etot=etot, epot=epot)
            os.replace(tmp, ckpt)
    t_arr, e_arr = np.array(t), np.array(etot)
    n = len(start)
    finite = np.isfinite(e_arr)
    slope = np.polyfit(t_arr[finite], e_arr[finite], 1)[0] if finite.sum() > 2 else float("nan")
    return {
        "ps": ps,
        "dt_fs": dt_fs,
        "steps": step,
        "blew_up_ps": blew_up_ps,
        "drift_meV_atom_ps": float(slope / n * 1000),
        "max_excursion_meV_atom": float(np.nanmax(np.abs(e_arr - e_arr[0])) / n * 1000),
        "etot_std_meV_atom": float(np.nanstd(e_arr) / n * 1000),
        "wall_s": round(time.time() - t0, 1),
        "trace_t_ps": t_arr[:: max(1, len(t_arr) // 400)].tolist(),
        "trace_etot_meV_atom": ((e_arr - e_arr[0]) / n * 1000)[:: max(1, len(t_arr) // 400)].tolist(),
    }


def read_reference(path: Path, molecule: str) -> list:
    """The reference frames: an extxyz file, or the ``.md.npz`` checkpoint of a reference MD still running (the
    frames it has finished; the atom order is that of ``structures_from_smiles``)."""
    from molecular.data import NARROW, Structure, read_structures, structures_from_smiles

    if path.suffix != ".npz":
        return read_structures(path)
    st = np.load(path)
    numbers = structures_from_smiles([NARROW[molecule]], num_confs=1, seed=0)[0].numbers
    done = int(st["done"])
    print(f"{path}: {done} finished reference frames (a partial reference)", flush=True)
    return [
        Structure(numbers, st["pos"][k], float(st["energy"][k]), st["forces"][k], id=f"ref/{k}") for k in range(done)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", default="ethanol", choices=sorted(DIHEDRALS))
    p.add_argument("--run", action="append", default=[], help="label=<bench run dir | run dir | checkpoint>")
    p.add_argument("--nve-ps", type=float, default=10.0)
    p.add_argument("--nve-dt", type=float, default=0.5, help="fs")
    p.add_argument("--langevin-ps", type=float, default=50.0)
    p.add_argument(
        "--reference", default=None, help="default data/molecular/ref_<molecule>_300K.extxyz (or its .md.npz)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench/md_stability")
    p.add_argument("--report", action="store_true", help="only aggregate finished stages")
    a = p.parse_args()
    os.chdir(ROOT)
    from molecular.data import langevin_md

    ref_path = Path(a.reference or f"data/molecular/ref_{a.molecule}_300K.extxyz")
    if not ref_path.exists():
        raise SystemExit(f"{ref_path} missing: python scripts/make_molecular_data.py --sets ref_{a.molecule}")
    ref = read_reference(ref_path, a.molecule)
    start = ref[len(ref) // 2]
    x_ref = np.stack([s.positions for s in ref])
    pairs, kinds = bond_pairs(start.numbers, start.positions)
    dih = dihedral_atoms(a.molecule, start.numbers, start.positions)
    ref_hist = distributions(x_ref, pairs, kinds, dih)
    out = Path(a.out) / a.molecule
    labels = [r.split("=", 1)[0] for r in a.run]
    for spec in a.run:
        if a.report:
            break
        label, path = spec.split("=", 1)
        ckpt = resolve_checkpoint(path)
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        calc = calculator(ckpt)
        nve_json = folder / "nve.json"
        if not nve_json.exists():
            res = run_nve(calc, start, a.nve_ps, a.nve_dt, a.seed, folder / "nve_state.npz")
            _atomic_write(nve_json, {"checkpoint": str(ckpt), **res})
            print(f"{label}: NVE {res['steps']} steps, drift {res['drift_meV_atom_ps']:.3f} meV/atom/ps", flush=True)
        lang_json = folder / "langevin.json"
        if not lang_json.exists():
            t0 = time.time()
            frames = int(round(a.langevin_ps * 100))  # a frame every 10 fs
            traj = langevin_md(
                start,
                frames,
                calculator=calc,
                temperature=300.0,
                timestep_fs=1.0,
                friction=0.02,
                interval=10,
                seed=a.seed,
                prefix=label,
                checkpoint=folder / "langevin_state.npz",
                checkpoint_every=100,
                progress=False,
            )
            x = np.stack([s.positions for s in traj])
            np.save(folder / "langevin_positions.npy", x.astype(np.float32))
            hist = distributions(x, pairs, kinds, dih)
            sub = ref[:: max(1, len(ref) // 200)]
            df = []
            for s in sub:
                atoms = s.to_atoms()
                atoms.calc = calc
                df.append((atoms.get_forces() - s.forces).reshape(-1))
            res = {
                "checkpoint": str(ckpt),
                "ps": a.langevin_ps,
                "frames": frames,
                "jsd": {k: jsd(hist[k], ref_hist[k]) for k in ref_hist},
                "ref300K_f_mae_meV_A": float(np.abs(np.concatenate(df)).mean() * 1000),
                "wall_s": round(time.time() - t0, 1),
            }
            _atomic_write(lang_json, res)
            print(f"{label}: Langevin {a.langevin_ps} ps, JSD {res['jsd']}", flush=True)
    # the sampling noise of a run this long: JSD of reference segments of the same length against the whole reference
    seg = int(round(a.langevin_ps * 100))
    floors: dict[str, list[float]] = {}
    for k0 in range(0, max(1, len(x_ref) - seg + 1), max(seg, len(x_ref) // 5)):
        h = distributions(x_ref[k0 : k0 + seg], pairs, kinds, dih)
        for k in ref_hist:
            floors.setdefault(k, []).append(jsd(h[k], ref_hist[k]))
    a.jsd_floor = {k: float(np.mean(v)) for k, v in floors.items()}
    report(out, labels or sorted(d.name for d in out.iterdir() if d.is_dir()), ref_hist, a, pairs, kinds, dih)


def report(out: Path, labels: list[str], ref_hist: dict, a, pairs, kinds, dih) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {
        "molecule": a.molecule,
        "dihedral": DIHEDRALS[a.molecule][2],
        "reference_frames": int(sum(ref_hist["dihedral"])),
        "jsd_floor_reference_segments": getattr(a, "jsd_floor", None),
        "models": {},
    }
    for label in labels:
        entry = {}
        for stage in ("nve", "langevin"):
            f = out / label / f"{stage}.json"
            if f.exists():
                entry[stage] = json.loads(f.read_text())
        results["models"][label] = entry
    kinds_plot = [k for k in ref_hist if k.startswith("bond")][:3] + ["dihedral"]
    fig, axes = plt.subplots(1, 1 + len(kinds_plot), figsize=(4 * (1 + len(kinds_plot)), 3.5))
    for label, entry in results["models"].items():
        if "nve" in entry:
            axes[0].plot(entry["nve"]["trace_t_ps"], entry["nve"]["trace_etot_meV_atom"], label=label)
        pos = out / label / "langevin_positions.npy"
        if "langevin" in entry and pos.exists():
            hist = distributions(np.load(pos).astype(np.float64), pairs, kinds, dih)
            for ax, k in zip(axes[1:], kinds_plot, strict=True):
                bins = DIHEDRAL_BINS if k == "dihedral" else BOND_BINS
                ax.stairs(hist[k] / hist[k].sum(), bins, label=f"{label} (JSD {entry['langevin']['jsd'][k]:.3f})")
    for ax, k in zip(axes[1:], kinds_plot, strict=True):
        bins = DIHEDRAL_BINS if k == "dihedral" else BOND_BINS
        ax.stairs(ref_hist[k] / ref_hist[k].sum(), bins, color="k", label="GFN2-xTB reference")
        ax.set_title(k if k != "dihedral" else f"dihedral {DIHEDRALS[a.molecule][2]}", fontsize=9)
        ax.legend(fontsize=6)
        if k != "dihedral":
            lo, hi = np.nonzero(ref_hist[k])[0][[0, -1]]
            ax.set_xlim(BOND_BINS[max(0, lo - 10)], BOND_BINS[min(len(BOND_BINS) - 1, hi + 10)])
    axes[0].set_xlabel("t (ps)")
    axes[0].set_ylabel("E_tot - E_tot(0) (meV/atom)")
    axes[0].set_title(f"NVE {a.nve_ps} ps, dt {a.nve_dt} fs", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{a.molecule}: MD with the trained potentials vs GFN2-xTB (300 K)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "md_stability.png", dpi=110)
    plt.close(fig)
    slim = json.loads(json.dumps(results))
    for entry in slim["models"].values():
        if "nve" in entry:
            entry["nve"].pop("trace_t_ps", None)
            entry["nve"].pop("trace_etot_meV_atom", None)
    _atomic_write(out / "results.json", slim)
    print(json.dumps(slim, indent=1))


if __name__ == "__main__":
    main()
