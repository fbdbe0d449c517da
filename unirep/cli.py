"""Command-line apps (hydra): ``unirep-train``, ``unirep-sample``, ``unirep-eval``.

``unirep-train experiment=<group/name> key=value ...`` composes ``configs/train.yaml`` (checked against
:mod:`unirep.config`), instantiates ``data``, ``task``, ``optimizer`` and ``scheduler`` with
``hydra.utils.instantiate``, trains with :class:`unirep.train.Trainer`, evaluates at the end when the task can, and
writes ``loss.png``; a run stopped by SIGINT/SIGTERM/SIGUSR1 writes a checkpoint and exits 130/143/138.
``unirep-sample checkpoint=PATH`` and ``unirep-eval checkpoint=PATH`` rebuild the task from the checkpoint's resolved
config (:func:`unirep.train.load_task`: only the project's classes and registered factories, unless
``trust_config=true``; EMA weights, or the raw ones with ``ema=false``, recorded in the outputs). The config folder
is the repository's ``configs/``, or ``$UNIREP_CONFIG_DIR``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import unirep
import unirep.config  # noqa: F401  (registers the schemas in hydra's ConfigStore)

__all__ = ["config_dir", "compose", "run_train", "run_sample", "run_eval", "train", "sample", "evaluate"]


def config_dir() -> Path:
    """``$UNIREP_CONFIG_DIR`` or the repository's top-level ``configs/``."""
    env = os.environ.get("UNIREP_CONFIG_DIR")
    path = Path(env) if env else Path(unirep.__file__).resolve().parents[1] / "configs"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"unirep config folder {path} has no train.yaml: set UNIREP_CONFIG_DIR to the repository's configs/ folder"
        )
    return path


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config as the command line would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available here: use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r}: {err}; use auto, cpu, cuda or cuda:N") from None


def _build(node: DictConfig, key: str, convert: str = "object") -> Any:
    """``instantiate(node)`` with the config key and its values named when building fails."""
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_=convert)
    except Exception as err:
        values = OmegaConf.to_container(node, resolve=False)
        shown = {k: v for k, v in values.items() if not isinstance(v, (dict, list))} if isinstance(values, dict) else {}
        msg = f"building `{key}` failed: {err}\n  its values: {shown}; fix them under {key}."
        try:
            wrapped = type(err)(msg)
        except Exception:  # noqa: BLE001 (an exception type that takes other arguments)
            wrapped = RuntimeError(msg)
        raise wrapped from err


def _check_free_form(cfg: DictConfig, keys: Sequence[str]) -> None:
    from unirep.config import check_arg_types

    for key in keys:
        node = cfg.get(key)
        if node is not None:
            check_arg_types(OmegaConf.to_container(node, resolve=True), key)


def _run_dir(checkpoint: Path) -> Path:
    """The run folder of ``<run>/checkpoints/step_N`` (the checkpoint folder itself otherwise)."""
    return checkpoint.parents[1] if checkpoint.parent.name == "checkpoints" else checkpoint


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from a composed ``train`` config, train, evaluate, plot the loss curve."""

    from unirep.config import check_top_level
    from unirep.train import DataModule, Trainer, plot_loss_curve, seed_everything
    from unirep.train import distributed as dist_utils
    from unirep.train.trainer import SIGNAL_EXIT_CODES, trainer_config

    check_top_level(cfg)
    _check_free_form(cfg, ("data", "task", "optimizer", "scheduler"))
    trainer_options = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_config(trainer_options)  # every trainer value is checked before data or models are built
    seed_everything(int(cfg.seed))  # the same initial weights on every rank
    data = _build(cfg.data, "data")
    if not isinstance(data, DataModule):
        raise TypeError(
            f"config `data` built a {type(data).__name__}; its _target_ must return a unirep.train.DataModule"
        )
    task = _build(cfg.task, "task")
    optimizer = _build(cfg.optimizer, "optimizer", "all")
    scheduler = _build(cfg.scheduler, "scheduler", "all") if cfg.get("scheduler") else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(
        task, data, optimizer, scheduler=scheduler, seed=int(cfg.seed), out_dir=cfg.out_dir, config=resolved,
        **trainer_options,
    )  # fmt: skip
    try:
        result = trainer.fit()
    except BaseException:
        dist_utils.shutdown()
        raise
    if dist_utils.is_main():
        out_dir = Path(cfg.out_dir)
        png = plot_loss_curve(out_dir / "metrics.csv", out_dir / "loss.png")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result["eval"].items() if isinstance(v, (int, float)))
        print(f"[unirep] {cfg.name}: {result['step']} steps, checkpoint {result['checkpoint']}", flush=True)
        if shown:
            print(f"[unirep] final evaluation: {shown}", flush=True)
        if png is not None:
            print(f"[unirep] loss curve: {png}", flush=True)
    dist_utils.shutdown()
    result["exit_code"] = SIGNAL_EXIT_CODES.get(result.get("signal") or "", 143) if result["interrupted"] else 0
    return result


def _load_checkpoint_task(cfg: DictConfig, method: str, signature: str) -> tuple[Path, Any, DictConfig]:
    """The checkpoint ``cfg.checkpoint`` names, its task (EMA weights when ``cfg.ema``) and its run config; fails
    with a message when there is no checkpoint or the task lacks ``method``."""
    from unirep.train import find_checkpoint, load_task
    from unirep.train.checkpoint import resolve_checkpoint

    device = _device(cfg.device)
    if find_checkpoint(cfg.checkpoint) is None:
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no checkpoint there (a step_N folder or a run folder)")
    found = resolve_checkpoint(cfg.checkpoint)  # a run's newest checkpoint that verifies
    task, run_cfg = load_task(found, ema=cfg.ema, device=device, trust_config=cfg.trust_config)
    if not cfg.ema:
        print(f"[unirep] ema=false: using the raw (non-EMA) weights of {found}", flush=True)
    if not hasattr(task, method):
        raise AttributeError(f"{type(task).__name__} has no {signature}: it cannot {method}")
    return found, task, run_cfg


def run_sample(cfg: DictConfig) -> dict[str, Any]:
    """Load a checkpoint's task and call ``task.sample``; outputs go to ``<run>/samples`` or ``cfg.out_dir``."""
    found, task, _ = _load_checkpoint_task(cfg, "sample", "sample(out_dir, num, seed, **kwargs)")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else _run_dir(found) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = OmegaConf.to_container(cfg.sample, resolve=True) if cfg.sample else {}
    result = task.sample(out_dir, int(cfg.num), int(cfg.seed), **kwargs) or {}
    with open(out_dir / "sample.json", "w") as f:
        record = {"checkpoint": str(found), "weights": "ema" if cfg.ema else "raw", "num": int(cfg.num)}
        json.dump({**record, "seed": int(cfg.seed), **_jsonable(result)}, f, indent=1)
    print(f"[unirep] wrote {cfg.num} samples to {out_dir}", flush=True)
    return result


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Load a checkpoint's task, rebuild its data and call ``task.evaluate``; outputs go to ``<run>/eval``."""
    from unirep.config import check_targets
    from unirep.train.checkpoint import read_state

    found, task, run_cfg = _load_checkpoint_task(cfg, "evaluate", "evaluate(data, out_dir, step)")
    if cfg.data:
        data = _build(cfg.data, "data")
    else:
        if not cfg.trust_config:  # the checkpoint's data config is untrusted input, as its task config is
            check_targets(OmegaConf.to_container(run_cfg.data), "data", f"{found}/state.json")
        data = _build(run_cfg.data, "data")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else _run_dir(found) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    step = int(read_state(found)["step"])
    metrics = dict(task.evaluate(data, out_dir, step) or {})
    with open(out_dir / "metrics.json", "w") as f:
        record = {"checkpoint": str(found), "weights": "ema" if cfg.ema else "raw", "step": step}
        json.dump({**record, **_jsonable(metrics)}, f, indent=1)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    print(f"[unirep] evaluation of {found}: {shown}", flush=True)
    return metrics


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out


def _app(fn: Any, config_name: str) -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(fn)()


def _train_main(cfg: DictConfig) -> None:
    result = run_train(cfg)
    if result.get("exit_code"):  # a signal stopped the run: 130 (SIGINT), 143 (SIGTERM), 138 (SIGUSR1)
        raise SystemExit(result["exit_code"])


def _preflight_out_dir(argv: Sequence[str]) -> None:
    """Name an unusable out_dir before hydra's log handler trips over it with a bare logging error."""
    if any(a.startswith("-") for a in argv):
        return  # hydra's own flags (--help, --multirun, -cn): let hydra handle the command line
    try:
        out_dir = Path(str(compose("train", argv).out_dir))
    except Exception:  # noqa: BLE001 (hydra reports config errors itself, with its own message)
        return
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise SystemExit(f"out_dir {out_dir}: {existing} is a file, not a folder; choose another out_dir")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"out_dir {out_dir}: {existing} is not writable; choose a writable out_dir")


def train() -> None:
    """Console script ``unirep-train``; a run stopped by a signal exits with 128 + the signal's number."""
    import sys

    _preflight_out_dir(sys.argv[1:])
    _app(_train_main, "train")


def sample() -> None:
    """Console script ``unirep-sample``."""
    _app(run_sample, "sample")


def evaluate() -> None:
    """Console script ``unirep-eval``."""
    _app(run_eval, "eval")


if __name__ == "__main__":
    train()
