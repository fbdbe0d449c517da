"""unirep-features: shards + index, resume, corrupt shards, and a training path that never calls the teacher."""

import json
import os

import pytest
import torch
from torch import nn

from unirep.encoders import FrozenEncoder, ShardStore
from unirep.features import ShardWriter, _hydra_defaults, find_teacher_targets, precompute_features
from unirep.tokens import TokenSet


class CountingTeacher(nn.Module):
    dim = 8

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.calls = 0
        self.items = 0

    def encode(self, x):
        self.calls += 1
        self.items += x.shape[0]
        return TokenSet.from_dense(self.lin(x))

    def encode_pooled(self, x):
        self.calls += 1
        self.items += x.shape[0]
        return self.lin(x).amax(1)


class FakeTeacherTarget(nn.Module):
    """The interface of unirep.align.TeacherTarget that unirep-features relies on."""

    def __init__(self, encoder: FrozenEncoder, layer=None, pooled=False):
        super().__init__()
        self.encoder, self.layer, self.pooled = encoder, layer, pooled

    def teacher_input(self, batch):
        return batch["x"]


class FakeTask(nn.Module):
    def __init__(self, teacher: FrozenEncoder, pooled_too: bool = False, eval_teacher: FrozenEncoder | None = None):
        super().__init__()
        self.model = nn.Linear(1, 1)
        self.targets = nn.ModuleList([FakeTeacherTarget(teacher)])
        if pooled_too:
            self.targets.append(FakeTeacherTarget(teacher, pooled=True))
        self.eval_teacher = eval_teacher


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 5, 4, generator=g)
    return [{"x": xs[i], "id": f"item{i}"} for i in range(n)]


def _shards(folder):
    return sorted(p.name for p in folder.glob("shard_*.safetensors"))


def test_shards_and_index_then_training_reads_without_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = CountingTeacher()
    enc = FrozenEncoder(teacher, cache_dir=tmp_path)
    task = FakeTask(enc, pooled_too=True, eval_teacher=FrozenEncoder(CountingTeacher()))
    targets, unused = find_teacher_targets(task)
    assert len(targets) == 2 and unused == [task.eval_teacher]
    data = _data()
    item_kb = 5 * 8 * 4 / 1024
    summary = precompute_features(task, data, batch_size=8, shard_mb=12 * item_kb / 1024, progress=False)
    tokens = tmp_path / enc.cache_key / "tokens"
    assert {s["folder"] for s in summary} == {str(tokens), str(tmp_path / enc.cache_key / "pooled")}
    assert _shards(tokens) == [f"shard_{i:05d}.safetensors" for i in range(4)]  # 40 items, a shard every 12
    index = json.loads((tokens / "index.json").read_text())
    assert index["kind"] == "tokens" and index["cache_key"] == enc.cache_key and len(index["items"]) == 40
    assert not list(tmp_path.rglob("*.tmp"))

    # the training path: a fresh wrapper (new process), shuffled batches, zero teacher calls
    teacher2 = CountingTeacher()
    teacher2.load_state_dict(teacher.state_dict())
    fresh = FrozenEncoder(teacher2, cache_dir=tmp_path, max_memory_mb=0)
    ref = FrozenEncoder(teacher, cache=False)
    perm = torch.randperm(40)
    for i in range(0, 40, 10):
        x = torch.stack([data[j]["x"] for j in perm[i : i + 10]])
        torch.testing.assert_close(fresh.encode(x).x, ref.encode(x).x)
        torch.testing.assert_close(fresh.encode_pooled(x), ref.encode_pooled(x))
    assert teacher2.calls == 0 and fresh.item_misses == 0 and fresh.item_hits == 80


def test_resume_skips_finished_shards_and_recomputes_only_missing(tmp_path):
    teacher = CountingTeacher()
    enc = FrozenEncoder(teacher, cache_dir=tmp_path)
    task, data = FakeTask(enc), _data()
    mb = 10 * 5 * 8 * 4 / 2**20  # a shard every 10 items
    precompute_features(task, data[:25], batch_size=5, shard_mb=mb, progress=False)  # "interrupted" after 25
    folder = tmp_path / enc.cache_key / "tokens"
    assert _shards(folder) == ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in _shards(folder)}
    teacher.items = 0
    summary = precompute_features(task, data, batch_size=5, shard_mb=mb, progress=False)
    assert teacher.items == 15 and summary[0]["skipped"] == 25 and summary[0]["computed"] == 15
    assert all((folder / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # finished shards untouched
    assert len(ShardStore(folder)) == 40

    # a shard written just before an interrupted index update is adopted, not recomputed
    index = json.loads((folder / "index.json").read_text())
    index["items"] = {d: s for d, s in index["items"].items() if s != "shard_00003.safetensors"}
    (folder / "index.json").write_text(json.dumps(index))
    teacher.items = 0
    precompute_features(task, data, batch_size=5, shard_mb=mb, progress=False)
    assert teacher.items == 0 and len(ShardStore(folder)) == 40

    # a deleted shard: only its items are recomputed; leftovers of an interrupted write are cleaned up
    (folder / "shard_00001.safetensors").unlink()
    (folder / "shard_00009.safetensors.123.tmp").write_bytes(b"half")
    precompute_features(task, data, batch_size=5, shard_mb=mb, progress=False)
    assert teacher.items == 10 and len(ShardStore(folder)) == 40 and not list(folder.glob("*.tmp"))


def test_corrupt_shard_is_named_with_the_fix(tmp_path):
    teacher = CountingTeacher()
    enc = FrozenEncoder(teacher, cache_dir=tmp_path)
    data = _data(10)
    precompute_features(FakeTask(enc), data, batch_size=5, progress=False)
    folder = tmp_path / enc.cache_key / "tokens"
    shard = folder / "shard_00000.safetensors"
    shard.write_bytes(b"not a safetensors file")
    fresh = FrozenEncoder(teacher, cache_dir=tmp_path)
    with pytest.raises(RuntimeError) as err:
        fresh.encode(torch.stack([d["x"] for d in data[:2]]))
    assert str(shard) in str(err.value) and "unirep-features" in str(err.value) and "delete" in str(err.value)
    # the rerun the message asks for repairs it
    teacher.items = 0
    precompute_features(FakeTask(enc), data, batch_size=5, progress=False)
    assert teacher.items == 10
    fresh = FrozenEncoder(teacher, cache_dir=tmp_path)
    calls = teacher.calls
    fresh.encode(torch.stack([d["x"] for d in data[:2]]))
    assert teacher.calls == calls


class ModeTarget(nn.Module):
    """unirep.align.TeacherTarget's shape: ``mode`` instead of ``pooled``; no encoder of its own (shares the task's)."""

    def __init__(self, shared: FrozenEncoder, mode: str):
        super().__init__()
        self.encoder, self.layer, self.mode = None, None, mode
        object.__setattr__(self, "_shared", shared)

    @property
    def _teacher(self):
        return self._shared

    def teacher_input(self, batch):
        return batch["x"]


def test_targets_with_mode_and_a_shared_teacher(tmp_path):
    teacher = CountingTeacher()
    task = nn.Module()
    task.teacher = FrozenEncoder(teacher, cache_dir=tmp_path)
    task.target = ModeTarget(task.teacher, "pooled+tokens")
    targets, unused = find_teacher_targets(task)
    assert targets == [task.target] and unused == []
    summary = precompute_features(task, _data(6), batch_size=3, progress=False)
    assert sorted(os.path.basename(s["folder"]) for s in summary) == ["pooled", "tokens"]
    calls = teacher.calls
    x = torch.stack([d["x"] for d in _data(6)])
    task.teacher.encode(x), task.teacher.encode_pooled(x)
    assert teacher.calls == calls


def test_real_teacher_target_is_found(tmp_path):
    align = pytest.importorskip("unirep.align")
    if not hasattr(align, "TeacherTarget"):
        pytest.skip("unirep.align.TeacherTarget not there yet")
    task = nn.Module()
    task.target = align.TeacherTarget(CountingTeacher(), mode="pooled+tokens", input_key="x", cache_dir=str(tmp_path))
    summary = precompute_features(task, _data(4), batch_size=2, progress=False)
    assert sorted(os.path.basename(s["folder"]) for s in summary) == ["pooled", "tokens"]


def test_corrupt_index_is_named(tmp_path):
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="index.json"):
        ShardStore(tmp_path)
    with pytest.raises(RuntimeError, match="index.json"):
        ShardWriter(tmp_path, "k", "tokens")


def test_teacher_without_cache_dir_fails_with_the_fix():
    with pytest.raises(ValueError, match="cache_dir"):
        precompute_features(FakeTask(FrozenEncoder(CountingTeacher())), _data(4), batch_size=2, progress=False)


def test_hydra_defaults_keep_the_training_run_folder():
    assert _hydra_defaults(["experiment=toy"]) == ["hydra.output_subdir=null", "hydra.job.name=features"]
    assert _hydra_defaults(["hydra.job.name=x", "hydra.output_subdir=y"]) == []
    assert os.path.basename(__file__) == "test_features.py"


@pytest.mark.slow
def test_vision_quickstart_end_to_end(tmp_path):
    """compose -> unirep-features -> the task built again reads every training batch without running its teacher."""
    from hydra.utils import instantiate
    from torch.utils.data import default_collate

    from unirep.cli import compose
    from unirep.features import run_features
    from unirep.train import seed_everything

    smoke = list(compose("train", ["experiment=vision/quickstart"]).smoke)
    overrides = ["experiment=vision/quickstart", *smoke, f"++task.teacher_cache_dir={tmp_path}", f"out_dir={tmp_path}"]
    cfg = compose("train", [*overrides, "trainer.batch_size=256", "trainer.progress=false", "trainer.device=cpu"])
    summary = run_features(cfg)
    assert len(summary) == 1 and summary[0]["items"] == summary[0]["computed"] > 1000
    seed_everything(int(cfg.seed))  # a new process: the same (random-init smoke) teacher, the same cache key
    data, task = instantiate(cfg.data, _convert_="object"), instantiate(cfg.task, _convert_="object")
    (target,), _ = find_teacher_targets(task)
    batch = (data.collate_fn or default_collate)([data.train[i] for i in (5, 900, 17)])
    task.teacher.encode(target.teacher_input(batch), layer=target.layer)
    assert task.teacher.teacher_calls == 0 and task.teacher.item_hits == 3
