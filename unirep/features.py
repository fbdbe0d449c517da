"""``unirep-features``: precompute the frozen teachers' features of a training set into read-only shards.

``unirep-features experiment=<group/name> key=value ...`` composes the training config exactly as ``unirep-train``
does (:func:`unirep.cli.compose`; same schema, same overrides), builds ``data`` and ``task``, and for every teacher
target in the task (a module with ``.encoder`` (:class:`~unirep.encoders.FrozenEncoder`), ``.layer``, ``.pooled`` and
``.teacher_input(batch)``, i.e. :class:`unirep.align.TeacherTarget`, whose ``mode`` may also ask for the pooled
vector) runs the teacher once over the whole training
split, in a fixed order, and writes its features under the teacher's ``cache_dir``::

    <cache_dir>/<cache_key>/<kind>/shard_00000.safetensors   tensors keyed by item content digest
    <cache_dir>/<cache_key>/<kind>/index.json                {"format", "cache_key", "kind", "items": {digest: shard}}

A shard is flushed every ``shard_mb`` MB (memory stays bounded); each shard and then the index are written to a
temporary name and renamed, so an interrupted run never leaves a half-written file under a real name. A rerun
skips every digest already stored (finished shards are not rewritten), adopts a shard whose index update was
interrupted, and recomputes the items of a shard that is missing or unreadable. The training step then reads these
shards (``FrozenEncoder``) and never runs the teacher on a stored item, so an aligned step costs almost nothing more
than an unaligned one (DESIGN.md, "Teachers are artifacts").
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from unirep.encoders import INDEX_FORMAT, Entry, FrozenEncoder, _subset, feature_kind

__all__ = ["ShardWriter", "find_teacher_targets", "precompute_features", "run_features", "main"]

log = logging.getLogger(__name__)

_SHARD = re.compile(r"^shard_(\d{5,})\.safetensors$")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardWriter:
    """Appends one teacher's features of one kind to its shard folder; resumable (see the module docstring).

    Args:
        folder: ``<cache_dir>/<cache_key>/<kind>``.
        cache_key, kind: recorded in the index and in each shard's metadata.
        shard_mb: a shard is written once the buffered features reach this size.
    """

    def __init__(self, folder: str | os.PathLike, cache_key: str, kind: str, shard_mb: float = 256.0):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cache_key, self.kind = cache_key, kind
        self.limit = max(1, int(shard_mb * 2**20))
        self.index_path = self.folder / "index.json"
        self.items: dict[str, str] = {}
        indexed: dict[str, str] = {}
        if self.index_path.is_file():
            try:
                indexed = dict(json.loads(self.index_path.read_text())["items"])
            except (ValueError, KeyError, TypeError) as err:
                raise RuntimeError(
                    f"teacher feature index {self.index_path} is unreadable ({err}): delete it and rerun; the shards "
                    "next to it are adopted again"
                ) from err
        for tmp in self.folder.glob("*.tmp"):  # leftovers of an interrupted write
            tmp.unlink()
        on_disk = sorted(p.name for p in self.folder.iterdir() if _SHARD.match(p.name))
        self.repaired: list[str] = []
        readable: dict[str, list[str]] = {}
        for name in on_disk:
            try:
                with safe_open(str(self.folder / name), framework="pt", device="cpu") as f:
                    readable[name] = [k for k in f.keys() if not k.endswith(".pos")]
            except Exception:  # unreadable: drop it, its items are recomputed
                (self.folder / name).unlink()
                self.repaired.append(name)
        # keep index entries whose shard is readable; adopt shards written before an interrupted index update
        self.items = {d: s for d, s in indexed.items() if s in readable}
        for name, keys in readable.items():
            for d in keys:
                self.items.setdefault(d, name)
        self.finished_shards = sorted(readable)
        self.next_shard = 1 + max((int(_SHARD.match(n).group(1)) for n in on_disk), default=-1)
        self.buffer: dict[str, Tensor] = {}
        self.buffer_bytes = 0
        self.written: list[str] = []
        if self.items != indexed or not self.index_path.is_file():
            self._write_index()

    def __contains__(self, digest: str) -> bool:
        return digest in self.items or digest in self.buffer

    def __len__(self) -> int:
        return len(self.items) + sum(1 for k in self.buffer if not k.endswith(".pos"))

    def add(self, digest: str, entry: Entry) -> None:
        if digest in self:
            return
        for name, t in entry.items():
            key = digest if name == "x" else f"{digest}.{name}"
            t = t.detach().to("cpu").contiguous()
            self.buffer[key] = t
            self.buffer_bytes += t.numel() * t.element_size()
        if self.buffer_bytes >= self.limit:
            self.flush()

    def _write_index(self) -> None:
        index = {"format": INDEX_FORMAT, "cache_key": self.cache_key, "kind": self.kind, "items": self.items}
        _atomic_write_text(self.index_path, json.dumps(index))

    def flush(self) -> None:
        """Write the buffered features as the next shard, then the index (each atomically)."""
        if not self.buffer:
            return
        from safetensors.torch import save_file

        name = f"shard_{self.next_shard:05d}.safetensors"
        path = self.folder / name
        tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
        save_file(self.buffer, str(tmp), metadata={"format": INDEX_FORMAT, "cache_key": self.cache_key})
        os.replace(tmp, path)
        for k in self.buffer:
            if not k.endswith(".pos"):
                self.items[k] = name
        self._write_index()
        self.written.append(name)
        self.next_shard += 1
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        self.flush()


def _target_encoder(target: Any) -> FrozenEncoder | None:
    """The FrozenEncoder a teacher target reads: its own ``.encoder``, or the task's teacher it was bound to."""
    enc = getattr(target, "encoder", None)
    if isinstance(enc, FrozenEncoder):
        return enc
    try:
        enc = getattr(target, "teacher", None) or getattr(target, "_teacher", None)  # shared task.teacher
    except RuntimeError:  # not bound yet
        return None
    return enc if isinstance(enc, FrozenEncoder) else None


def target_kinds(target: Any) -> list[tuple[int | None, bool]]:
    """``(layer, pooled)`` of each feature kind a target reads: ``.pooled`` (bool), or ``.mode`` as
    :class:`unirep.align.TeacherTarget` has it (``tokens``, ``pooled``, ``pooled+tokens``)."""
    layer = getattr(target, "layer", None)
    layer = None if layer is None else int(layer)
    mode = getattr(target, "mode", None)
    if mode is None:
        mode = "pooled" if getattr(target, "pooled", False) else "tokens"
    kinds = []
    if mode != "pooled":
        kinds.append((layer, False))
    if mode != "tokens":
        kinds.append((None, True))
    return kinds


def find_teacher_targets(task: nn.Module) -> tuple[list[Any], list[FrozenEncoder]]:
    """The teacher targets of a task (modules with ``teacher_input`` that read a FrozenEncoder), and the
    FrozenEncoders no target uses (evaluation-only teachers: nothing maps a training batch to their input)."""
    targets, used = [], set()
    for m in task.modules():
        if not callable(getattr(m, "teacher_input", None)):
            continue
        enc = _target_encoder(m)
        if enc is not None:
            targets.append(m)
            used.add(id(enc))
    unused, seen = [], set()
    for m in task.modules():
        if isinstance(m, FrozenEncoder) and id(m) not in used and id(m) not in seen:
            seen.add(id(m))
            unused.append(m)
    return targets, unused


Job = tuple[Any, FrozenEncoder, "int | None", bool, "ShardWriter"]


def _plan_jobs(targets: list[Any], device: torch.device, shard_mb: float) -> tuple[list[Job], dict[Path, ShardWriter]]:
    """One job per (target, layer, pooled) kind, each writing into the shard store of its teacher and kind."""
    writers: dict[Path, ShardWriter] = {}
    jobs: list[Job] = []
    for t in targets:
        enc = _target_encoder(t)
        assert enc is not None
        enc.to(device)
        for layer, pooled in target_kinds(t):
            layer = enc.normalize_layer(layer)
            kind = feature_kind(layer, pooled)
            folder = enc.store_dir(kind)
            if folder is None:
                raise ValueError(
                    f"teacher {type(enc.encoder).__name__} of {type(t).__name__} has no cache_dir, so its features "
                    "have nowhere to go: set the teacher's cache_dir in the recipe (or on the command line) and rerun"
                )
            w = writers.get(folder)
            if w is None:
                w = writers[folder] = ShardWriter(folder, enc.cache_key, kind, shard_mb)
                for name in w.repaired:
                    log.warning("unreadable shard %s/%s removed: its items are recomputed", folder, name)
            jobs.append((t, enc, layer, pooled, w))
    return jobs, writers


def _run_job(job: Job, batch: Any, stats: dict[Path, dict[str, int]]) -> None:
    """Compute and store the features of the items of ``batch`` that the job's store does not hold yet."""
    t, enc, layer, pooled, w = job
    inp = t.teacher_input(batch)
    digests = enc.item_digests(inp)
    if digests is None:
        raise TypeError(
            f"teacher {type(enc.encoder).__name__}: its input is not a tensor and the encoder has no "
            "item_digests(sample) -> list[str], so its features cannot be keyed by content"
        )
    todo = [j for j, d in enumerate(digests) if d not in w]
    stats[w.folder]["skipped"] += len(digests) - len(todo)
    if not todo:
        return
    part = inp if len(todo) == len(digests) else _subset(inp, todo)
    if part is None:
        todo, part = list(range(len(digests))), inp
    entries = enc.compute_entries(part, layer, pooled)
    for j, e in zip(todo, entries, strict=True):
        if digests[j] not in w:
            w.add(digests[j], e)
            stats[w.folder]["computed"] += 1


def precompute_features(
    task: nn.Module,
    dataset: Any,
    collate_fn: Callable[[list], Any] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    shard_mb: float = 256.0,
    progress: bool = True,
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """Run every teacher target of ``task`` over ``dataset`` (fixed order) and write the shards; returns one summary
    dict per store folder (``folder``, ``items``, ``computed``, ``skipped``, ``shards_written``, ``seconds``)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from unirep.train.data import to_device

    targets, _ = find_teacher_targets(task)
    if not targets:
        return []
    device = torch.device(device)
    jobs, writers = _plan_jobs(targets, device, shard_mb)
    stats = {f: {"computed": 0, "skipped": 0, "start": len(w)} for f, w in writers.items()}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers)
    start = time.time()
    bar = tqdm(loader, desc="teacher features", unit="batch", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for batch in bar:
            batch = to_device(batch, device)
            for job in jobs:
                _run_job(job, batch, stats)
            bar.set_postfix(items=sum(len(w) for w in writers.values()))
    for w in writers.values():
        w.close()
    seconds = time.time() - start
    for enc in {id(j[1]): j[1] for j in jobs}.values():
        enc.reload_stores()
    return [
        dict(
            folder=str(f),
            items=len(w),
            computed=stats[f]["computed"],
            skipped=stats[f]["skipped"],
            shards_written=len(w.written),
            shards_total=len(set(w.items.values())),
            seconds=round(seconds, 1),
        )
        for f, w in writers.items()
    ]


def run_features(cfg: DictConfig) -> list[dict[str, Any]]:
    """Build data and task from a composed ``train`` config and precompute its teachers' features."""
    from hydra.utils import instantiate

    from unirep.cli import _device
    from unirep.train import DataModule, seed_everything

    seed_everything(int(cfg.seed))  # the same teacher as unirep-train builds (random-init teachers included)
    data = instantiate(cfg.data, _convert_="object")
    if not isinstance(data, DataModule):
        raise TypeError(
            f"config `data` built a {type(data).__name__}; its _target_ must return a unirep.train.DataModule"
        )
    task = instantiate(cfg.task, _convert_="object")
    targets, unused = find_teacher_targets(task)
    for enc in unused:
        print(
            f"[unirep-features] {type(enc.encoder).__name__}: no teacher target maps a training batch to it "
            "(evaluation only): skipped",
            flush=True,
        )
    if not targets:
        print(f"[unirep-features] {cfg.name}: the task has no frozen-teacher target: nothing to precompute", flush=True)
        return []
    summary = precompute_features(
        task,
        data.train,
        data.collate_fn,
        batch_size=int(cfg.trainer.batch_size),
        device=_device(str(cfg.trainer.device)),
        progress=bool(cfg.trainer.progress),
        num_workers=int(cfg.trainer.num_workers),
    )
    for s in summary:
        print(
            f"[unirep-features] {cfg.name}: {s['items']} items in {s['shards_total']} shard(s) at {s['folder']} "
            f"({s['computed']} computed, {s['skipped']} already there, {s['shards_written']} shard(s) written, "
            f"{s['seconds']} s)",
            flush=True,
        )
    return summary


def _hydra_defaults(argv: Sequence[str]) -> list[str]:
    """Keep the training run's folder intact: no ``.hydra`` copy of this config there, log to ``features.log``."""
    extra = []
    if not any(a.startswith("hydra.output_subdir=") for a in argv):
        extra.append("hydra.output_subdir=null")
    if not any(a.startswith("hydra.job.name=") for a in argv):
        extra.append("hydra.job.name=features")
    return extra


def main() -> None:
    """Console script ``unirep-features``."""
    from unirep.cli import _app

    sys.argv[1:] = [*sys.argv[1:], *_hydra_defaults(sys.argv[1:])]
    _app(run_features, "train")


if __name__ == "__main__":
    main()
