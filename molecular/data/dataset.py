"""The atomistic data set: structures as neighbour graphs (once, in memory), an on-disk cache of the processed
graphs (safetensors + JSON, no pickles), seeded splits, and the train/validation split of a labelled file.

A data set larger than RAM is a shard directory (:mod:`molecular.data.shards`): :func:`load_dataset` opens a
directory as a :class:`~molecular.data.shards.ShardedAtomsDataset`, read lazily item by item."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from unirep.splits import split_indices

from .graphs import AtomicGraph, GraphBatch, collate_graphs
from .readers import read_biomolecule, read_sdf, read_structures
from .structure import Structure, StructureError, stem, validate_structures

__all__ = ["AtomsDataset", "load_dataset", "split_indices", "train_val_split"]


class AtomsDataset(torch.utils.data.Dataset):
    """Structures turned into neighbour graphs once (in memory).

    Args:
        structures: the structures (validated here).
        r_max: neighbour cutoff in Å (the model's ``r_max``).
        z_table: the model's elements; unknown elements raise a :class:`StructureError`.
        require_labels: training sets need energies and forces.
    """

    def __init__(
        self,
        structures: Sequence[Structure],
        r_max: float,
        z_table: Sequence[int] | None = None,
        require_labels: bool = True,
        name: str = "data set",
    ):
        structures = list(structures)
        for k, s in enumerate(structures):
            if not s.id:
                structures[k] = replace(s, id=f"{name}/{k}")
        validate_structures(structures, z_table=z_table, require_labels=require_labels, name=name)
        self.structures = structures
        self.r_max = float(r_max)
        self.graphs = [AtomicGraph.from_structure(s, self.r_max) for s in structures]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> AtomicGraph:
        return self.graphs[i]

    def subset(self, indices: Sequence[int]) -> AtomsDataset:
        out = object.__new__(AtomsDataset)
        out.structures = [self.structures[i] for i in indices]
        out.graphs = [self.graphs[i] for i in indices]
        out.r_max = self.r_max
        return out

    def batch(self, indices: Sequence[int] | None = None) -> GraphBatch:
        idx = range(len(self)) if indices is None else indices
        return collate_graphs([self.graphs[i] for i in idx])

    # -- on-disk cache -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the processed graphs as safetensors + JSON (no pickles), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        b = collate_graphs(self.graphs)
        tensors = {
            "numbers": b.numbers,
            "positions": b.positions,
            "edge_index": b.edge_index.contiguous(),
            "unit_shifts": b.unit_shifts,
            "cell": b.cell,
            "ptr": b.ptr,
            "edge_ptr": torch.tensor([0] + np.cumsum([g.edge_index.shape[1] for g in self.graphs]).tolist()),
        }
        if b.energy is not None:
            tensors["energy"], tensors["forces"] = b.energy, b.forces
        meta = {
            "r_max": self.r_max,
            "ids": [s.id for s in self.structures],
            "sources": [s.source for s in self.structures],
            "pbc": [list(s.pbc) for s in self.structures],
            "labelled": [s.energy is not None for s in self.structures],
        }
        tmp = path / f"graphs.safetensors.{os.getpid()}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, path / "graphs.safetensors")
        tmpj = path / f"meta.json.{os.getpid()}.tmp"
        tmpj.write_text(json.dumps(meta))
        os.replace(tmpj, path / "meta.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AtomsDataset:
        from safetensors.torch import load_file

        path = Path(path)
        t = load_file(str(path / "graphs.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        ptr, eptr = t["ptr"].tolist(), t["edge_ptr"].tolist()
        out = object.__new__(cls)
        out.r_max = float(meta["r_max"])
        out.structures, out.graphs = [], []
        for k, item_id in enumerate(meta["ids"]):
            a, b, ea, eb = ptr[k], ptr[k + 1], eptr[k], eptr[k + 1]
            e = t["energy"][k] if "energy" in t and meta["labelled"][k] else None
            f = t["forces"][a:b] if e is not None else None
            g = AtomicGraph(
                t["numbers"][a:b],
                t["positions"][a:b],
                t["edge_index"][:, ea:eb] - a,
                t["unit_shifts"][ea:eb],
                t["cell"][k],
                torch.tensor(meta["pbc"][k]),
                e,
                f,
                item_id,
            )
            out.graphs.append(g)
            out.structures.append(
                Structure(
                    g.numbers.numpy(),
                    g.positions.numpy(),
                    None if e is None else float(e),
                    None if f is None else f.numpy(),
                    g.cell.numpy(),
                    tuple(meta["pbc"][k]),
                    item_id,
                    meta["sources"][k],
                )
            )
        return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_dataset(
    path: str | os.PathLike,
    r_max: float,
    z_table: Sequence[int] | None = None,
    require_labels: bool = True,
    cache_dir: str | os.PathLike | None = None,
    reader: Callable[[Path], list[Structure]] | None = None,
) -> AtomsDataset:
    """Read a file into an :class:`AtomsDataset`, through an on-disk cache keyed by the file's content and
    ``r_max`` (a data set is processed once). A directory is a shard directory
    (:class:`~molecular.data.shards.ShardedAtomsDataset`): nothing is loaded up front and ``cache_dir`` is unused."""
    path = Path(path)
    if not path.exists():
        raise StructureError(f"{path}: data file not found; run scripts/make_molecular_data.py or fix the path")
    if path.is_dir():
        from .shards import ShardedAtomsDataset

        return ShardedAtomsDataset(path, r_max=r_max, z_table=z_table, require_labels=require_labels)
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{_file_digest(path)}|{float(r_max)}|{getattr(reader, '__name__', '')}".encode())
        cache = Path(cache_dir) / f"{stem(path)}-{key.hexdigest()[:12]}"
        if (cache / "meta.json").exists() and (cache / "graphs.safetensors").exists():
            ds = AtomsDataset.load(cache)
            validate_structures(
                ds.structures, z_table=z_table, require_labels=require_labels, min_distance=0, name=str(path)
            )
            return ds
    if reader is None:
        suffix = path.suffix.lower()
        if suffix in (".sdf", ".mol"):
            reader = read_sdf
        elif suffix in (".pdb", ".cif", ".bcif", ".mmcif"):
            reader = read_biomolecule
        else:
            reader = read_structures
    ds = AtomsDataset(reader(path), r_max=r_max, z_table=z_table, require_labels=require_labels, name=str(path))
    if cache is not None:
        ds.save(cache)
    return ds


def train_val_split(
    train: str | os.PathLike,
    val: str | os.PathLike | None = None,
    r_max: float = 5.0,
    z_table: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[AtomsDataset, AtomsDataset]:
    """The training and validation sets of labelled files: ``val``'s structures, or without ``val`` a seeded split
    of ``train`` (``n_val`` or ``val_fraction`` of it, at least one); ``n_train`` keeps a seeded subset of the
    training structures (learning curves)."""
    ds = load_dataset(train, r_max=r_max, z_table=z_table, require_labels=True, cache_dir=cache_dir)
    if val is not None:
        val_ds = load_dataset(val, r_max=r_max, z_table=z_table, require_labels=True, cache_dir=cache_dir)
        train_idx = list(range(len(ds)))
    else:
        n_v = n_val if n_val is not None else max(1, int(round(val_fraction * len(ds))))
        val_idx, train_idx = split_indices(len(ds), sizes=[n_v, len(ds) - n_v], seed=seed)
        val_ds = ds.subset(val_idx)
    if n_train is not None:
        if n_train > len(train_idx):
            raise StructureError(f"{train}: n_train={n_train} but only {len(train_idx)} training structures remain")
        keep = split_indices(len(train_idx), sizes=[n_train], seed=seed + 1)[0]
        train_idx = [train_idx[i] for i in keep]
    return ds.subset(train_idx), val_ds
