"""Data sets larger than RAM: structures in safetensors shards plus a JSON index, read lazily per item.

Layout of a shard directory::

    index.json                  format, version, item/atom counts, elements, labelled, the shards in order
    shard-00000.safetensors     numbers [A] · positions [A, 3] · forces [A, 3] · energy [n] · labelled [n]
    shard-00001.safetensors     atom_ptr [n + 1] · cell [n, 3, 3] · pbc [n, 3]; ids and sources in its metadata

Why safetensors shards and not HDF5 or LMDB:

- no new dependency (safetensors is already one of the project's) and no pickles anywhere (DESIGN: loading never
  unpickles); the reader is pure Python over a documented header;
- memory-mapped, lazy reads: ``safe_open(...).get_slice(name)[a:b]`` reads only the bytes of one item, so a process
  holds the headers and the items it is using, never a shard; the OS page cache is shared between workers;
- atomic writes: each shard is written to a temporary name and renamed, and ``index.json`` is written last, so an
  interrupted conversion never leaves a directory that looks complete (a rerun redoes it);
- immutable files read by many processes: ``DataLoader`` workers open their own handles on first use (handles are
  per process id, never pickled), with none of HDF5's fork-safety rules or LMDB's ``map_size`` and lock files.

Raw structures are stored, not neighbour graphs, so one shard directory serves any ``r_max``; the graph of an item
is built when it is read (a 20-atom molecule takes well under a millisecond) and an LRU keeps at most ``cache_items``
graphs per process, which bounds the memory a data set costs whatever its size.

    python -m molecular.data.shards convert data/molecular/qm9_nm.extxyz data/molecular/qm9_nm.shards
    python -m molecular.data.shards info data/molecular/qm9_nm.shards
    unirep-train experiment=molecular/mace data.train=data/molecular/qm9_nm.shards   # load_dataset dispatches
"""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .dataset import AtomsDataset
from .graphs import AtomicGraph, GraphBatch, collate_graphs
from .structure import Structure, StructureError, validate_structures

__all__ = ["ShardedAtomsDataset", "convert_to_shards", "write_shards", "is_shard_dir", "FORMAT"]

FORMAT = "unirep-atoms-shards"
VERSION = 1


def is_shard_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete shard directory (its ``index.json`` is written last)."""
    return (Path(path) / "index.json").is_file()


def _write_shard(structures: Sequence[Structure], path: Path) -> dict:
    from safetensors.numpy import save_file

    counts = np.array([len(s) for s in structures], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    labelled = np.array([s.energy is not None and s.forces is not None for s in structures])
    a = int(ptr[-1])
    forces = np.zeros((a, 3))
    for k, s in enumerate(structures):
        if labelled[k]:
            forces[ptr[k] : ptr[k + 1]] = s.forces
    tensors = {
        "numbers": np.concatenate([s.numbers for s in structures]).astype(np.int64),
        "positions": np.concatenate([s.positions for s in structures]).astype(np.float64),
        "forces": forces,
        "energy": np.array([s.energy if labelled[k] else np.nan for k, s in enumerate(structures)]),
        "labelled": labelled.astype(np.uint8),
        "atom_ptr": ptr,
        "cell": np.stack([s.cell for s in structures]).astype(np.float64),
        "pbc": np.array([s.pbc for s in structures], dtype=np.uint8),
    }
    meta = {"ids": json.dumps([s.id for s in structures]), "sources": json.dumps([s.source for s in structures])}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # a half-written shard never takes a finished one's name
    return {
        "file": path.name,
        "n_items": len(structures),
        "n_atoms": a,
        "labelled": bool(labelled.all()),
        "elements": sorted({int(z) for s in structures for z in s.numbers}),
    }


def write_shards(
    structures: Iterable[Structure],
    out_dir: str | os.PathLike,
    shard_size: int = 10000,
    source: str = "",
    progress: bool = False,
    total: int | None = None,
) -> Path:
    """Write ``structures`` (any iterable, consumed once: it can stream a file larger than RAM) as shards of
    ``shard_size`` items under ``out_dir``; each chunk is validated (NaN, overlapping atoms, duplicate ids within
    a shard) before it is written. Any earlier ``index.json`` is removed first and written again at the end."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    shards: list[dict] = []
    buf: list[Structure] = []
    seen: set[str] = set()
    bar = tqdm(total=total, desc=f"sharding {out.name}", unit="item", disable=not progress, mininterval=2.0)

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        validate_structures(buf, require_labels=False, name=f"{source or out}[{name}]")
        shards.append(_write_shard(buf, out / name))
        buf.clear()

    for k, s in enumerate(structures):
        if not s.id:
            s = Structure(s.numbers, s.positions, s.energy, s.forces, s.cell, s.pbc, f"{out.name}/{k}", s.source)
        if s.id in seen:
            raise StructureError(f"{s.source or source}: duplicate id {s.id!r}; ids must be unique in a data set")
        seen.add(s.id)
        buf.append(s)
        bar.update(1)
        if len(buf) >= shard_size:
            flush()
    if buf:
        flush()
    bar.close()
    if not shards:
        raise StructureError(f"{source or out}: no structures to shard")
    for stale in out.glob("shard-*.safetensors"):  # shards of an earlier, longer conversion
        if int(stale.stem.split("-")[1]) >= len(shards):
            stale.unlink()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(source),
        "n_items": sum(s["n_items"] for s in shards),
        "n_atoms": sum(s["n_atoms"] for s in shards),
        "labelled": all(s["labelled"] for s in shards),
        "elements": sorted({z for s in shards for z in s["elements"]}),
        "units": "Angstrom, eV, eV/Angstrom",
        "shards": shards,
    }
    tmp = out / f"index.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    return out


def _iter_file(path: Path, energy_key: str = "energy", forces_key: str = "forces") -> Iterator[Structure]:
    """Stream the structures of a file ASE can read, one at a time (``ase.io.iread``)."""
    import ase.io

    from .structure import stem

    for k, atoms in enumerate(ase.io.iread(str(path), index=":")):
        yield Structure.from_atoms(
            atoms, id=f"{stem(path)}/{k}", source=f"{path}:{k}", energy_key=energy_key, forces_key=forces_key
        )


def convert_to_shards(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    shard_size: int = 10000,
    progress: bool = True,
) -> Path:
    """Convert extxyz (or any ASE-readable) files into a shard directory, streaming, with a progress bar."""
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise StructureError(f"{p}: file not found")

    def stream() -> Iterator[Structure]:
        for p in paths:
            yield from _iter_file(p)

    return write_shards(stream(), out_dir, shard_size, source=",".join(map(str, paths)), progress=progress)


class _LazySeq(Sequence):
    """A read-only sequence whose items are made on access (``dataset.structures`` / ``dataset.graphs``)."""

    def __init__(self, n: int, get):
        self._n, self._get = n, get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(k) for k in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._get(i)


class ShardedAtomsDataset(AtomsDataset):
    """An :class:`AtomsDataset` read lazily from a shard directory (see the module docstring).

    Items are neighbour graphs built on access; at most ``cache_items`` of them stay resident per process (an LRU),
    so memory does not grow with the data set. ``structures`` and ``graphs`` are lazy sequences, so code written
    for the in-memory set (statistics, evaluation) streams through this one unchanged. File handles are opened
    per process on first use, so the data set can be handed to ``DataLoader`` workers.

    Args:
        path: the shard directory (``index.json`` + shards).
        r_max: neighbour cutoff in Å.
        z_table: the model's elements; a data set with other elements stops with a message naming them.
        require_labels: training sets need energies and forces on every item.
        cache_items: graphs kept per process (0: none).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        r_max: float,
        z_table: Sequence[int] | None = None,
        require_labels: bool = True,
        cache_items: int = 1024,
        indices: Sequence[int] | None = None,
    ):
        self.path = Path(path)
        if not is_shard_dir(self.path):
            raise StructureError(
                f"{self.path}: not a shard directory (no index.json; an interrupted conversion?): "
                "run python -m molecular.data.shards convert <file.extxyz> <dir>"
            )
        self.index = json.loads((self.path / "index.json").read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise StructureError(f"{self.path}/index.json: not a {FORMAT} v{VERSION} index")
        if z_table is not None:
            unknown = sorted(set(self.index["elements"]) - {int(z) for z in z_table})
            if unknown:
                raise StructureError(
                    f"{self.path}: elements {unknown} are not in the model's z_table {list(z_table)}; "
                    "add them to data.z_table (and the model's) or filter the data"
                )
        if require_labels and not self.index["labelled"]:
            raise StructureError(f"{self.path}: some items have no energy/forces; a training set needs labels")
        self.r_max = float(r_max)
        self.cache_items = int(cache_items)
        sizes = [s["n_items"] for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n = int(self._starts[-1])
        self._indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self._indices) and (self._indices.min() < 0 or self._indices.max() >= n):
            raise IndexError(f"{self.path}: indices out of range 0..{n - 1}")
        self._handles: dict = {}
        self._pid = -1
        self._lru: OrderedDict[int, AtomicGraph] = OrderedDict()
        self.reads = 0  # items read from disk in this process (tests and benchmarks)

    # -- per-process state ----------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"], state["_lru"] = {}, -1, OrderedDict()
        return state

    def _shard(self, k: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked or spawned worker: never share an open file
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(k)
        if h is None:
            f = safe_open(str(self.path / self.index["shards"][k]["file"]), framework="pt")
            meta = f.metadata()
            ptr = f.get_slice("atom_ptr")[:].tolist()
            h = self._handles[k] = (f, ptr, json.loads(meta["ids"]), json.loads(meta["sources"]))
        return h

    # -- items ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._indices)

    @property
    def resident_items(self) -> int:
        """Graphs held in memory now (the LRU's size)."""
        return len(self._lru)

    def structure(self, i: int) -> Structure:
        """Item ``i`` as a :class:`Structure`, read from its shard."""
        g = int(self._indices[i])
        k = int(np.searchsorted(self._starts, g, side="right") - 1)
        j = g - int(self._starts[k])
        f, ptr, ids, sources = self._shard(k)
        a, b = ptr[j], ptr[j + 1]
        self.reads += 1
        labelled = bool(f.get_slice("labelled")[j : j + 1][0])
        return Structure(
            f.get_slice("numbers")[a:b].numpy(),
            f.get_slice("positions")[a:b].numpy(),
            float(f.get_slice("energy")[j : j + 1][0]) if labelled else None,
            f.get_slice("forces")[a:b].numpy() if labelled else None,
            f.get_slice("cell")[j : j + 1][0].numpy(),
            tuple(bool(v) for v in f.get_slice("pbc")[j : j + 1][0].tolist()),
            ids[j],
            sources[j],
        )

    def __getitem__(self, i: int) -> AtomicGraph:
        i = int(i)
        if i < 0:
            i += len(self)
        g = self._lru.get(i)
        if g is not None:
            self._lru.move_to_end(i)
            return g
        g = AtomicGraph.from_structure(self.structure(i), self.r_max)
        if self.cache_items > 0:
            self._lru[i] = g
            if len(self._lru) > self.cache_items:
                self._lru.popitem(last=False)
        return g

    @property
    def structures(self) -> Sequence[Structure]:
        return _LazySeq(len(self), self.structure)

    @property
    def graphs(self) -> Sequence[AtomicGraph]:
        return _LazySeq(len(self), self.__getitem__)

    def subset(self, indices: Sequence[int]) -> ShardedAtomsDataset:
        out = object.__new__(ShardedAtomsDataset)
        out.__dict__.update(self.__getstate__())
        out._indices = self._indices[np.asarray(list(indices), dtype=np.int64)]
        out.reads = 0
        return out

    def batch(self, indices: Sequence[int] | None = None) -> GraphBatch:
        idx = range(len(self)) if indices is None else indices
        return collate_graphs([self[i] for i in idx])

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardedAtomsDataset:  # AtomsDataset.load's counterpart
        raise TypeError("a shard directory is opened with ShardedAtomsDataset(path, r_max) or load_dataset(path)")

    def __repr__(self) -> str:
        return (
            f"ShardedAtomsDataset({self.path}, items={len(self)}, r_max={self.r_max}, cache_items={self.cache_items})"
        )


def _main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m molecular.data.shards", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="extxyz (or any ASE-readable) files -> a shard directory")
    c.add_argument("inputs", nargs="+", help="input files, then the output directory last")
    c.add_argument("--shard-size", type=int, default=10000, help="items per shard")
    i = sub.add_parser("info", help="print a shard directory's index")
    i.add_argument("path")
    a = p.parse_args(argv)
    if a.cmd == "convert":
        if len(a.inputs) < 2:
            p.error("convert needs at least one input file and the output directory")
        out = convert_to_shards(a.inputs[:-1], a.inputs[-1], shard_size=a.shard_size, progress=True)
        index = json.loads((out / "index.json").read_text())
        print(f"{out}: {index['n_items']} items, {index['n_atoms']} atoms in {len(index['shards'])} shards")
    else:
        index = json.loads((Path(a.path) / "index.json").read_text())
        print(json.dumps({k: v for k, v in index.items() if k != "shards"}, indent=1))
        print(f"shards: {len(index['shards'])}")


if __name__ == "__main__":
    _main()
