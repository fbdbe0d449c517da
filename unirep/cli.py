"""Command-line apps (hydra): ``unirep-train``, ``unirep-sample``, ``unirep-eval``.

``unirep-train experiment=<group/name> key=value ...`` composes ``configs/train.yaml`` (checked against
:mod:`unirep.config`), instantiates ``data``, ``task``, ``optimizer`` and ``scheduler`` with
``hydra.utils.instantiate``, trains with :class:`unirep.train.Trainer`, evaluates at the end when the task can, and
writes ``loss.png``. ``unirep-sample checkpoint=PATH`` and ``unirep-eval checkpoint=PATH`` rebuild the task from the
checkpoint's resolved config (:func:`unirep.train.load_task`). The config folder is the repository's ``configs/``,
or ``$UNIREP_CONFIG_DIR``.
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
    return torch.device(name)


def _run_dir(checkpoint: Path) -> Path:
    """The run folder of ``<run>/checkpoints/step_N`` (the checkpoint folder itself otherwise)."""
    return checkpoint.parents[1] if checkpoint.parent.name == "checkpoints" else checkpoint


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from a composed ``train`` config, train, evaluate, plot the loss curve."""
    from hydra.utils import instantiate

    from unirep.train import DataModule, Trainer, plot_loss_curve, seed_everything
    from unirep.train import distributed as dist_utils

    seed_everything(int(cfg.seed))  # the same initial weights on every rank
    data = instantiate(cfg.data, _convert_="object")
    if not isinstance(data, DataModule):
        raise TypeError(
            f"config `data` built a {type(data).__name__}; its _target_ must return a unirep.train.DataModule"
        )
    task = instantiate(cfg.task, _convert_="object")
    optimizer = instantiate(cfg.optimizer, _convert_="all")
    scheduler = instantiate(cfg.scheduler, _convert_="all") if cfg.get("scheduler") else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(
        task,
        data,
        optimizer,
        scheduler=scheduler,
        seed=int(cfg.seed),
        out_dir=cfg.out_dir,
        config=resolved,
        **OmegaConf.to_container(cfg.trainer, resolve=True),
    )
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
    return result


def _load_checkpoint_task(cfg: DictConfig, method: str, signature: str) -> tuple[Path, Any, DictConfig]:
    """The checkpoint ``cfg.checkpoint`` names, its task (EMA weights when ``cfg.ema``) and its run config; fails
    with a message when there is no checkpoint or the task lacks ``method``."""
    from unirep.train import find_checkpoint, load_task

    found = find_checkpoint(cfg.checkpoint)
    if found is None:
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no checkpoint there (a step_N folder or a run folder)")
    task, run_cfg = load_task(found, ema=cfg.ema, device=_device(cfg.device))
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
        json.dump(
            {"checkpoint": str(found), "num": int(cfg.num), "seed": int(cfg.seed), **_jsonable(result)}, f, indent=1
        )
    print(f"[unirep] wrote {cfg.num} samples to {out_dir}", flush=True)
    return result


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Load a checkpoint's task, rebuild its data and call ``task.evaluate``; outputs go to ``<run>/eval``."""
    from hydra.utils import instantiate

    found, task, run_cfg = _load_checkpoint_task(cfg, "evaluate", "evaluate(data, out_dir, step)")
    data = instantiate(cfg.data if cfg.data else run_cfg.data, _convert_="object")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else _run_dir(found) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(found / "state.json") as f:
        step = int(json.load(f)["step"])
    metrics = dict(task.evaluate(data, out_dir, step) or {})
    with open(out_dir / "metrics.json", "w") as f:
        json.dump({"checkpoint": str(found), "step": step, **_jsonable(metrics)}, f, indent=1)
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


def train() -> None:
    """Console script ``unirep-train``."""
    _app(run_train, "train")


def sample() -> None:
    """Console script ``unirep-sample``."""
    _app(run_sample, "sample")


def evaluate() -> None:
    """Console script ``unirep-eval``."""
    _app(run_eval, "eval")


if __name__ == "__main__":
    train()
