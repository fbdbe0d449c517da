"""The small reproducible protein set, its data sets (split by protein) and the data module of the recipes.

:func:`make_protein_set` (``scripts/make_protein_data.py``) writes heavy-atom PDB files and a ``manifest.json``
under ``data/proteins/`` (git-ignored) from offline sources only:

- ``PeptideBuilder`` peptides of random sequence with helix / strand / polyproline / coil segments
  (:func:`~molecular.proteins.build.secondary_structure_peptide`), each its own protein;
- ``MDAnalysisTests`` structures when that package is installed: adenylate kinase open and closed (one protein,
  two states, one split), HIV protease (1hvr, 4E43), cobrotoxin, zinc finger 5a7u, 1a28, 1osm, 19hc, A6PA6,
  neopetrosiamide, gramicidin;
- nothing is downloaded.

Splits are by protein (``group``): the two AdK states share one; peptides and real proteins are shuffled separately
so every split has both. :class:`ProteinSet` reads one split, optionally cropped into contiguous windows of
residues (within a chain) and with hydrogens added on load (``hydride``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from molecular.data import StructureError

from .build import secondary_structure_peptide
from .io import ProteinStructure, ReadOptions, read_protein, write_pdb

__all__ = [
    "DEFAULT_ROOT",
    "MDANALYSIS_PROTEINS",
    "mdanalysis_data_dir",
    "make_protein_set",
    "ProteinSet",
    "peptide_set",
    "protein_datamodule",
    "crop_windows",
]

DEFAULT_ROOT = "data/proteins"
# file in MDAnalysisTests/data -> (protein group, name)
MDANALYSIS_PROTEINS: dict[str, tuple[str, str]] = {
    "adk_open.pdb": ("adk", "adk_open"),
    "adk_closed.pdb": ("adk", "adk_closed"),
    "1hvr.pdb": ("1hvr", "1hvr"),
    "4E43.pdb": ("4e43", "4e43"),
    "cobrotoxin.pdb": ("cobrotoxin", "cobrotoxin"),
    "5a7u.pdb": ("5a7u", "5a7u"),
    "1a28.pdb.gz": ("1a28", "1a28"),
    "1osm.pdb.gz": ("1osm", "1osm"),
    "19hc.pdb.gz": ("19hc", "19hc"),
    "A6PA6_alpha.pdb": ("a6pa6", "a6pa6"),
    "nmr_neopetrosiamide.pdb": ("neopetrosiamide", "neopetrosiamide"),
    "1grm_single.pdb": ("1grm", "1grm"),
}


def mdanalysis_data_dir() -> Path | None:
    """``MDAnalysisTests/data`` when the package is installed (found without importing MDAnalysis)."""
    spec = importlib.util.find_spec("MDAnalysisTests")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if path.is_dir() else None


def _read_any(path: Path, options: ReadOptions) -> ProteinStructure:
    if path.suffix == ".gz":
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / path.name[: -len(".gz")]
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return read_protein(plain, options)
    return read_protein(path, options)


def make_protein_set(
    root: str | os.PathLike = DEFAULT_ROOT,
    num_peptides: int = 48,
    peptide_lengths: tuple[int, int] = (16, 40),
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    mdanalysis: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the protein set (heavy atoms, amino-acid residues only) and its manifest; returns the manifest.

    An existing manifest with the same settings is kept (the set is reproducible from ``seed``); files are written
    under temporary names and the manifest last, so an interrupted run never leaves a manifest without its files.
    """
    root = Path(root)
    settings = {
        "num_peptides": num_peptides,
        "peptide_lengths": list(peptide_lengths),
        "fractions": list(fractions),
        "seed": seed,
        "mdanalysis": bool(mdanalysis and mdanalysis_data_dir() is not None),
    }
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not overwrite:
        old = json.loads(manifest_path.read_text())
        if old.get("settings") == settings:
            return old
    (root / "pdb").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries: list[dict] = []
    opts = ReadOptions(hydrogens="drop", missing="drop", require="backbone")
    for k in range(num_peptides):
        length = int(rng.integers(peptide_lengths[0], peptide_lengths[1] + 1))
        pep, labels = secondary_structure_peptide(length, seed=seed * 100003 + k, id=f"peptide{k:03d}")
        entries.append({"protein": pep, "group": f"peptide{k:03d}", "source": "PeptideBuilder", "segments": labels})
    data_dir = mdanalysis_data_dir() if mdanalysis else None
    if data_dir is not None:
        for fname, (group, name) in MDANALYSIS_PROTEINS.items():
            if not (data_dir / fname).exists():
                continue
            p = _read_any(data_dir / fname, opts).amino_acids_only()
            p.id = name
            entries.append({"protein": p, "group": group, "source": f"MDAnalysisTests/{fname}"})
    # split by protein group, peptides and real proteins separately
    split_of: dict[str, str] = {}
    for kind in ("PeptideBuilder", "MDAnalysisTests"):
        groups = sorted({e["group"] for e in entries if e["source"].startswith(kind)})
        order = [groups[i] for i in rng.permutation(len(groups))]
        n_val = max(1, int(round(fractions[1] * len(order)))) if len(order) >= 3 else 0
        n_test = max(1, int(round(fractions[2] * len(order)))) if len(order) >= 3 else 0
        for i, g in enumerate(order):
            split_of[g] = "val" if i < n_val else ("test" if i < n_val + n_test else "train")
    records = []
    for e in entries:
        p: ProteinStructure = e["protein"]
        fname = f"pdb/{p.id}.pdb"
        tmp = root / (fname + ".tmp")
        write_pdb(p, tmp)
        os.replace(tmp, root / fname)
        rec = {
            "id": p.id,
            "file": fname,
            "source": e["source"],
            "group": e["group"],
            "split": split_of[e["group"]],
            "num_residues": p.num_residues,
            "num_atoms": len(p),
            "chains": sorted({str(c) for c in p.chain_ids}),
            "sequence": p.sequence,
        }
        if "segments" in e:
            rec["segments"] = e["segments"]
        records.append(rec)
    manifest = {"version": 1, "settings": settings, "proteins": records}
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return manifest


def crop_windows(protein: ProteinStructure, size: int, min_size: int = 8) -> list[ProteinStructure]:
    """Contiguous windows of ``size`` residues within each chain (the last one of a chain may be shorter, at least
    ``min_size``); ids get ``@start``."""
    chains = protein.residue_chains
    out = []
    start = 0
    while start < protein.num_residues:
        end = start
        while end < protein.num_residues and chains[end] == chains[start]:
            end += 1
        for a in range(start, end, size):
            b = min(end, a + size)
            if b - a >= min_size:
                out.append(protein.select_residues(np.arange(a, b), id=f"{protein.id}@{a}"))
        start = end
    return out


class ProteinSet(torch.utils.data.Dataset):
    """One split of the protein set (or any list of proteins): items are :class:`ProteinStructure` s.

    Args:
        root: the directory :func:`make_protein_set` wrote (``manifest.json``); ignored when ``proteins`` is given.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        sources: keep only entries whose source starts with one of these (``["PeptideBuilder"]``).
        crop: cut proteins into windows of this many residues (``None``: whole proteins).
        max_items: keep the first ``max_items`` items.
        hydrogens: ``"drop"`` (the stored heavy atoms) or ``"add"`` (hydride, on load).
        r_max: radius graph of the collated batches (``None``: none).
        proteins: use these instead of reading ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike = DEFAULT_ROOT,
        split: str = "train",
        sources: Sequence[str] | None = None,
        crop: int | None = None,
        max_items: int | None = None,
        hydrogens: str = "drop",
        r_max: float | None = None,
        proteins: Sequence[ProteinStructure] | None = None,
    ):
        self.split, self.crop, self.r_max, self.hydrogens = split, crop, r_max, hydrogens
        if proteins is None:
            root = Path(root)
            manifest_path = root / "manifest.json"
            if not manifest_path.exists():
                raise FileNotFoundError(
                    f"{manifest_path} not found: make the protein set first with "
                    f"`.venv/bin/python scripts/make_protein_data.py --root {root}`"
                )
            manifest = json.loads(manifest_path.read_text())
            self.records = [
                r
                for r in manifest["proteins"]
                if (split == "all" or r["split"] == split)
                and (sources is None or any(r["source"].startswith(s) for s in sources))
            ]
            opts = ReadOptions(hydrogens="add" if hydrogens == "add" else "drop", missing="keep")
            loaded = []
            for r in self.records:
                p = read_protein(root / r["file"], opts)
                p.id = r["id"]
                loaded.append(p)
        else:
            loaded = list(proteins)
            self.records = [{"id": p.id, "split": split, "source": "given"} for p in loaded]
        if not loaded:
            raise StructureError(f"protein set split {split!r} (sources {sources}) is empty; check the manifest")
        items: list[ProteinStructure] = []
        for p in loaded:
            items.extend(crop_windows(p, crop) if crop else [p])
        self.items = items[:max_items] if max_items else items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> ProteinStructure:
        return self.items[i]

    def collate(self, items: Sequence[ProteinStructure]):
        from .residues import collate_proteins

        return collate_proteins(items, self.r_max)

    def token_groups(self, i: int) -> torch.Tensor:
        """Residue types of item ``i`` (the per-residue analogue of elements, for ``unirep-converge`` levels)."""
        return torch.as_tensor(self.items[i].residue_types)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for p in self.items:
            h.update(p.id.encode())
            h.update(np.ascontiguousarray(p.positions, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]


def peptide_set(
    num: int = 8, lengths: tuple[int, int] = (12, 20), seed: int = 0, crop: int | None = None, r_max=None
) -> ProteinSet:
    """A protein set of ``num`` secondary-structure peptides built in memory (tests, smoke runs)."""
    rng = np.random.default_rng(seed)
    peptides = [
        secondary_structure_peptide(int(rng.integers(lengths[0], lengths[1] + 1)), seed * 1000 + k, id=f"pep{k}")[0]
        for k in range(num)
    ]
    return ProteinSet(proteins=peptides, split="given", crop=crop, r_max=r_max)


def protein_datamodule(
    root: str | None = DEFAULT_ROOT,
    sources: Sequence[str] | None = None,
    crop: int | None = 32,
    max_train: int | None = None,
    max_val: int | None = 32,
    num_peptides: int = 0,
    peptide_lengths: tuple[int, int] = (12, 24),
    seed: int = 0,
):
    """A ``unirep.train.DataModule`` of proteins: the protein set's train and val splits (``root``), or, with
    ``root=None``, ``num_peptides`` in-memory peptides split 80/20 by peptide (smoke runs need no files)."""
    from unirep.train import DataModule

    if root is None:
        if num_peptides < 2:
            raise ValueError("protein_datamodule(root=None) needs num_peptides >= 2 to split by peptide")
        full = peptide_set(num_peptides, tuple(peptide_lengths), seed, crop)
        n_val = max(1, num_peptides // 5)
        names = sorted({p.id.split("@")[0] for p in full.items})
        val_names = set(names[:n_val])
        train = ProteinSet(proteins=[p for p in full.items if p.id.split("@")[0] not in val_names], split="train")
        val = ProteinSet(proteins=[p for p in full.items if p.id.split("@")[0] in val_names], split="val")
    else:
        train = ProteinSet(root, "train", sources, crop, max_train)
        val = ProteinSet(root, "val", sources, crop, max_val)
    info = {"num_train": len(train), "num_val": len(val)}
    return DataModule(train=train, val=val, collate_fn=train.collate, info=info)
