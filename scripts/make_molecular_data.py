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
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molecular.data import (  # noqa: E402
    NARROW,
    Structure,
    broad_structures,
    langevin_md,
    structures_from_smiles,
    write_extxyz,
)


def narrow_set(name: str, frames: int, interval: int, seed: int, calculator: str) -> list[Structure]:
    start = structures_from_smiles([NARROW[name]], num_confs=1, seed=seed, names=[name])[0]
    return langevin_md(
        start,
        frames,
        calculator=calculator,
        temperature=500.0,
        timestep_fs=0.5,
        interval=interval,
        seed=seed,
        prefix=name,
    )


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
    broad, origin = broad_structures(a.broad, a.displacements, a.seed, a.calculator)
    write_extxyz(broad, out / "broad.extxyz")
    manifest["sets"]["broad"] = {"file": "broad.extxyz", "structures": len(broad), "origin": origin}
    print(f"broad: {len(broad)} structures from {origin} ({time.time() - t0:.0f} s)", flush=True)
    for name in a.narrow:
        t1 = time.time()
        frames = narrow_set(name, a.frames, a.interval, a.seed, a.calculator)
        write_extxyz(frames, out / f"md_{name}.extxyz")
        manifest["sets"][name] = {
            "file": f"md_{name}.extxyz",
            "structures": len(frames),
            "smiles": NARROW[name],
            "md": {"temperature_K": 500, "timestep_fs": 0.5, "interval": a.interval},
        }
        print(f"{name}: {len(frames)} MD frames ({time.time() - t1:.0f} s)", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
