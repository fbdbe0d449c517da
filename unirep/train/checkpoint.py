"""Checkpoints that describe themselves and never unpickle: safetensors for tensors, JSON for the rest.

``<out_dir>/checkpoints/step_00001000/`` holds

- ``model.safetensors``: the task's state without FrozenEncoder submodules (teachers are rebuilt from their own
  weights, so they never bloat a checkpoint);
- ``ema.safetensors``: the EMA of ``task.model``;
- ``optimizer.safetensors``: the optimiser's tensor state, flattened to ``state/<param index>/<name>``;
- ``rng.safetensors``: torch (CPU and CUDA) and numpy generator states of every rank;
- ``state.json``: the resolved config, the step, the optimiser's non-tensor state and parameter groups, the
  scheduler, Python's ``random`` state, the data position and anything extra.

The folder is written under a temporary name and renamed (as nanoGPT's ``ckpt.pt`` habit, made atomic), so a crash
mid-write never replaces or corrupts the last good checkpoint; the last ``keep_last`` are kept. ``state.json`` records
the sha256 of every tensor file and loading verifies them; a run's damaged newest checkpoint is skipped for the newest
one that verifies (said in the log). Rotation deletes ``state.json`` first, and temporary folders of dead writers
and step folders without ``state.json`` are removed before each write.

Trust model: a checkpoint holds tensors and JSON only. Nothing is unpickled, and the stored config is built
(:func:`load_task`) only through :func:`unirep.config.check_targets`: classes of the project's packages and torch's
optimisers/modules, plus registered factories; anything else needs ``trust_config=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unirep.train.ema import EMA, frozen_prefixes, trainable_state

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "load_task",
    "read_state",
    "verify_checkpoint",
    "resolve_checkpoint",
    "clean_leftovers",
    "OutDirLock",
    "CheckpointError",
    "CheckpointMismatchError",
    "rng_state",
    "set_rng_state",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 2  # 2: sha256 of every tensor file in state.json


# ----------------------------------------------------------------------------------------------------------------
# JSON with tuples kept as tuples (optimiser betas) and no silent str() of unknown objects
# ----------------------------------------------------------------------------------------------------------------


def _to_json(obj: Any, where: str) -> Any:
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, where) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v, where) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"checkpoint: {where} holds a {type(obj).__name__}, which JSON cannot store")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Optimiser state: tensors into safetensors, structure into JSON
# ----------------------------------------------------------------------------------------------------------------


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into ``{"state/<id>/<name>": tensor}`` and a JSON-able remainder."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state/{pid}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    structure = {
        "scalars": _to_json(scalars, "optimizer.state"),
        "param_groups": _to_json(state["param_groups"], "optimizer.param_groups"),
    }
    return tensors, structure


def unflatten_optimizer_state(tensors: dict[str, Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in _from_json(structure["scalars"]).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": _from_json(structure["param_groups"])}


# ----------------------------------------------------------------------------------------------------------------
# Random number generators
# ----------------------------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's generator states: tensors (torch CPU/CUDA, numpy's key) and JSON (python, numpy's rest)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_key"] = torch.from_numpy(key.astype(np.int64))  # uint32 [624], widened for safetensors
    version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    np_meta = meta["numpy"]
    key = tensors["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state((np_meta["kind"], key, np_meta["pos"], np_meta["has_gauss"], np_meta["gauss"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


# ----------------------------------------------------------------------------------------------------------------
# Errors, checksums, leftovers
# ----------------------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder, the file and what to do."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointMismatchError(CheckpointError, KeyError):
    """The checkpoint's tensors do not fit the model built from the config (missing, unexpected, other shapes)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


_LEFTOVER = re.compile(r"^\.(tmp|old)-step_\d+-(\d+)$")


def _remove_checkpoint(path: Path) -> None:
    """Delete ``state.json`` first: a kill half-way leaves a folder that never looks like a valid checkpoint."""
    try:
        (path / "state.json").unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(root: str | os.PathLike) -> list[Path]:
    """Remove what dead writers left under ``root``: temporary folders and step folders without ``state.json``.

    Temporary folders of live processes are kept (their writer still owns them). Returns the removed paths.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif _STEP_DIR.match(p.name) and p.is_dir() and not (p / "state.json").exists():
            shutil.rmtree(p, ignore_errors=True)  # an orphan of a rotation or a same-step rewrite that was killed
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Save / find / load
# ----------------------------------------------------------------------------------------------------------------


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    # clone: safetensors refuses tensors sharing storage (tied weights) and needs contiguous CPU memory
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``step_N`` folders with a ``state.json``) under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """Resolve a checkpoint folder, a ``checkpoints`` folder or a run's ``out_dir`` to the newest checkpoint."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    return None


def _checkpoint_state(task, ema, optimizer, scheduler, config, rng, extra, step) -> tuple[dict, dict[str, dict]]:
    """``state.json``'s content and the tensor files to write (name -> tensors)."""
    state: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "config": config,
        "frozen_prefixes": frozen_prefixes(task),
        "rng": [meta for _, meta in rng],
        "extra": _to_json(extra or {}, "extra"),
    }
    files = {"model.safetensors": trainable_state(task)}
    if ema is not None:
        files["ema.safetensors"] = ema.state_dict()
        state.update(ema_decay=ema.decay, ema_warmup=ema.warmup, ema_num_updates=ema.num_updates)
    if optimizer is not None:
        tensors, structure = flatten_optimizer_state(optimizer.state_dict())
        files["optimizer.safetensors"] = tensors
        state["optimizer"] = structure
        state["optimizer_class"] = type(optimizer).__qualname__
    if scheduler is not None:
        sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # closures are rebuilt
        state["scheduler"] = _to_json(sd, "scheduler")
    files["rng.safetensors"] = {f"rank{r}/{k}": v for r, (t, _) in enumerate(rng) for k, v in t.items()}
    return state, files


def _write_folder(tmp: Path, state: dict[str, Any], files: dict[str, dict[str, Tensor]]) -> None:
    tmp.mkdir()
    state["files"] = {}
    for name, tensors in files.items():
        _save_tensors(tensors, tmp / name)
        state["files"][name] = _sha256(tmp / name)  # verified on load: flipped bytes never train on silently
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1)
    _fsync_tree(tmp)  # the data is on disk before the rename makes it the newest checkpoint


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    task: nn.Module,
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    config: dict[str, Any] | None = None,
    rng: list[tuple[dict[str, Tensor], dict[str, Any]]] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically and delete all but the newest ``keep_last`` checkpoints.

    ``rng`` is one :func:`rng_state` per rank (default: this process's). Returns the checkpoint folder. A failed
    write (disk full) removes its temporary folder and raises an ``OSError`` that says the older ones are intact.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)  # temporary folders of dead runs take space a resumed run needs
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    state, files = _checkpoint_state(task, ema, optimizer, scheduler, config, rng or [rng_state()], extra, step)
    try:
        _write_folder(tmp, state, files)
        # the rename is the commit point: before it the previous checkpoints are untouched
        if final.exists():
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove_checkpoint(old)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise OSError(
                err.errno,
                f"writing checkpoint {final} failed ({err.strerror or err}); nothing was replaced, the previous "
                f"checkpoints under {root} are intact and the partial folder was removed: free space (or fix the "
                "folder) and resume with trainer.resume=auto",
            ) from err
        raise
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            _remove_checkpoint(old)
    return final


def read_state(found: Path) -> dict[str, Any]:
    """``found/state.json``, checked for the fields every loader needs; errors name the file."""
    path = Path(found) / "state.json"
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path}: unreadable ({type(err).__name__}: {err}); the checkpoint is damaged: use an older one "
            f"(trainer.resume=<its folder>) or delete {found}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint description; delete {found}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' is {step!r}, not a step count; the file was edited or damaged")
    state["path"] = str(found)
    return state


def verify_checkpoint(found: str | os.PathLike, names: list[str] | None = None) -> dict[str, Any]:
    """Read ``state.json`` and check the sha256 of the tensor files (``names``, default all); returns the state."""
    found = Path(found)
    state = read_state(found)
    sums = state.get("files")
    if sums is None:
        warnings.warn(f"{found}: written before checksums were recorded; its files are not verified", stacklevel=2)
        return state
    for name in names if names is not None else list(sums):
        path = found / name
        if name not in sums:
            continue
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (state.json lists it); the checkpoint is incomplete")
        if _sha256(path) != sums[name]:
            raise CheckpointError(
                f"{path}: sha256 differs from the one recorded in state.json: the file is damaged or was edited; "
                "use an older checkpoint"
            )
    return state


def resolve_checkpoint(path: str | os.PathLike, log: Any = print, skipped: list[Path] | None = None) -> Path:
    """The checkpoint to load from ``path``: the folder itself, or a run's newest checkpoint that verifies.

    A damaged newest checkpoint of a run is skipped for the next older one (appended to ``skipped``), and ``log``
    says so.
    """
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    candidates = next((c for root in (path / "checkpoints", path) if (c := list_checkpoints(root))), [])
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at {path}: expected a step_N folder with state.json, or a run folder")
    errors = []
    for found in reversed(candidates):
        try:
            verify_checkpoint(found)
        except CheckpointError as err:
            errors.append(str(err))
            log(f"[unirep] skipping damaged checkpoint {found}: {err}")
            if skipped is not None:
                skipped.append(found)
            continue
        if errors:
            log(f"[unirep] falling back to {found}, the newest checkpoint that verifies")
        return found
    raise CheckpointError(f"no checkpoint under {path} verifies: " + " | ".join(errors))


def _load_tensors(found: Path, name: str, state: dict[str, Any]) -> dict[str, Tensor]:
    path = found / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the checkpoint is incomplete")
    if "files" in state:
        verify_checkpoint(found, [name])
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 (SafetensorError, OSError: both mean the file is damaged)
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err}); the file is damaged") from None


def _load_module_state(module: nn.Module, tensors: dict[str, Tensor], what: str, path: Path) -> None:
    """Strict load of everything except FrozenEncoder submodules; names the parameters and shapes that differ."""
    expected = trainable_state(module)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{path / what} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; was it written by another config?"
        )
    shapes = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in tensors.items() if v.shape != expected[k].shape]
    if shapes:
        k, saved, built = shapes[0]
        raise CheckpointMismatchError(
            f"{path / what}: {k} has shape {list(saved)} in the checkpoint but {list(built)} in the model built from "
            f"the config ({len(shapes)} parameter(s) differ): the config's model differs from the one that wrote the "
            "checkpoint (a width or size key changed); use the checkpoint's own config"
        )
    result = module.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def _load_optimizer(found: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    if "optimizer" not in state:
        raise KeyError(f"{found} holds no optimizer state; resume with trainer.resume=none to start afresh")
    tensors = _load_tensors(found, "optimizer.safetensors", state)
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointMismatchError(
            f"{found}/optimizer.safetensors does not fit the optimiser ({err}): the model or optimizer config differs "
            "from the run that wrote it"
        ) from None


def _load_ema(found: Path, state: dict[str, Any], ema: EMA) -> None:
    if not (found / "ema.safetensors").is_file():
        raise CheckpointError(
            f"{found} has no ema.safetensors: pass ema=false to unirep-sample/unirep-eval to use the raw weights, or "
            "trainer.reset_ema=true to resume with an EMA restarted from the raw weights"
        )
    try:
        ema.load_state_dict(_load_tensors(found, "ema.safetensors", state))
    except KeyError as err:
        raise CheckpointMismatchError(f"{found}/ema.safetensors: {err.args[0]}") from None
    # checkpoints from before the warm-up counted no updates: every applied step was one
    ema.num_updates = int(state.get("ema_num_updates", state["step"] - state.get("extra", {}).get("bad_steps", 0)))


def load_checkpoint(
    path: str | os.PathLike,
    task: nn.Module | None = None,
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = False,
    rank: int = 0,
) -> dict[str, Any]:
    """Load the parts given from a checkpoint (a folder, or a run whose newest verifying checkpoint is used).

    Returns ``state.json`` (with ``"path"`` added). With ``restore_rng`` the generators of ``rank`` are restored
    (rank 0's when the checkpoint was written by fewer ranks). Every file read is checked against its sha256.
    """
    found = resolve_checkpoint(path)
    state = read_state(found)
    if task is not None:
        _load_module_state(task, _load_tensors(found, "model.safetensors", state), "model.safetensors", found)
    if ema is not None:
        _load_ema(found, state, ema)
    if optimizer is not None:
        _load_optimizer(found, state, optimizer)
    if scheduler is not None and "scheduler" in state:
        sd = _from_json(state["scheduler"])
        sd["lr_lambdas"] = scheduler.state_dict().get("lr_lambdas")
        if sd["lr_lambdas"] is None:
            sd.pop("lr_lambdas")
        scheduler.load_state_dict(sd)
    if restore_rng:
        tensors = _load_tensors(found, "rng.safetensors", state)
        r = rank if any(k.startswith(f"rank{rank}/") for k in tensors) else 0
        mine = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{r}/")}
        try:
            set_rng_state(mine, state["rng"][r])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{found}/rng.safetensors: generator states unusable ({err!r})") from None
    return state


def load_task(
    path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu", trust_config: bool = False
) -> tuple[nn.Module, Any]:
    """Rebuild a task from a checkpoint's resolved config and load its weights (EMA weights into ``task.model``).

    The stored config is untrusted input: only what :func:`unirep.config.check_targets` allows is built, unless
    ``trust_config``. A checkpoint without EMA weights is refused unless ``ema=False`` (the raw weights). Returns
    ``(task, cfg)`` with ``cfg`` an OmegaConf config of the run. Used by ``unirep-sample``, ``unirep-eval``, teachers.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from unirep.config import check_targets

    found = resolve_checkpoint(path)
    state = read_state(found)
    if not isinstance(state.get("config"), dict) or "task" not in state["config"]:
        raise KeyError(
            f"{found}/state.json has no config.task: it was not written by unirep-train; rebuild the task yourself"
        )
    if not trust_config:
        check_targets(state["config"]["task"], "task", f"{found}/state.json")
    if ema and not (found / "ema.safetensors").is_file():
        _load_ema(found, state, None)  # raises with the fix
    cfg = OmegaConf.create(state["config"])
    try:
        task = instantiate(cfg.task, _convert_="object")
    except Exception as err:
        raise CheckpointError(f"{found}/state.json: building config.task failed: {err}") from err
    if ema:
        shadow = EMA(task.model, decay=0.0)
        load_checkpoint(found, task=task, ema=shadow)
        shadow.copy_to(task.model)
    else:
        load_checkpoint(found, task=task)
    task.to(device)
    task.eval()
    return task, cfg


# ----------------------------------------------------------------------------------------------------------------
# One run per out_dir
# ----------------------------------------------------------------------------------------------------------------


class OutDirLock:
    """An exclusive ``fcntl.flock`` on ``out_dir/.unirep.lock`` held while a run writes there.

    The kernel releases the lock when its process dies (even by ``kill -9``), so a lock file left by a dead run is
    stale and taken over (the log says so); a live holder is named in the error.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / ".unirep.lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead run's lock was taken over. Raises when a live run holds it."""
        import fcntl
        import socket
        import time

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"out_dir {self.out_dir} is in use by another run ({holder}; lock {self.path}): two runs in one "
                "out_dir overwrite each other's checkpoints and metrics. Wait for it, stop it, or use another out_dir"
            ) from None
        previous = os.read(fd, 200).decode(errors="replace").strip()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        os.fsync(fd)
        self._fd = fd
        return f"took over the stale lock of a run that is gone ({previous})" if previous else None

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
