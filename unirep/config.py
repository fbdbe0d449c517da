"""Structured-config schemas of the command-line apps, and the checks run on configs before anything is built.

``configs/train.yaml`` starts with ``defaults: [base_train, ...]``, so every top-level and ``trainer`` key of a run
is checked against :class:`TrainConfig` / :class:`TrainerConfig` when hydra composes it: a misspelt key stops at
start-up with its name (hydra structured configs; lightning-hydra-template's habit of experiments as config files).
:class:`TrainerConfig` is the one source of the trainer's defaults: ``configs/trainer/default.yaml`` only names the
schema, and :class:`unirep.train.Trainer` takes its keyword defaults from it.

``data``, ``task``, ``optimizer`` and ``scheduler`` are free-form: hydra instantiates them. Two checks make them
safe and clear:

- :func:`check_arg_types`: a value whose type contradicts the annotation of the callable it goes to
  (``task.sample_steps=abc`` for an ``int``) stops at start-up with the key, the value and the expected type;
- :func:`check_targets` (the trust model of configs read from a checkpoint's ``state.json``): only classes defined in
  the project's packages and torch's optimisers/schedulers/modules (:data:`ALLOWED_PREFIXES`), and the factory
  functions registered in :data:`FACTORIES`, may be built. Any other callable (``os.system``, a project function
  that writes files, a class imported into a project module from elsewhere) is refused by name; a user's own classes
  need an explicit ``trust_config=true``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = [
    "TrainerConfig",
    "TrainConfig",
    "SampleConfig",
    "EvalConfig",
    "register_configs",
    "ALLOWED_PREFIXES",
    "FACTORIES",
    "register_factory",
    "UntrustedConfigError",
    "check_targets",
    "check_arg_types",
    "check_top_level",
]


@dataclass
class TrainerConfig:
    """Options of :class:`unirep.train.Trainer` (see its docstring); the one place their defaults are written."""

    max_steps: int = 1000
    batch_size: int = 64
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    log_every: int = 50
    eval_every: int = 0
    ckpt_every: int = 1000
    keep_last: int = 3
    num_workers: int = 0
    accum_steps: int = 1
    precision: str = "bf16"
    device: str = "auto"
    resume: str = "auto"
    overwrite: bool = False
    reset_ema: bool = False
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    final_lr: float | None = None  # from final_lr_from on, every group's lr is this (mace's stage two: --swa_lr 1e-3)
    final_lr_from: float = 0.75  # a step, or a fraction of max_steps (mace: the last 25 % of training)
    monitor: str | None = None  # the evaluation metric a ReduceLROnPlateau scheduler steps on (mace-torch: val loss)
    max_bad_steps: int = 10
    max_weight_growth: float = 100.0
    progress: bool = True
    tensorboard: bool = True
    eval_at_end: bool = True
    find_unused_parameters: bool = False
    handle_signals: bool = True
    num_threads: int = 0


@dataclass
class TrainConfig:
    """Top level of ``unirep-train``."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "outputs/${name}"
    data: Any = MISSING
    task: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    smoke: list[str] = field(default_factory=list)


@dataclass
class SampleConfig:
    """Top level of ``unirep-sample``: draw samples from a trained checkpoint."""

    checkpoint: str = MISSING
    num: int = 64
    seed: int = 0
    ema: bool = True
    trust_config: bool = False
    device: str = "auto"
    out_dir: str | None = None
    sample: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Top level of ``unirep-eval``: evaluate a trained checkpoint on its data."""

    checkpoint: str = MISSING
    ema: bool = True
    trust_config: bool = False
    device: str = "auto"
    out_dir: str | None = None
    data: Any = None


def register_configs() -> None:
    """Register the schemas as ``base_train``, ``base_sample``, ``base_eval`` and ``trainer/base_trainer``."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(name="base_sample", node=SampleConfig)
    cs.store(name="base_eval", node=EvalConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)


def check_top_level(cfg: Any, schema: type = TrainConfig) -> None:
    """Refuse top-level keys the schema lacks (``+nmae=foo`` slips past hydra's struct check)."""
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise KeyError(
            f"unknown top-level key(s) {unknown} (added with '+'?): {schema.__name__} has {sorted(known)}; "
            "check the spelling, or put task options under task./data./trainer."
        )


# ----------------------------------------------------------------------------------------------------------------
# The trust model of stored configs
# ----------------------------------------------------------------------------------------------------------------

# Where a buildable class may be defined (its real module, not the path a config reaches it by).
ALLOWED_PREFIXES: tuple[str, ...] = ("unirep.", "vision.", "molecular.", "torch.optim.", "torch.nn.")

# Module-level functions a config may call: factories that build a data module, a model preset, a teacher or a
# tokenizer. A function is never allowed for being in a project package: the packages also hold functions that write
# files (``molecular.data.write_extxyz``), and a checkpoint's config must not be able to call them.
FACTORIES: set[str] = {
    "unirep.toy.toy_data",
    *(f"vision.data.{n}" for n in ("digits_data", "natural_crops_data", "image_folder_data", "latent_folder_data")),
    *(f"vision.models{m}.sit_{n}" for m in ("", ".sit") for n in ("s2", "b2", "l2", "xl2", "tiny2", "mini2")),
    *(f"vision.models.ddt.ditdh_{n}" for n in ("tiny", "s", "b", "xl")),
    *(f"vision.tokenizers{m}.rae_decoder_{n}" for m in ("", ".rae") for n in ("tiny", "small", "base", "large", "xl")),
    "vision.tokenizers.tasks.load_tokenizer",
    *(f"vision.tokenizers{m}.load_sdvae" for m in ("", ".sdvae")),
    "vision.teacher.digits_teacher",
    *(f"molecular.teachers{m}.{n}" for m in ("", ".mace") for n in ("mace_teacher", "random_mace_teacher")),
    *(f"molecular.tokenizers{m}.local_ae_{n}" for m in ("", ".local_ae") for n in ("small", "tiny")),
    *(f"molecular.flows{m}" for m in (".load_tokenizer", ".latent.load_tokenizer")),
    *(f"molecular.flows.egnn_{n}" for n in ("base", "small", "tiny")),
    "molecular.quickstart.foundation_teacher",
    *(f"molecular.conformers{m}.conformer_datamodule" for m in ("", ".data")),
    "molecular.task.mace_data",
    "molecular.conformers.ensembles.ensemble_datamodule",
    *(f"molecular.{n}" for n in ("flows.load_vae", "tokenizers.geoldm.load_vae", "flows.reflow.load_velocity_net")),
    *(f"molecular.proteins.{n}" for n in ("data.protein_datamodule", "flow.load_autoencoder")),
    *(f"molecular.proteins.flow.flow_{n}" for n in ("small", "tiny")),
    *(f"molecular.proteins.slae.slae_{n}" for n in ("small", "tiny")),
    "molecular.quality.force_mae",
    # losses a task takes as ``_partial_: true`` callables (pure functions of tensors)
    *(f"unirep.align.{n}" for n in ("dispersive_loss", "smooth_l1", "vf_loss", "neg_cosine", "mse", "nt_xent")),
}


def register_factory(*names: str) -> None:
    """Allow more factory functions (dotted paths as configs write them) in configs read from checkpoints."""
    FACTORIES.update(names)


class UntrustedConfigError(ValueError):
    """A stored config names something the trust model does not allow to be built."""


def _walk(node: Any, where: str) -> Iterator[tuple[str, dict]]:
    """Every mapping with a ``_target_`` under ``node``, with its dotted key."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for k, v in node.items():
            yield from _walk(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{where}[{i}]")


def _strings(node: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{where}[{i}]")


def _refusal(source: str, key: str, target: str, why: str) -> UntrustedConfigError:
    return UntrustedConfigError(
        f"{source}: {key}._target_={target!r} {why}; a checkpoint's config may build only classes of "
        f"{', '.join(ALLOWED_PREFIXES)} and the registered factories (unirep.config.FACTORIES). If you wrote this "
        "config yourself and trust it, pass trust_config=true"
    )


def check_targets(node: Any, where: str, source: str) -> None:
    """Refuse every ``_target_`` under ``node`` (a plain container) that the trust model does not allow.

    ``where`` is the dotted key of ``node`` (``"task"``), ``source`` the file it came from (named in errors).
    Interpolations (``${...}``) are refused too: a resolved config holds none, and resolvers can read the environment.
    """
    from hydra._internal.utils import _locate

    for key, value in _strings(node, where):
        if "${" in value:
            raise UntrustedConfigError(
                f"{source}: {key}={value!r} is an interpolation; a stored config is resolved and holds none. "
                "Pass trust_config=true if you wrote it"
            )
    for key, sub in _walk(node, where):
        target = sub["_target_"]
        if not isinstance(target, str) or not target.startswith(ALLOWED_PREFIXES):
            raise _refusal(source, key, str(target), "is outside the allowed packages")
        try:
            obj = _locate(target)
        except Exception as err:  # noqa: BLE001 (hydra raises ImportError or a bare Exception)
            raise UntrustedConfigError(f"{source}: {key}._target_={target!r} cannot be imported ({err})") from None
        module = getattr(obj, "__module__", None) or ""
        canonical = f"{module}.{getattr(obj, '__qualname__', '')}"
        if inspect.isclass(obj):
            if not canonical.startswith(ALLOWED_PREFIXES):
                raise _refusal(source, key, target, f"is the class {canonical}, defined outside the allowed packages")
        elif target not in FACTORIES and canonical not in FACTORIES:
            kind = "a function" if callable(obj) else f"a {type(obj).__name__}"
            raise _refusal(source, key, target, f"is {kind}, not a class or a registered factory")


# ----------------------------------------------------------------------------------------------------------------
# Types of free-form values against the annotations of the callables they go to
# ----------------------------------------------------------------------------------------------------------------

_SIMPLE = (bool, int, float, str, type(None))


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types a hint admits, or None when it admits anything else too (then nothing is checked)."""
    import torch

    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    out = []
    for a in args:
        if a in _SIMPLE:
            out.append(a)
        elif a is torch.Tensor:
            continue  # a number is fine where a tensor is; a string is not
        else:
            return None
    return tuple(out)


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed or str in allowed
    if isinstance(value, int):
        return bool(set(allowed) & {int, float, str})
    if isinstance(value, float):
        return float in allowed or str in allowed or (int in allowed and value.is_integer())
    if isinstance(value, str):
        if str in allowed:
            return True
        for kind in (t for t in allowed if t in (int, float)):
            try:
                kind(value)  # "1e-3" from a YAML 1.1 file: torch and friends accept what float() accepts
                return True
            except ValueError:
                pass
        return False
    return True  # lists, dicts: not checked here


def _hints(obj: Any) -> tuple[dict[str, Any], inspect.Signature | None]:
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(fn), inspect.signature(obj)
    except Exception:  # noqa: BLE001 (unresolvable forward references, builtins without signatures)
        return {}, None


def check_arg_types(node: Any, where: str, skip: Iterable[str] = ()) -> None:
    """Stop at start-up when a value contradicts the annotation of the parameter it is passed to.

    ``node`` is a plain container (``OmegaConf.to_container``); only plain annotations (``int``, ``float | None``,
    ``bool``, ``str``, ``float | Tensor``) are checked, so a value a callable accepts in its own way is never refused.
    """
    from hydra._internal.utils import _locate

    skip = set(skip)
    for key, sub in _walk(node, where):
        try:
            obj = _locate(sub["_target_"])
        except Exception:  # noqa: BLE001 (instantiate names a missing target itself)
            continue
        hints, sig = _hints(obj)
        for name, value in sub.items():
            if name.startswith("_") or name not in hints or f"{key}.{name}" in skip:
                continue
            allowed = _allowed_types(hints[name])
            if allowed is None or _fits(value, allowed):
                continue
            expected = " | ".join(t.__name__ for t in allowed) or "a number"
            default = sig.parameters[name].default if sig is not None and name in sig.parameters else None
            example = "" if default in (None, inspect.Parameter.empty) else f", e.g. {key}.{name}={default!r}"
            raise TypeError(
                f"{key}.{name}={value!r}: {sub['_target_']} expects {expected} for {name!r}; set a value of that "
                f"type{example}"
            )


register_configs()
