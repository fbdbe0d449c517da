"""MACE models as frozen teachers, and loading MACE model files from local paths.

MACE-REPA (ICML 2025 GenBio workshop) aligns a MACE student to a frozen MACE foundation model's per-atom features
(MACE-OFF23, Kovács et al. 2023; MACE-MP-0, Batatia et al. 2023; anchor ACEsuit/mace ``mace/calculators/
foundations_models.py`` for the file formats). Three file formats load here:

1. the project's format: a folder (or a ``.json`` + ``.safetensors`` pair) with the :class:`~molecular.models.MACEModel`
   arguments as JSON and its weights as safetensors (:func:`save_mace_model`); nothing is unpickled;
2. a unirep training checkpoint of a :class:`~molecular.task.MaceTask` (the project's own "foundation" MACE,
   ``configs/experiment/molecular/foundation.yaml``), loaded through ``unirep.train.load_task``: its stored config is
   checked by the checkpoint trust model (project classes and registered factories only; ``trust_config=True`` for
   a config you wrote) and its files against their sha256;
3. a whole pickled MACE model (``*.model``: what ``mace_run_train`` writes and what the MACE-MP/MACE-OFF
   downloads are). Unpickling runs code from the file, so it needs ``trust_pickle=True`` and warns; torch's
   default dtype and the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` variable are restored afterwards.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from molecular.data import GraphBatch, regraph
from molecular.models import MACEModel, default_dtype, import_mace
from molecular.teachers.base import AtomisticEncoder
from unirep.encoders import FrozenEncoder

__all__ = ["MACEEncoder", "save_mace_model", "load_mace_model", "mace_teacher", "random_mace_teacher"]


class MACEEncoder(AtomisticEncoder):
    """Per-atom node features of chosen interactions of a MACE model, concatenated.

    Args:
        model: a :class:`MACEModel` (built, loaded or wrapping a foreign MACE module).
        layers: interaction indices (``-1``: the last, MACE-OFF's invariant output layer).
        invariant: only the scalar (``0e``) channels of each layer, which are rotation invariant.
        center: subtract per-element means (see :class:`AtomisticEncoder`).
    """

    def __init__(
        self, model: MACEModel, layers: Sequence[int] = (-1,), invariant: bool = True, center: bool = False
    ) -> None:
        layers = [int(i) % model.num_layers for i in layers]
        dim = sum(model.feature_dim(i, invariant) for i in layers)
        super().__init__(dim, center=center, dtype=model.dtype)
        self.model = model.eval().requires_grad_(False)
        self.layers = layers
        self.invariant = invariant

    def features(self, batch: GraphBatch) -> Tensor:
        # the teacher's own cutoff decides its neighbours, not the student's graph
        batch = regraph(batch, self.model.r_max)
        out = self.model(batch, compute_forces=False, training=False)
        parts = self.model.split_features(out["node_feats"].detach(), batch, self.layers, self.invariant)
        return torch.cat([p.x for p in parts], dim=-1)


def save_mace_model(model: MACEModel, path: str | os.PathLike) -> Path:
    """Write ``model.json`` (constructor arguments) and ``model.safetensors`` into folder ``path``."""
    if not model.config:
        raise ValueError("this MACEModel wraps a foreign MACE module and has no constructor arguments to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path / f"model.safetensors.{os.getpid()}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, path / "model.safetensors")
    (path / "model.json").write_text(json.dumps({"format": "unirep.mace/1", "config": model.config}, indent=1))
    return path


def _load_project_format(folder: Path, dtype: str | None) -> MACEModel:
    meta = json.loads((folder / "model.json").read_text())
    config = dict(meta["config"])
    if dtype is not None:
        config["dtype"] = dtype
    model = MACEModel(**config)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(
        {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match model.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model


def _load_pickled(path: Path, dtype: str | None) -> MACEModel:
    import_mace()  # the pickle refers to mace.modules classes
    warnings.warn(
        f"unpickling {path} with torch.load(weights_only=False): this runs code stored in the file. Only do this "
        f"for files from a trusted source (MACE-MP/MACE-OFF releases, your own mace_run_train output).",
        stacklevel=3,
    )
    with default_dtype(torch.get_default_dtype()):  # some MACE files switch the global default dtype on load
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        raise ValueError(
            f"{path}: holds a state dict without hyperparameters; save the model in the project format "
            f"(molecular.teachers.save_mace_model) or as a whole MACE model"
        )
    model = MACEModel.wrap(obj)
    if dtype is not None:
        model.mace.to(torch.float64 if dtype in ("float64", "fp64") else torch.float32)
        model.dtype = next(model.mace.parameters()).dtype
    return model


def load_mace_model(
    path: str | os.PathLike, trust_pickle: bool = False, dtype: str | None = None, trust_config: bool = False
) -> MACEModel:
    """Load a MACE model from a local path in any of the three formats (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"MACE model {path} not found; nothing is downloaded here. Put a MACE-MP/MACE-OFF '.model' file there "
            f"(with trust_pickle=True), or train the project's foundation model: "
            f"unirep-train experiment=molecular/foundation"
        )
    if path.is_dir() and (path / "model.json").exists():
        return _load_project_format(path, dtype)
    if path.suffix == ".json" and path.with_suffix(".safetensors").exists():
        return _load_project_format(path.parent, dtype)
    if path.is_dir() and not (path / "model.json").exists():
        from unirep.train import find_checkpoint, load_task

        found = find_checkpoint(path)  # a checkpoint folder, or a run/checkpoints folder (its newest checkpoint)
        if found is None:
            raise ValueError(f"{path}: a folder with neither model.json (project format) nor a unirep checkpoint")
        task, _ = load_task(found, ema=True, trust_config=trust_config)
        model = task.model
        if not isinstance(model, MACEModel):
            raise TypeError(f"{path}: checkpoint's task.model is {type(model).__name__}, not a MACEModel")
        return model.to(torch.float64) if dtype in ("float64", "fp64") else model
    if not trust_pickle:
        raise PermissionError(
            f"{path} is a pickled MACE model: loading it executes code from the file. Pass trust_pickle=True "
            f"(config: task.teacher.trust_pickle=true) if the file comes from a source you trust"
        )
    return _load_pickled(path, dtype)


def mace_teacher(
    path: str,
    layers: Sequence[int] = (-1,),
    invariant: bool = True,
    trust_pickle: bool = False,
    dtype: str | None = None,
    center: bool = False,
    cache_dir: str | None = None,
    random_init: bool = False,
    z_table: Sequence[int] = (1, 6, 7, 8, 9),
    trust_config: bool = False,
) -> FrozenEncoder:
    """A frozen MACE teacher from a local file, with the per-structure feature cache (hydra target).

    ``random_init=True`` ignores ``path`` and gives :func:`random_mace_teacher` over ``z_table`` (smoke runs).
    """
    if random_init:
        return random_mace_teacher(z_table, layers=layers, cache_dir=None)
    model = load_mace_model(path, trust_pickle=trust_pickle, dtype=dtype, trust_config=trust_config)
    return FrozenEncoder(MACEEncoder(model, layers=layers, invariant=invariant, center=center), cache_dir=cache_dir)


def random_mace_teacher(
    z_table: Sequence[int],
    seed: int = 0,
    r_max: float = 4.0,
    num_channels: int = 8,
    max_L: int = 0,
    num_interactions: int = 1,
    layers: Sequence[int] = (-1,),
    cache_dir: str | None = None,
) -> FrozenEncoder:
    """A tiny randomly initialised MACE teacher (smoke runs and tests; it carries no knowledge)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MACEModel(
            z_table,
            r_max=r_max,
            num_channels=num_channels,
            max_L=max_L,
            num_interactions=num_interactions,
            radial_mlp=(16,),
            mlp_irreps="8x0e",
            max_ell=2,
            correlation=2,
        )
    return FrozenEncoder(MACEEncoder(model, layers=layers), cache_dir=cache_dir)
