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
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from molecular.data import GraphBatch, regraph
from molecular.models import MACEModel, default_dtype, import_mace, load_mace_state
from molecular.teachers.base import AtomisticEncoder
from unirep.encoders import FrozenEncoder
from unirep.intermediates import normalize_index
from unirep.tokens import TokenSet

__all__ = ["MACEEncoder", "save_mace_model", "load_mace_model", "mace_teacher", "random_mace_teacher"]


class MACEEncoder(AtomisticEncoder):
    """Per-atom node features of a MACE model: its default tokens concatenate chosen layers; every layer is reachable
    through :meth:`forward_intermediates` (0: node embedding, k: after interaction k, negative from the end).

    Args:
        model: a :class:`MACEModel` (built, loaded or wrapping a foreign MACE module).
        layers: the layers :meth:`encode` concatenates (``-1``: the last, MACE-OFF's invariant output layer).
        invariant: only rotation-invariant features (``features="scalars"``); ``False``: the full irreps.
        features: ``scalars``, ``norms`` (scalars plus per-irrep norms) or ``full``; overrides ``invariant``.
        center: subtract per-element means (see :class:`AtomisticEncoder`).
    """

    def __init__(
        self,
        model: MACEModel,
        layers: Sequence[int] = (-1,),
        invariant: bool = True,
        center: bool = False,
        features: str | None = None,
    ) -> None:
        features = features or ("scalars" if invariant else "full")
        layers = [normalize_index(int(i), model.num_layers, "MACE teacher") for i in layers]
        dim = sum(model.feature_dim(i, features) for i in layers)
        super().__init__(dim, center=center, dtype=model.dtype)
        self.model = model.eval().requires_grad_(False)
        self.layers = layers
        self.features_mode = features
        self.invariant = not any(model.equivariant_at(i, features) for i in range(model.num_layers + 1))
        self.elements = list(model.z_table)
        self.r_max = model.r_max

    @property
    def num_layers(self) -> int:  # type: ignore[override]
        return self.model.num_layers

    @property
    def layer_names(self) -> list[str]:
        return self.model.layer_names

    def feature_dim(self, index: int | None = None) -> int:
        return self.dim if index is None else self.model.feature_dim(index, self.features_mode)

    @torch.no_grad()
    def forward_intermediates(self, batch: GraphBatch, indices: Any = None) -> tuple[dict, list[TokenSet]]:
        """``(energy, tokens)`` of the teacher on its own neighbour graph (its cutoff, not the student's)."""
        batch = regraph(batch, self.model.r_max)
        with default_dtype(self.model.dtype):
            out, feats = self.model.forward_intermediates(
                batch, indices, features=self.features_mode, compute_forces=False, training=False
            )
        tokens = [TokenSet(t.x.detach().float(), t.batch, t.pos.float(), t.num_items) for t in feats]
        return {"energy": out["energy"].detach()}, tokens

    def features(self, batch: GraphBatch) -> Tensor:
        _, feats = self.forward_intermediates(batch, self.layers)
        return torch.cat([t.x for t in feats], dim=-1)


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
    # files written before these arguments existed were built with MACE's class defaults
    config.setdefault("interaction_first", config.get("interaction", "RealAgnosticResidualInteractionBlock"))
    config.setdefault("use_reduced_cg", True)
    config.setdefault("dtype", "float32")
    if dtype is not None:
        config["dtype"] = dtype
    model = MACEModel(**config)
    state = load_file(str(folder / "model.safetensors"))
    try:
        load_mace_state(model, state)
    except ValueError as err:
        raise ValueError(f"{folder}: weights do not match model.json ({err})") from err
    return model


def _load_pickled(path: Path, dtype: str | None, rebuild: bool = False) -> MACEModel:
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
    if rebuild:  # a MACEModel with constructor arguments (savable in the project format), the same weights
        model = MACEModel.from_mace(obj)
        return model if dtype is None else model.set_dtype(dtype)
    model = MACEModel.wrap(obj)
    return model if dtype is None else model.set_dtype(dtype)


def load_mace_model(
    path: str | os.PathLike,
    trust_pickle: bool = False,
    dtype: str | None = None,
    trust_config: bool = False,
    rebuild: bool = False,
) -> MACEModel:
    """Load a MACE model from a local path in any of the three formats (see the module docstring).

    ``rebuild=True`` turns a pickled ScaleShiftMACE into a :class:`MACEModel` with constructor arguments
    (:meth:`MACEModel.from_mace`, weights bit for bit), as fine-tuning needs; otherwise it is adopted as it is."""
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
        return model if dtype is None else model.set_dtype(dtype)
    if not trust_pickle:
        raise PermissionError(
            f"{path} is a pickled MACE model: loading it executes code from the file. Pass trust_pickle=True "
            f"(config: task.teacher.trust_pickle=true) if the file comes from a source you trust"
        )
    return _load_pickled(path, dtype, rebuild=rebuild)


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
    features: str | None = None,
) -> FrozenEncoder:
    """A frozen MACE teacher from a local file, with the content-keyed feature cache (hydra target).

    ``layers`` are :meth:`MACEEncoder.encode`'s default layers (0: node embedding, k: interaction k, -1: the last);
    an alignment term reads any other layer with ``target.layer``. ``random_init=True`` ignores ``path`` and gives
    :func:`random_mace_teacher` over ``z_table`` (smoke runs).
    """
    if random_init:
        return random_mace_teacher(z_table, layers=layers, cache_dir=None)
    model = load_mace_model(path, trust_pickle=trust_pickle, dtype=dtype, trust_config=trust_config)
    encoder = MACEEncoder(model, layers=layers, invariant=invariant, center=center, features=features)
    return FrozenEncoder(encoder, cache_dir=cache_dir)


def random_mace_teacher(
    z_table: Sequence[int],
    seed: int = 0,
    r_max: float = 4.0,
    num_channels: int = 8,
    max_L: int = 0,
    num_interactions: int = 1,
    layers: Sequence[int] = (-1,),
    cache_dir: str | None = None,
    max_ell: int = 2,
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
            max_ell=max_ell,
            correlation=2,
            dtype="float32",
        )
    return FrozenEncoder(MACEEncoder(model, layers=layers), cache_dir=cache_dir)
