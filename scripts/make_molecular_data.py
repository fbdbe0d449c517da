"""Build the molecular data sets, deterministically, with real GFN2-xTB labels (tblite), no downloads.

(a) a broad pre-training set over many small organic molecules: QM9 geometries from the ``qm9pack`` wheel
    (it ships QM9 offline: ``pip install -c constraints.txt qm9pack``), or, without it, rdkit ETKDG conformers of
    a built-in list of small-molecule SMILES; each molecule at its reference geometry plus thermal
    displacements, labelled with GFN2-xTB. The narrow-set molecules are excluded (held out from the teacher).
(b) narrow MD-style sets for single molecules (rMD17-like): ETKDG + MMFF94 start, GFN2-xTB Langevin MD at 500 K,
    one labelled frame every ``--interval`` steps.

Outputs go to ``data/molecular/`` (git-ignored; see data/README.md). ``--sample`` writes the small committed
sample under ``data/molecular_sample/`` that the tests and smoke runs use.

    python scripts/make_molecular_data.py                 # full sets (about 10-20 min on one core)
    python scripts/make_molecular_data.py --sample        # the committed sample (< 1 MB, about a minute)
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molecular.data import (  # noqa: E402
    Structure,
    label_structures,
    langevin_md,
    structures_from_smiles,
    thermal_displacements,
    write_extxyz,
)

NARROW = {  # rMD17's molecules (and a couple more), as SMILES
    "ethanol": "CCO",
    "malonaldehyde": "O=CCC=O",
    "benzene": "c1ccccc1",
    "toluene": "Cc1ccccc1",
    "uracil": "O=c1cc[nH]c(=O)[nH]1",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
}

# fallback broad set when qm9pack is missing: small H/C/N/O/F molecules, QM9-like
FALLBACK_SMILES = [
    "C", "N", "O", "CC", "CN", "CO", "CF", "C=C", "C#C", "C=O", "C#N", "CCC", "CCN", "CC=O", "CC#N", "COC",
    "CC(C)C", "CC(C)O", "CC(=O)O", "CC(=O)N", "NC=O", "OC=O", "C1CC1", "C1CO1", "C1CN1", "C1CCC1", "C1CCO1",
    "CCCC", "CCCO", "CCCN", "CCOC", "CC(C)=O", "CC=CC", "C=CC=C", "C=CC#N", "CC#CC", "OCCO", "NCCO", "NCCN",
    "CC(N)C", "CC(O)C=O", "O=CC=O", "CCC=O", "CCC#N", "FC(F)F", "CC(F)F", "OC(F)C", "c1ccoc1", "c1cc[nH]c1",
    "c1ccncc1", "c1cnccn1", "c1cncnc1", "C1CCCC1", "C1CCOC1", "C1CCNC1", "CC1CC1", "CCCCC", "CCCCO", "CC(C)CO",
    "CC(C)(C)O", "CN(C)C", "CNC=O", "CN(C)C=O", "COC=O", "CCOC=O", "NC(=O)N", "CC(=N)N", "N#CC#N", "OC1CC1",
    "C1=CCC=C1", "C1=CC=CC1", "O=C1CCC1", "O=C1CCO1", "CC(=O)C=C", "C=CC=O", "C=CCO", "C=CCN", "CC=NO",
]


def _qm9_structures(num: int, seed: int, exclude: set[str]) -> list[Structure] | None:
    try:
        import qm9pack  # noqa: F401
    except ImportError:
        return None
    import os

    import pandas as pd
    from ase.data import atomic_numbers
    from rdkit import Chem

    folder = os.path.join(os.path.dirname(qm9pack.__file__), "data")
    df = pd.read_csv(os.path.join(folder, "qm9_part1.csv"), usecols=["Index", "SMILES", "Elements", "XYZ_Ang"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(df))
    out = []
    for k in order:
        row = df.iloc[int(k)]
        mol = Chem.MolFromSmiles(row["SMILES"])
        if mol is None or Chem.MolToSmiles(mol) in exclude:
            continue
        numbers = [atomic_numbers[e] for e in ast.literal_eval(row["Elements"])]
        pos = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
        out.append(Structure(numbers, pos, id=f"qm9/{int(row['Index'])}", source=f"qm9pack:{int(row['Index'])}"))
        if len(out) >= num:
            break
    return out


def broad_set(num_molecules: int, displacements: int, seed: int, calculator: str) -> tuple[list[Structure], str]:
    exclude = {__import__("rdkit.Chem", fromlist=["Chem"]).CanonSmiles(s) for s in NARROW.values()}
    base = _qm9_structures(num_molecules, seed, exclude)
    origin = "qm9pack"
    if base is None:
        from rdkit import Chem

        origin = "rdkit-enumerated"
        smiles = [s for s in FALLBACK_SMILES if Chem.CanonSmiles(s) not in exclude][:num_molecules]
        base = structures_from_smiles(smiles, num_confs=1, seed=seed, names=[f"mol{k}" for k in range(len(smiles))])
    frames: list[Structure] = []
    for k, s in enumerate(base):
        frames.append(s)
        frames.extend(thermal_displacements(s, displacements, sigma=0.04, seed=seed + k, prefix=s.id))
    return label_structures(frames, calculator), origin


def narrow_set(name: str, frames: int, interval: int, seed: int, calculator: str) -> list[Structure]:
    start = structures_from_smiles([NARROW[name]], num_confs=1, seed=seed, names=[name])[0]
    return langevin_md(start, frames, calculator=calculator, temperature=500.0, timestep_fs=0.5, interval=interval,
                       seed=seed, prefix=name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default data/molecular, or data/molecular_sample)")
    p.add_argument("--sample", action="store_true", help="write the small committed sample instead")
    p.add_argument("--broad", type=int, default=1500, help="molecules in the broad set")
    p.add_argument("--displacements", type=int, default=2, help="thermal displacements per broad molecule")
    p.add_argument("--narrow", nargs="*", default=["ethanol", "aspirin", "malonaldehyde"], choices=sorted(NARROW))
    p.add_argument("--frames", type=int, default=600, help="MD frames per narrow set")
    p.add_argument("--interval", type=int, default=10, help="MD steps between kept frames")
    p.add_argument("--calculator", default="gfn2", choices=["gfn2", "gfn1", "mmff"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.sample:
        a.broad, a.displacements, a.narrow, a.frames = 24, 1, ["ethanol"], 48
    out = Path(a.out) if a.out else ROOT / "data" / ("molecular_sample" if a.sample else "molecular")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": a.seed, "calculator": a.calculator, "units": "eV, eV/Angstrom", "sets": {}}
    t0 = time.time()
    broad, origin = broad_set(a.broad, a.displacements, a.seed, a.calculator)
    write_extxyz(broad, out / "broad.extxyz")
    manifest["sets"]["broad"] = {"file": "broad.extxyz", "structures": len(broad), "origin": origin}
    print(f"broad: {len(broad)} structures from {origin} ({time.time() - t0:.0f} s)", flush=True)
    for name in a.narrow:
        t1 = time.time()
        frames = narrow_set(name, a.frames, a.interval, a.seed, a.calculator)
        write_extxyz(frames, out / f"md_{name}.extxyz")
        manifest["sets"][name] = {"file": f"md_{name}.extxyz", "structures": len(frames), "smiles": NARROW[name],
                                  "md": {"temperature_K": 500, "timestep_fs": 0.5, "interval": a.interval}}
        print(f"{name}: {len(frames)} MD frames ({time.time() - t1:.0f} s)", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
