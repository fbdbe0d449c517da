"""Build the molecular data sets, deterministically, with real GFN2-xTB labels (tblite), no downloads.

Each set is made once, cached under ``data/molecular/`` (git-ignored; see data/README.md), written atomically (a
temporary name, then a rename), with a progress bar, and resumable: an interrupted MD continues from its
checkpoint (``<file>.md.npz``), an interrupted labelling from its finished chunks (``<file>.parts/``). A set whose
file exists is skipped, so a rerun only makes what is missing. ``manifest.json`` records how each set was made.

Sets (``--sets``, any of):

- ``ethanol``: GFN2-xTB Langevin MD of ethanol at 300 K and at 500 K (``md_ethanol_300K.extxyz``,
  ``md_ethanol_500K.extxyz``, joined as ``md_ethanol.extxyz``): timestep 0.5 fs, friction 0.02 / fs, 1 ps of
  equilibration discarded, then one frame every ``--interval`` steps (20 = 10 fs, the decorrelation stride: the
  force autocorrelation of ethanol has decayed to noise after about 10 fs; the stride and the measured decay are in
  the manifest), ``--frames`` frames per temperature.
- ``aspirin``: the same at 500 K (MD17's temperature) as ``md_aspirin.extxyz`` (the `mace` recipe's default file).
- ``ref_ethanol``, ``ref_aspirin``: the GFN2-xTB reference MD for the stability benchmark: 50 ps of Langevin MD at
  300 K (timestep 1 fs, a frame every 10 fs; ``ref_<mol>_300K.extxyz``), which is also a held-out 300 K test set.
- ``qm9``: the foundation set ``qm9_nm.extxyz``: ``--qm9-molecules`` QM9 molecules (``qm9pack``; rMD17's molecules
  held out) x one normal-mode geometry at each of ``--qm9-temperatures`` (300, 600 K; MMFF94 Hessian), GFN2 labels;
  split by molecule into ``qm9_nm_train.extxyz`` and ``qm9_nm_heldout.extxyz`` (``--qm9-held-out`` molecules).
- ``broad``: the older broad set (QM9 or rdkit molecules + Gaussian displacements), ``broad.extxyz``.

    python scripts/make_molecular_data.py --sets ethanol aspirin qm9        # training sets (~70 CPU-min)
    python scripts/make_molecular_data.py --sets ref_ethanol ref_aspirin    # reference MD (~45 CPU-min)
    python scripts/make_molecular_data.py --sets qm9 & python scripts/make_molecular_data.py --sets qm9  # 2 workers
    python scripts/make_molecular_data.py --sample        # the committed sample (< 1 MB, about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molecular.data import (  # noqa: E402
    NARROW,
    broad_structures,
    ensure_md_set,
    read_structures,
    write_extxyz,
)
from molecular.data.sampling import ensure_qm9_set, split_by_molecule  # noqa: E402

ETHANOL_SEEDS = {300.0: 0, 500.0: 1}
SETS = ("ethanol", "aspirin", "ref_ethanol", "ref_aspirin", "qm9", "broad")


def _update_manifest(out: Path, name: str, entry: dict) -> None:
    """Merge one set's entry into ``manifest.json`` (two generators may run side by side: re-read, then rename)."""
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"units": "eV, eV/Angstrom", "sets": {}}
    manifest["sets"][name] = entry
    tmp = path.with_name(f"manifest.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def autocorrelation(path: Path, max_lag: int = 10) -> dict[str, list[float]]:
    """Normalised autocorrelation of the force components and of the interatomic distances between frames ``lag``
    strides apart (lag 0..max_lag): how decorrelated consecutive frames are."""
    import numpy as np

    frames = read_structures(path)
    f = np.stack([s.forces for s in frames])  # [T, N, 3]
    x = np.stack([s.positions for s in frames])
    d = np.linalg.norm(x[:, :, None] - x[:, None], axis=-1).reshape(len(frames), -1)  # [T, N*N], rotation-free
    out = {}
    for key, v in (("forces", f.reshape(len(f), -1)), ("distances", d)):
        v = v - v.mean(0)
        c0 = float((v * v).mean())
        lags = range(min(max_lag, len(v) - 1) + 1)
        out[key] = [round(float((v[: len(v) - k] * v[k:]).mean()) / c0, 4) for k in lags]
    return out


def md_set(
    out: Path,
    name: str,
    molecule: str,
    temperature: float,
    frames: int,
    interval: int,
    timestep_fs: float,
    seed: int,
    calculator: str,
) -> Path:
    t0 = time.time()
    path = out / f"{name}.extxyz"
    manifest = out / "manifest.json"
    existed = path.exists() and manifest.exists() and name in json.loads(manifest.read_text())["sets"]
    eq = int(round(1000.0 / timestep_fs))  # 1 ps of equilibration, discarded
    ensure_md_set(
        path,
        molecule=molecule,
        frames=frames,
        interval=interval,
        temperature=temperature,
        seed=seed,
        calculator=calculator,
        timestep_fs=timestep_fs,
        equilibration_steps=eq,
    )
    if not existed:
        _update_manifest(
            out,
            name,
            {
                "file": path.name,
                "structures": frames,
                "smiles": NARROW[molecule],
                "calculator": calculator,
                "seed": seed,
                "md": {
                    "thermostat": "Langevin (ASE), friction 0.02 / fs",
                    "temperature_K": temperature,
                    "timestep_fs": timestep_fs,
                    "equilibration_fs": eq * timestep_fs,
                    "stride_steps": interval,
                    "stride_fs": interval * timestep_fs,
                    "length_ps": frames * interval * timestep_fs / 1000,
                },
                "autocorrelation_by_stride": autocorrelation(path),
                "seconds": round(time.time() - t0),
            },
        )
    return path


def join(out: Path, name: str, parts: list[Path]) -> None:
    path = out / f"{name}.extxyz"
    if path.exists():
        return
    frames = [s for p in parts for s in read_structures(p)]
    write_extxyz(frames, path)
    _update_manifest(out, name, {"file": path.name, "structures": len(frames), "joined": [p.name for p in parts]})
    print(f"{name}: {len(frames)} frames joined from {[p.name for p in parts]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default data/molecular, or data/molecular_sample)")
    p.add_argument("--sample", action="store_true", help="write the small committed sample instead")
    p.add_argument("--sets", nargs="*", default=["ethanol", "aspirin", "qm9"], choices=SETS)
    p.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 500.0], choices=sorted(ETHANOL_SEEDS))
    p.add_argument("--qm9-temperatures", type=float, nargs="+", default=[300.0, 600.0])
    p.add_argument("--frames", type=int, default=1000, help="MD frames per training set (per temperature)")
    p.add_argument("--interval", type=int, default=20, help="MD steps (0.5 fs) between kept training frames")
    p.add_argument("--ref-ps", type=float, default=50.0, help="length of the 300 K reference MD, ps")
    p.add_argument("--qm9-molecules", type=int, default=5000)
    p.add_argument("--qm9-held-out", type=int, default=250, help="QM9 molecules held out (qm9_nm_heldout.extxyz)")
    p.add_argument("--broad", type=int, default=1500, help="molecules in the older broad set")
    p.add_argument("--displacements", type=int, default=2, help="thermal displacements per broad molecule")
    p.add_argument("--calculator", default="gfn2", choices=["gfn2", "gfn1", "mmff"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out) if a.out else ROOT / "data" / ("molecular_sample" if a.sample else "molecular")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.sample:  # the committed sample the tests use: a tiny broad set and 48 frames of ethanol at 500 K
        broad, origin = broad_structures(24, 1, a.seed, a.calculator)
        write_extxyz(broad, out / "broad.extxyz")
        md_set(out, "md_ethanol", "ethanol", 500.0, 48, 10, 0.5, a.seed, a.calculator)
        return
    for name in a.sets:
        t1 = time.time()
        if name == "ethanol":
            for t in a.temperatures:  # a fixed seed per temperature, so each can be made by its own process
                md_set(
                    out,
                    f"md_ethanol_{t:g}K",
                    "ethanol",
                    t,
                    a.frames,
                    a.interval,
                    0.5,
                    a.seed + ETHANOL_SEEDS[t],
                    a.calculator,
                )
            parts = [out / f"md_ethanol_{t}K.extxyz" for t in (300, 500)]
            if all(p.exists() for p in parts):
                join(out, "md_ethanol", parts)
        elif name == "aspirin":
            md_set(out, "md_aspirin", "aspirin", 500.0, a.frames, a.interval, 0.5, a.seed, a.calculator)
        elif name.startswith("ref_"):
            mol = name[4:]
            frames = int(round(a.ref_ps * 1000 / 10))  # a frame every 10 fs
            md_set(out, f"ref_{mol}_300K", mol, 300.0, frames, 10, 1.0, a.seed + 100, a.calculator)
        elif name == "qm9":
            path = out / "qm9_nm.extxyz"
            ensure_qm9_set(
                path,
                num_molecules=a.qm9_molecules,
                temperatures=a.qm9_temperatures,
                seed=a.seed,
                calculator=a.calculator,
            )
            train, held = out / "qm9_nm_train.extxyz", out / "qm9_nm_heldout.extxyz"
            if not (train.exists() and held.exists()):
                split_by_molecule(path, train, held, a.qm9_held_out, a.seed)
                _update_manifest(
                    out,
                    "qm9",
                    {
                        "file": path.name,
                        "structures": len(read_structures(path)),
                        "molecules": a.qm9_molecules,
                        "origin": "qm9pack (QM9 B3LYP geometries), rMD17 molecules held out",
                        "geometries": f"one normal-mode sample per temperature {a.qm9_temperatures} K, MMFF94 Hessian",
                        "calculator": a.calculator,
                        "split": {
                            "train": train.name,
                            "heldout": held.name,
                            "held_out_molecules": a.qm9_held_out,
                            "train_structures": len(read_structures(train)),
                            "heldout_structures": len(read_structures(held)),
                        },
                        "seconds": round(time.time() - t1),
                    },
                )
        elif name == "broad":
            path = out / "broad.extxyz"
            if not path.exists():
                broad, origin = broad_structures(a.broad, a.displacements, a.seed, a.calculator)
                write_extxyz(broad, path)
                _update_manifest(out, "broad", {"file": path.name, "structures": len(broad), "origin": origin})
        print(f"{name}: done ({time.time() - t1:.0f} s)", flush=True)
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
