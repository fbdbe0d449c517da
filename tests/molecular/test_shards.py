"""The sharded on-disk data set: it streams exactly the extxyz structures, dispatches from load_dataset, refuses
bad input by name, survives pickling into DataLoader workers, and trains through the `mace` recipe with fewer
items resident than the data set holds."""

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from molecular.data import (
    ShardedAtomsDataset,
    StructureError,
    collate_graphs,
    convert_to_shards,
    load_dataset,
    read_structures,
    train_val_split,
    write_extxyz,
)
from molecular.data.shards import is_shard_dir

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "molecular_sample"


def _big_file(tmp_path: Path, copies: int) -> Path:
    """The committed ethanol sample, ``copies`` times over with jittered positions and new ids."""
    base = read_structures(SAMPLE / "md_ethanol.extxyz")
    rng = np.random.default_rng(0)
    out = [
        replace(s, positions=s.positions + rng.normal(0, 0.002, s.positions.shape), id=f"big/{c}/{k}")
        for c in range(copies)
        for k, s in enumerate(base)
    ]
    return write_extxyz(out, tmp_path / "big.extxyz")


def test_streamed_dataset_yields_exactly_the_extxyz_structures(tmp_path):
    files = [SAMPLE / "md_ethanol.extxyz", SAMPLE / "broad.extxyz"]
    ref = [s for f in files for s in read_structures(f)]
    out = convert_to_shards(files, tmp_path / "sh", shard_size=7, progress=False)
    assert is_shard_dir(out) and len(list(out.glob("shard-*.safetensors"))) == -(-len(ref) // 7)
    ds = ShardedAtomsDataset(out, r_max=5.0)
    assert len(ds) == len(ref)
    for k, s in enumerate(ref):
        t = ds.structure(k)
        assert t.id == s.id and t.source == s.source and t.pbc == s.pbc
        np.testing.assert_array_equal(t.numbers, s.numbers)
        np.testing.assert_array_equal(t.positions, s.positions)  # bit for bit: float64 stored as is
        np.testing.assert_array_equal(t.forces, s.forces)
        np.testing.assert_array_equal(t.cell, s.cell)
        assert t.energy == s.energy
    # graphs equal the in-memory data set's
    mem = load_dataset(files[0], r_max=5.0)
    for k in (0, 5, len(mem) - 1):
        a, b = mem[k], ds[k]
        assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.forces, b.forces) and a.id == b.id


def test_load_dataset_dispatches_on_a_directory_and_splits(tmp_path):
    out = convert_to_shards(SAMPLE / "md_ethanol.extxyz", tmp_path / "sh", shard_size=10, progress=False)
    ds = load_dataset(out, r_max=5.0, z_table=[1, 6, 8])
    assert isinstance(ds, ShardedAtomsDataset) and len(ds) == 48
    tr, va = train_val_split(out, r_max=5.0, n_val=8, n_train=20, seed=3)
    tr_mem, va_mem = train_val_split(SAMPLE / "md_ethanol.extxyz", r_max=5.0, n_val=8, n_train=20, seed=3)
    assert [s.id for s in tr.structures] == [s.id for s in tr_mem.structures]
    assert [g.id for g in va.graphs] == [g.id for g in va_mem.graphs]
    b = tr.batch()
    assert b.energy.shape == (20,) and torch.equal(b.forces, collate_graphs(list(tr_mem.graphs)).forces)


def test_bad_input_is_refused_by_name(tmp_path):
    out = convert_to_shards(SAMPLE / "md_ethanol.extxyz", tmp_path / "sh", progress=False)
    with pytest.raises(StructureError, match=r"elements \[8\].*z_table"):
        ShardedAtomsDataset(out, r_max=5.0, z_table=[1, 6])
    (out / "index.json").unlink()  # as an interrupted conversion leaves it
    with pytest.raises(StructureError, match="no index.json"):
        load_dataset(out, r_max=5.0)
    s = read_structures(SAMPLE / "md_ethanol.extxyz")[:3]
    s[1] = replace(s[1], positions=np.full_like(s[1].positions, np.nan))
    write_extxyz(s, tmp_path / "nan.extxyz")
    with pytest.raises(StructureError, match="nan"):
        convert_to_shards(tmp_path / "nan.extxyz", tmp_path / "sh2", progress=False)
    assert not is_shard_dir(tmp_path / "sh2")


def test_pickled_into_a_worker_reopens_its_files(tmp_path):
    out = convert_to_shards(SAMPLE / "md_ethanol.extxyz", tmp_path / "sh", shard_size=16, progress=False)
    ds = ShardedAtomsDataset(out, r_max=5.0, cache_items=4)
    _ = [ds[k] for k in range(10)]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.resident_items == 0 and not clone._handles  # no open files or cached graphs travel
    assert torch.equal(clone[9].positions, ds[9].positions)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate_graphs)
    assert sum(b.num_graphs if hasattr(b, "num_graphs") else len(b.ptr) - 1 for b in loader) == 48


def test_trains_from_a_set_larger_than_its_memory_budget(tmp_path, monkeypatch):
    from unirep.cli import compose, run_train

    monkeypatch.chdir(ROOT)
    budget = 16  # graphs resident per process
    src = _big_file(tmp_path, copies=5)  # 240 items
    out = convert_to_shards(src, tmp_path / "big.shards", shard_size=50, progress=False)
    peak = {"resident": 0, "items": 0, "reads": 0}
    orig_init, orig_get = ShardedAtomsDataset.__init__, ShardedAtomsDataset.__getitem__

    def init(self, *a, **kw):
        orig_init(self, *a, **{**kw, "cache_items": budget})

    def getitem(self, i):
        g = orig_get(self, i)
        peak["resident"] = max(peak["resident"], self.resident_items)
        peak["items"] = max(peak["items"], len(self))
        peak["reads"] += 1
        return g

    monkeypatch.setattr(ShardedAtomsDataset, "__init__", init)
    monkeypatch.setattr(ShardedAtomsDataset, "__getitem__", getitem)
    base = compose("train", ["experiment=molecular/mace"])
    cfg = compose(
        "train",
        [
            "experiment=molecular/mace",
            *base.smoke,
            f"data.train={out}",
            "data.n_val=20",
            "trainer.max_steps=4",
            f"out_dir={tmp_path / 'run'}",
        ],
    )
    result = run_train(cfg)
    assert peak["items"] > 10 * budget  # the training set is far larger than what may be resident
    assert 0 < peak["resident"] <= budget
    assert peak["reads"] > 0 and np.isfinite(result["eval"]["val/f_mae_meV_A"])
