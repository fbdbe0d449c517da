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
mid-write never replaces or corrupts the last good checkpoint; the last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
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
    "rng_state",
    "set_rng_state",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


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

    ``rng`` is one :func:`rng_state` per rank (default: this process's). Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rng = rng if rng is not None else [rng_state()]
    state: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "config": config,
        "frozen_prefixes": frozen_prefixes(task),
        "rng": [meta for _, meta in rng],
        "extra": _to_json(extra or {}, "extra"),
    }
    _save_tensors(trainable_state(task), tmp / "model.safetensors")
    if ema is not None:
        _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
        state["ema_decay"] = ema.decay
    if optimizer is not None:
        tensors, structure = flatten_optimizer_state(optimizer.state_dict())
        _save_tensors(tensors, tmp / "optimizer.safetensors")
        state["optimizer"] = structure
        state["optimizer_class"] = type(optimizer).__qualname__
    if scheduler is not None:
        sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # closures are rebuilt
        state["scheduler"] = _to_json(sd, "scheduler")
    _save_tensors({f"rank{r}/{k}": v for r, (t, _) in enumerate(rng) for k, v in t.items()}, tmp / "rng.safetensors")
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1)
    _fsync_tree(tmp)  # the data is on disk before the rename makes it the newest checkpoint
    # the rename is the commit point: before it the previous checkpoints are untouched
    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in root.glob(".tmp-step_*"):  # leftovers of earlier crashed writes
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_module_state(module: nn.Module, tensors: dict[str, Tensor], what: str, path: Path) -> None:
    """Strict load of everything except FrozenEncoder submodules."""
    expected = set(trainable_state(module))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise KeyError(
            f"{path}: {what} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; was it written by another config?"
        )
    result = module.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def load_checkpoint(
    path: str | os.PathLike,
    task: nn.Module | None = None,
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = False,
    rank: int = 0,
) -> dict[str, Any]:
    """Load the parts given from a checkpoint (a folder, or a run whose newest checkpoint is used).

    Returns ``state.json`` (with ``"path"`` added). With ``restore_rng`` the generators of ``rank`` are restored
    (rank 0's when the checkpoint was written by fewer ranks).
    """
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path}: expected a step_N folder with state.json, or a run folder")
    with open(found / "state.json") as f:
        state = json.load(f)
    state["path"] = str(found)
    if task is not None:
        _load_module_state(task, load_file(str(found / "model.safetensors")), "model.safetensors", found)
    if ema is not None:
        if not (found / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{found} has no ema.safetensors; load with ema=False")
        ema.load_state_dict(load_file(str(found / "ema.safetensors")))
    if optimizer is not None:
        if "optimizer" not in state:
            raise KeyError(f"{found} holds no optimizer state; resume with trainer.resume=none to start afresh")
        tensors = load_file(str(found / "optimizer.safetensors"))
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizer"]))
    if scheduler is not None and "scheduler" in state:
        sd = _from_json(state["scheduler"])
        sd["lr_lambdas"] = scheduler.state_dict().get("lr_lambdas")
        if sd["lr_lambdas"] is None:
            sd.pop("lr_lambdas")
        scheduler.load_state_dict(sd)
    if restore_rng:
        tensors = load_file(str(found / "rng.safetensors"))
        r = rank if any(k.startswith(f"rank{rank}/") for k in tensors) else 0
        mine = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{r}/")}
        set_rng_state(mine, state["rng"][r])
    return state


def load_task(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild a task from a checkpoint's resolved config and load its weights (EMA weights into ``task.model``).

    Returns ``(task, cfg)`` with ``cfg`` an OmegaConf config of the run. Used by ``unirep-sample``, ``unirep-eval``
    and anything that serves a trained model.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path}: expected a step_N folder with state.json, or a run folder")
    with open(found / "state.json") as f:
        state = json.load(f)
    if not state.get("config") or "task" not in state["config"]:
        raise KeyError(
            f"{found}/state.json has no config.task: it was not written by unirep-train; rebuild the task yourself"
        )
    cfg = OmegaConf.create(state["config"])
    task = instantiate(cfg.task, _convert_="object")
    if ema and (found / "ema.safetensors").is_file():
        shadow = EMA(task.model, decay=0.0)
        load_checkpoint(found, task=task, ema=shadow)
        shadow.copy_to(task.model)
    else:
        load_checkpoint(found, task=task)
    task.to(device)
    task.eval()
    return task, cfg
