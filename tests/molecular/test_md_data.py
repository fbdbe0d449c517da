"""Data-set making: a resumed MD is the uninterrupted trajectory, resumable labelling, MMFF normal modes for the
QM9 foundation set, and the data-set script's set flags. MMFF94 stands in for GFN2-xTB (speed)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molecular.data import MMFFCalculator, label_structures, langevin_md, read_structures, structures_from_smiles
from molecular.data.labelling import label_to_file
from molecular.data.sampling import _fd_hessian, _sample_modes, mmff_hessian

ROOT = Path(__file__).resolve().parents[2]


class _Dies(MMFFCalculator):
    """MMFF94 that stops the process (an exception) after ``n`` calls, as a killed job would."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def calculate(self, *a, **kw):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        super().calculate(*a, **kw)


def _ethanol():
    return structures_from_smiles(["CCO"], num_confs=1, seed=0, names=["ethanol"])[0]


def test_resumed_md_is_the_uninterrupted_trajectory(tmp_path):
    start = _ethanol()
    kw = dict(temperature=400.0, interval=5, seed=3, equilibration_steps=7, checkpoint_every=2)
    ref = langevin_md(start, 8, calculator=MMFFCalculator(), **kw)
    ck = tmp_path / "md.npz"
    with pytest.raises(KeyboardInterrupt):
        langevin_md(start, 8, calculator=_Dies(40), checkpoint=ck, **kw)
    assert ck.exists() and 0 < int(np.load(ck)["done"]) < 8
    out = langevin_md(start, 8, calculator=MMFFCalculator(), checkpoint=ck, **kw)
    for a, b in zip(ref, out, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-10)
        assert a.energy == pytest.approx(b.energy, abs=1e-10) and a.id == b.id
    with pytest.raises(ValueError, match="other settings"):
        langevin_md(start, 8, calculator=MMFFCalculator(), checkpoint=ck, **{**kw, "seed": 4})


def test_label_to_file_resumes_from_finished_chunks(tmp_path):
    frames = langevin_md(_ethanol(), 7, calculator="mmff", interval=3, seed=0)
    unlabelled = [s.__class__(s.numbers, s.positions, id=s.id, source=s.source) for s in frames]
    path = tmp_path / "set.extxyz"
    with pytest.raises(KeyboardInterrupt):
        label_to_file(unlabelled, path, calculator=_Dies(5), chunk_size=3, progress=False)
    parts = sorted((tmp_path / "set.extxyz.parts").glob("part*.extxyz"))
    assert [p.name for p in parts] == ["part00000.extxyz"] and not path.exists()
    label_to_file(unlabelled, path, calculator=MMFFCalculator(), chunk_size=3, progress=False)
    got = read_structures(path)
    assert [s.id for s in got] == [s.id for s in frames] and not (tmp_path / "set.extxyz.parts").exists()
    for a, b in zip(got, frames, strict=True):
        assert a.energy == pytest.approx(b.energy, abs=1e-6)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-6)


def test_label_structures_skips_failures_when_asked():
    class Fails(MMFFCalculator):  # an SCF that does not converge on the second structure
        def calculate(self, atoms=None, *a, **kw):
            if atoms is not None and atoms.positions[0, 0] > 50:
                raise RuntimeError("SCF not converged")
            super().calculate(atoms, *a, **kw)

    s = _ethanol()
    far = s.__class__(s.numbers, s.positions + 100.0, id="far")
    with pytest.raises(Exception, match="far: labelling failed"):
        label_structures([s, far], Fails())
    assert [t.id for t in label_structures([s, far, s], Fails(), skip_failed=True)] == [s.id, s.id]


def test_mmff_hessian_matches_finite_differences_and_modes_keep_bonds():
    s = _ethanol()
    h = mmff_hessian(s)
    ref = _fd_hessian(s, MMFFCalculator(), delta=0.005)
    np.testing.assert_allclose(h, ref, atol=2e-3 * np.abs(ref).max())
    out = _sample_modes(s, h, [300.0, 600.0, 600.0], np.random.default_rng(0), prefix="eth", check_bonds=True)
    assert len(out) == 3 and len({o.id for o in out}) == 3
    rms = [np.sqrt(((o.positions - s.positions) ** 2).mean()) for o in out]
    assert all(0.01 < r < 0.3 for r in rms)


def test_qm9_normal_mode_structures():
    pytest.importorskip("qm9pack")
    from molecular.data.sampling import qm9_normal_mode_structures

    out = qm9_normal_mode_structures(4, temperatures=(300.0, 600.0), seed=0, progress=False)
    assert 6 <= len(out) <= 8 and len({s.id for s in out}) == len(out)
    assert all(s.id.startswith("qm9/") and s.energy is None for s in out)


def test_make_molecular_data_sets_flag(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "make_molecular_data.py"), "--out", str(tmp_path)]
    cmd += ["--sets", "aspirin", "--frames", "3", "--interval", "2", "--calculator", "mmff"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    frames = read_structures(tmp_path / "md_aspirin.extxyz")
    assert len(frames) == 3 and all(f.has_labels for f in frames)
    entry = json.loads((tmp_path / "manifest.json").read_text())["sets"]["md_aspirin"]
    assert entry["md"]["stride_fs"] == 1.0 and entry["md"]["temperature_K"] == 500.0
    assert not list(tmp_path.glob("*.npz"))  # the MD checkpoint is removed once the file is written


def test_ensure_md_set_at_several_temperatures_joins_them(tmp_path):
    from molecular.data import ensure_md_set

    path = ensure_md_set(
        tmp_path / "md_ethanol.extxyz", "ethanol", frames=2, interval=2, temperature=[300.0, 500.0], calculator="mmff"
    )
    frames = read_structures(path)
    assert len(frames) == 4 and len({f.id for f in frames}) == 4
    assert (tmp_path / "md_ethanol_300K.extxyz").exists() and (tmp_path / "md_ethanol_500K.extxyz").exists()
    assert [f.id.split("/")[0] for f in frames] == ["ethanol_300K_s0"] * 2 + ["ethanol_500K_s1"] * 2


def test_split_by_molecule_holds_out_whole_molecules(tmp_path):
    from molecular.data import Structure, write_extxyz
    from molecular.data.sampling import split_by_molecule

    s = _ethanol()
    frames = [
        Structure(
            s.numbers, s.positions + 0.01 * k, energy=-1.0, forces=np.zeros_like(s.positions), id=f"qm9/{m}/nm{k}"
        )
        for m in range(10)
        for k in range(2)
    ]
    write_extxyz(frames, tmp_path / "all.extxyz")
    tr, va = split_by_molecule(tmp_path / "all.extxyz", tmp_path / "tr.extxyz", tmp_path / "va.extxyz", 3, seed=0)
    mol = lambda p: {"/".join(f.id.split("/")[:2]) for f in read_structures(p)}  # noqa: E731
    assert len(mol(va)) == 3 and len(mol(tr)) == 7 and not mol(va) & mol(tr)
    assert len(read_structures(va)) == 6


@pytest.mark.parametrize("group", ["molecular_md_ethanol", "molecular_md_aspirin", "molecular_qm9_foundation"])
def test_data_groups_compose(group):
    from unirep.cli import compose

    cfg = compose("train", ["experiment=molecular/mace", f"data={group}"])
    assert cfg.data.train.startswith("data/molecular/") and cfg.data.generate.kind in ("md", "qm9")


def test_label_to_file_takes_over_a_dead_workers_lock(tmp_path):
    frames = langevin_md(_ethanol(), 4, calculator="mmff", interval=2, seed=0)
    unlabelled = [s.__class__(s.numbers, s.positions, id=s.id) for s in frames]
    parts = tmp_path / "set.extxyz.parts"
    parts.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (parts / "part00000.lock").write_text(dead.stdout.strip())  # a worker that died holding chunk 0
    path = label_to_file(unlabelled, tmp_path / "set.extxyz", calculator=MMFFCalculator(), chunk_size=2, progress=False)
    assert len(read_structures(path)) == 4 and not parts.exists()
