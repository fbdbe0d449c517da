"""Build the QM9 conformer benchmark: ETKDG training ensembles and GFN2-xTB reference ensembles for held-out molecules.

Molecules come from the ``qm9pack`` wheel (QM9, Ramakrishnan et al. 2014; DFT geometries), drawn at random with
``--seed`` and split by molecule. Every molecule's stereo is fixed from its QM9 geometry (isomeric SMILES), so the
training ensembles, the references and the stereo checks agree on one stereoisomer.

- **train** (``--train`` molecules, >= 1,000 by default): ETKDGv3 embeddings + MMFF94, heavy-atom RMSD pruning at
  0.25 Å, at most ``--train-confs`` conformers: the cheap kind ET-Flow's data would replace with CREST.
- **test** (``--test`` molecules, 100 by default): reference ensembles made with GFN2-xTB (tblite), independent of the
  ETKDG baseline: starts = the QM9 DFT geometry, ``--etkdg-starts`` ETKDG embeddings (no MMFF) and ``--md-snapshots``
  frames of a high-temperature GFN2 Langevin MD (``--md-temperature`` K, from the QM9 geometry); each start is
  optimised with GFN2-xTB (BFGS, fmax 0.02 eV/Å); structures whose bond graph or stereo changed are dropped; the
  rest are kept within ``--energy-window`` kcal/mol of the lowest and de-duplicated at ``--dedup-rmsd`` Å heavy-atom
  RMSD (lowest energy kept).

How it differs from GEOM's CREST ensembles (Axelrod & Gomez-Bombarelli 2022): CREST runs iterative metadynamics
(iMTD-GC) with GFN2-xTB for hours per molecule and de-duplicates by energy, RMSD and rotational constants; here the
search is a fixed, small set of starts (ETKDG + short hot MD), so rare conformers can be missing (references are a
subset of CREST's in expectation) and COV-R is measured against fewer, well-separated minima. Both use GFN2-xTB
minima and a 6 kcal/mol window. Neither ETKDG nor MMFF minima are the reference: every reference is a GFN2 minimum,
and ETKDG is only one kind of start next to the DFT geometry and MD.

Built once, cached and resumable: one file per test molecule under ``<out>/test_parts/`` (written atomically; a
rerun skips finished molecules) and one per 50 training molecules under ``<out>/train_parts/``, then
``<out>/test.sdf``, ``<out>/train.sdf`` and ``<out>/manifest.json``. ``--train-only`` / ``--test-only`` split the
work between two processes.
Cost: about 1 s per GFN2 optimisation of a QM9 molecule on one free core (plus the MD), i.e. ~15-20 s per test
molecule with the defaults, 30-40 min for 100 molecules on one core; the training set takes a few minutes.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/make_conformer_benchmark.py \
        --out data/cache/qm9_conformers > logs/qm9_benchmark.log 2>&1 &

Needs ``qm9pack`` (``.venv/bin/pip install -c constraints.txt qm9pack``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

KCAL_EV = 0.0433641  # 1 kcal/mol in eV


def _qm9_rows(seed: int):
    try:
        import qm9pack
    except ImportError:
        sys.exit("qm9pack is not installed: .venv/bin/pip install -c constraints.txt qm9pack")
    import pandas as pd

    folder = os.path.join(os.path.dirname(qm9pack.__file__), "data")
    df = pd.read_csv(os.path.join(folder, "qm9_part1.csv"), usecols=["Index", "SMILES", "Elements", "XYZ_Ang"])
    for k in np.random.default_rng(seed).permutation(len(df)):
        yield df.iloc[int(k)]


def _molecule(row):
    """``(isomeric SMILES, template with stereo from the QM9 geometry, QM9 coordinates in template order)``."""
    from ase.data import atomic_numbers
    from rdkit import Chem

    from molecular.conformers.ensembles import map_onto_template, template_with_stereo
    from molecular.conformers.generate import mol_from_smiles

    smi = Chem.MolToSmiles(Chem.MolFromSmiles(row["SMILES"]))
    base = mol_from_smiles(smi)
    numbers = [atomic_numbers[e] for e in ast.literal_eval(row["Elements"])]
    pos = map_onto_template(base, numbers, np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=float), smi)
    template = template_with_stereo(smi, pos)
    return Chem.MolToSmiles(Chem.RemoveHs(template)), template, pos


def select(n_train: int, n_test: int, seed: int, min_heavy: int) -> tuple[list, list]:
    """Random QM9 molecules (parseable, supported elements and charges, ETKDG-embeddable), split by molecule."""
    from rdkit import Chem, RDLogger

    from molecular.conformers.data import featurize

    RDLogger.DisableLog("rdApp.*")
    out, seen = [], set()
    for row in _qm9_rows(seed):
        try:
            smi, template, pos = _molecule(row)
            featurize(template, smi)
        except Exception:  # unsupported element / charge, or a QM9 geometry whose graph is not its SMILES's
            continue
        if smi in seen or Chem.RemoveHs(template).GetNumAtoms() < min_heavy:
            continue
        seen.add(smi)
        out.append({"index": int(row["Index"]), "smiles": smi, "template": template, "qm9_pos": pos})
        if len(out) >= n_train + n_test:
            break
    RDLogger.EnableLog("rdApp.*")
    return out[:n_test], out[n_test:]  # test first: the held-out molecules do not depend on --train


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, mininterval=10.0, file=sys.stderr)
    except ImportError:
        return iterable


def train_ensembles(mols: list, out: Path, confs: int, max_confs: int, seed: int, chunk: int = 50) -> Path:
    """ETKDG + MMFF ensembles, written in chunks of ``chunk`` molecules (resumable), then joined as ``train.sdf``."""
    from molecular.conformers.ensembles import read_ensembles, record_from_conformers, write_ensembles
    from molecular.conformers.generate import conformer_mols, etkdg_conformers, prune_conformers

    path = out / "train.sdf"
    if path.exists():
        print(f"[train] {path} exists: kept", flush=True)
        return path
    parts = out / "train_parts"
    parts.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(mols), chunk))
    todo = [s for s in starts if not (parts / f"{s // chunk:04d}.sdf").exists()]
    print(f"[train] {len(starts) - len(todo)} of {len(starts)} chunks cached under {parts}", flush=True)
    for s in _progress(todo, len(todo), f"train ETKDG+MMFF (chunks of {chunk})"):
        records = []
        for m in mols[s : s + chunk]:
            try:
                ens = conformer_mols(etkdg_conformers(m["template"], confs, seed=seed, mmff=True))
            except RuntimeError:
                continue
            kept = prune_conformers(ens, 0.25)[:max_confs]
            pos = [ens[i].GetConformer().GetPositions() for i in kept]
            records.append(record_from_conformers(m["smiles"], pos, template=m["template"]))
        write_ensembles(records, parts / f"{s // chunk:04d}.sdf")  # atomic: a half-written chunk never counts
        print(f"[train] chunk {s // chunk} ({len(records)} molecules) done", flush=True)
    records = [r for s in starts for r in read_ensembles(parts / f"{s // chunk:04d}.sdf")]
    write_ensembles(records, path)
    print(f"[train] {len(records)} molecules -> {path}", flush=True)
    return path


def _gfn2_opt(template, pos: np.ndarray, fmax: float, steps: int) -> tuple[np.ndarray, float] | None:
    from ase import Atoms
    from ase.optimize import BFGS

    from molecular.conformers.generate import _tblite

    atoms = Atoms(numbers=[a.GetAtomicNum() for a in template.GetAtoms()], positions=pos)
    atoms.calc = _tblite(template)
    try:
        BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)
        return atoms.get_positions().copy(), float(atoms.get_potential_energy())
    except Exception:  # SCF failure on a bad start: that start is dropped
        return None


def _md_starts(template, pos: np.ndarray, num: int, temperature: float, interval: int, seed: int) -> list[np.ndarray]:
    from molecular.data import Structure, langevin_md

    if num <= 0:
        return []
    s = Structure([a.GetAtomicNum() for a in template.GetAtoms()], pos, id="md")
    try:
        frames = langevin_md(s, num, "gfn2", temperature=temperature, timestep_fs=1.0, interval=interval, seed=seed)
    except Exception as err:  # an SCF failure in a hot frame: the molecule keeps its other starts
        print(f"[test] MD failed ({type(err).__name__}: {err}); continuing without MD starts", flush=True)
        return []
    return [f.positions for f in frames]


def reference_ensemble(m: dict, args, seed: int) -> dict:
    """GFN2-xTB reference ensemble of one test molecule (see the module docstring)."""
    from molecular.conformers.generate import conformer_mols, etkdg_conformers, prune_conformers
    from molecular.conformers.stereo import keeps_stereo
    from molecular.conformers.validity import keeps_bond_graph, with_coordinates

    t0 = time.perf_counter()
    template = m["template"]
    starts = [("qm9", m["qm9_pos"])]
    try:
        emb = conformer_mols(etkdg_conformers(template, args.etkdg_starts, seed=seed, mmff=False))
        starts += [("etkdg", e.GetConformer().GetPositions()) for e in emb]
    except RuntimeError:
        pass
    md = _md_starts(template, m["qm9_pos"], args.md_snapshots, args.md_temperature, args.md_interval, seed)
    starts += [("md", p) for p in md]
    opt, n_bad = [], 0
    for src, p in starts:
        res = _gfn2_opt(template, p, args.fmax, args.opt_steps)
        if res is None:
            n_bad += 1
            continue
        mol = with_coordinates(template, res[0])
        if not (keeps_bond_graph(mol) and keeps_stereo(mol, template)):
            n_bad += 1  # the optimisation changed the molecule (a reaction or an inversion): not its conformer
            continue
        opt.append((src, mol, res[1]))
    if not opt:
        return {"smiles": m["smiles"], "conformers": [], "seconds": time.perf_counter() - t0}
    e = np.array([o[2] for o in opt])
    keep = [i for i in range(len(opt)) if e[i] - e.min() <= args.energy_window * KCAL_EV]
    mols = [opt[i][1] for i in keep]
    kept = prune_conformers(mols, args.dedup_rmsd, e[keep])
    confs = [
        {
            "pos": mols[k].GetConformer().GetPositions().tolist(),
            "energy_eV": float(e[keep[k]]),
            "source": opt[keep[k]][0],
        }
        for k in kept
    ]
    return {
        "smiles": m["smiles"],
        "qm9_index": m["index"],
        "conformers": confs,
        "num_starts": len(starts),
        "num_dropped": n_bad,
        "seconds": time.perf_counter() - t0,
    }


def test_ensembles(mols: list, out: Path, args) -> list[dict]:
    parts = out / "test_parts"
    parts.mkdir(parents=True, exist_ok=True)
    done = []
    todo = [(k, m) for k, m in enumerate(mols) if not (parts / f"{k:04d}.json").exists()]
    print(f"[test] {len(mols) - len(todo)} of {len(mols)} molecules cached under {parts}", flush=True)
    for k, m in _progress(todo, len(todo), "test GFN2 ensembles"):
        res = reference_ensemble(m, args, seed=args.seed + k)
        tmp = parts / f"{k:04d}.json.tmp"
        tmp.write_text(json.dumps(res))
        os.replace(tmp, parts / f"{k:04d}.json")
        print(
            f"[test] {k:4d} {res['smiles']:<24s} {len(res['conformers'])} conformers from {res.get('num_starts', 0)} "
            f"starts in {res['seconds']:.1f} s",
            flush=True,
        )
    for k in range(len(mols)):
        f = parts / f"{k:04d}.json"
        if f.exists():
            done.append(json.loads(f.read_text()))
    return done


def write_test(done: list[dict], templates: dict, out: Path) -> Path:
    from molecular.conformers.ensembles import record_from_conformers, write_ensembles

    records = [
        record_from_conformers(
            d["smiles"],
            [np.array(c["pos"]) for c in d["conformers"]],
            [c["energy_eV"] for c in d["conformers"]],
            template=templates[d["smiles"]],
        )
        for d in done
        if d["conformers"]
    ]
    return write_ensembles(records, out / "test.sdf")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/cache/qm9_conformers")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-heavy", type=int, default=4, help="skip molecules with fewer heavy atoms")
    p.add_argument("--train-confs", type=int, default=10, help="ETKDG embeddings per training molecule")
    p.add_argument("--train-max-confs", type=int, default=8)
    p.add_argument("--etkdg-starts", type=int, default=8)
    p.add_argument("--md-snapshots", type=int, default=4)
    p.add_argument("--md-temperature", type=float, default=1000.0)
    p.add_argument("--md-interval", type=int, default=25, help="MD steps (1 fs) between snapshots")
    p.add_argument("--fmax", type=float, default=0.02, help="GFN2 optimisation threshold (eV/Å)")
    p.add_argument("--opt-steps", type=int, default=300)
    p.add_argument("--energy-window", type=float, default=6.0, help="kcal/mol above the lowest (CREST's default)")
    p.add_argument("--dedup-rmsd", type=float, default=0.125, help="heavy-atom RMSD (Å) below which two are one")
    p.add_argument("--test-only", action="store_true", help="skip the training set")
    p.add_argument("--train-only", action="store_true", help="skip the test set (two processes can split the work)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    test, train = select(args.train, args.test, args.seed, args.min_heavy)
    print(f"[select] {len(train)} train + {len(test)} test molecules ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "split.json").write_text(
        json.dumps({"train": [m["smiles"] for m in train], "test": [m["smiles"] for m in test]}, indent=0)
    )
    if not args.test_only:
        train_ensembles(train, out, args.train_confs, args.train_max_confs, args.seed)
    if args.train_only:
        return
    done = test_ensembles(test, out, args)
    path = write_test(done, {m["smiles"]: m["template"] for m in test}, out)
    n_conf = [len(d["conformers"]) for d in done]
    manifest = {
        "format": "unirep-conformer-benchmark/1",
        "settings": vars(args),
        "train_molecules": len(train),
        "test_molecules_done": len(done),
        "test_molecules_planned": len(test),
        "test_conformers_mean": float(np.mean(n_conf)) if n_conf else 0.0,
        "test_seconds_total": float(sum(d["seconds"] for d in done)),
        "test": str(path),
        "train": str(out / "train.sdf"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"[done] {json.dumps(manifest)}", flush=True)


if __name__ == "__main__":
    main()
