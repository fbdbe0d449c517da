"""Fine-tuning MACE from a foundation checkpoint: naive, with frozen layers, or regularised by MACE-REPA.

The most requested feature in ACEsuit/mace's tracker. :class:`FoundationMACE` is a :class:`~molecular.models.MACEModel`
initialised, bit for bit, from a foundation model in any format :func:`molecular.teachers.load_mace_model` reads: the
project's format (``experiment=molecular/foundation`` exports it), a unirep checkpoint folder, or a trusted pickled
MACE file (``trust_pickle=True``; a ScaleShiftMACE is rebuilt with its hyperparameters so the fine-tuned model saves
in the project format). Like mace-torch's ``--foundation_model`` fine-tuning, the foundation's element table and
cutoff are kept:

- element tables: the data's atomic numbers are mapped onto the foundation's one-hot order by atomic number (the
  data may use a subset, in any order); an element the foundation does not know is refused by name;
- the cutoff: a data ``r_max`` other than the foundation's is refused by name (every radial basis depends on it).

Recipes: ``experiment=molecular/mace_finetune`` (naive; ``task.model.freeze=[embedding,interaction1]`` or
``task.model.freeze=1`` freezes layers) and ``experiment=molecular/mace_finetune_repa`` (MACE-REPA where the teacher
is the starting model: the features drift from the foundation's only as far as the data asks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from molecular.models import MACEModel, load_mace_state
from molecular.teachers.mace import load_mace_model

__all__ = ["FoundationMACE", "freeze_layers", "layer_parameters"]


def layer_parameters(model: MACEModel) -> dict[str, list[str]]:
    """Parameter names of each freezable part: ``embedding`` (node embedding, radial basis, E0s), ``interaction<k>``
    (interaction k with its product block) and ``readouts``."""
    parts: dict[str, list[str]] = {"embedding": [], "readouts": []}
    for k in range(1, model.num_layers + 1):
        parts[f"interaction{k}"] = []
    for name, _ in model.named_parameters():
        field = name.split(".")
        sub = field[1] if field[0] == "mace" and len(field) > 1 else field[0]
        if sub in ("interactions", "products"):
            parts[f"interaction{int(field[2]) + 1}"].append(name)
        elif sub == "readouts":
            parts["readouts"].append(name)
        else:
            parts["embedding"].append(name)
    return parts


def freeze_layers(model: MACEModel, freeze: int | str | Sequence[str] | None) -> list[str]:
    """Set ``requires_grad=False`` on the named parts (see :func:`layer_parameters`); an int ``n`` freezes the
    embedding and interactions ``1..n``. Returns the frozen parameter names."""
    if freeze is None or freeze == [] or freeze == ():
        return []
    parts = layer_parameters(model)
    if isinstance(freeze, int) and not isinstance(freeze, bool):
        if not 0 <= freeze <= model.num_layers:
            raise ValueError(f"freeze={freeze}: the model has interactions 1..{model.num_layers}")
        names = ["embedding"] + [f"interaction{k}" for k in range(1, freeze + 1)]
    else:
        names = [freeze] if isinstance(freeze, str) else [str(n) for n in freeze]
    unknown = [n for n in names if n not in parts]
    if unknown:
        raise ValueError(f"freeze: unknown part(s) {unknown}; use {sorted(parts)} or an int (interactions 1..n)")
    frozen = [p for n in names for p in parts[n]]
    params = dict(model.named_parameters())
    for p in frozen:
        params[p].requires_grad_(False)
    return frozen


class FoundationMACE(MACEModel):
    """A MACE force field initialised from a foundation model (hydra target of the fine-tuning recipes).

    Args:
        path: the foundation model (project format folder, unirep checkpoint folder, or ``.model`` file).
        r_max: the data's cutoff (``data.r_max``); must equal the foundation's.
        z_table: the data's elements (``None``: not checked here); each must be in the foundation's table.
        freeze: parts to freeze (:func:`freeze_layers`): an int n (embedding + interactions 1..n) or names.
        trust_pickle / trust_config: as :func:`molecular.teachers.load_mace_model`.
        dtype: the fine-tuning dtype (``None``: the foundation's).
        features: :class:`MACEModel`'s default intermediates mode.
        random_init: a small random stand-in foundation over ``z_table`` instead of ``path`` (smoke runs only).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        r_max: float | None = None,
        z_table: Sequence[int] | None = None,
        freeze: int | str | Sequence[str] | None = None,
        trust_pickle: bool = False,
        trust_config: bool = False,
        dtype: str | None = None,
        features: str = "scalars",
        random_init: bool = False,
    ) -> None:
        if random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                source = MACEModel(
                    sorted(z_table or (1, 6, 7, 8, 9)),
                    r_max=float(r_max or 5.0),
                    num_channels=8,
                    max_L=1,
                    max_ell=2,
                    correlation=2,
                    radial_mlp=(16,),
                    mlp_irreps="8x0e",
                    dtype=dtype or "float64",
                )
        else:
            source = load_mace_model(path, trust_pickle=trust_pickle, trust_config=trust_config, rebuild=True)
        if not source.config:
            raise ValueError(f"{path}: the foundation model cannot be rebuilt from its hyperparameters")
        if r_max is not None and abs(float(r_max) - source.r_max) > 1e-6:
            raise ValueError(
                f"foundation model {path} has r_max={source.r_max} Å but the data's graphs use r_max={float(r_max)} Å "
                f"(data.r_max): fine-tuning keeps the foundation's cutoff; set data.r_max={source.r_max}"
            )
        if z_table is not None:
            from ase.data import chemical_symbols

            missing = sorted(set(int(z) for z in z_table) - set(source.z_table))
            if missing:
                names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
                raise ValueError(
                    f"foundation model {path} does not know element(s) {names} of the data (it knows "
                    f"{[chemical_symbols[z] for z in source.z_table]}): fine-tune a foundation that covers them, or "
                    "train from scratch (experiment=molecular/mace)"
                )
        config: dict[str, Any] = dict(source.config)
        config["features"] = features
        if dtype is not None:
            config["dtype"] = dtype
        super().__init__(**config)
        load_mace_state(self, source.state_dict())  # the data's elements map onto the foundation's one-hot order
        self.foundation = str(path)
        self.frozen = freeze_layers(self, freeze)

    def extra_repr(self) -> str:
        return f"foundation={self.foundation!r}, frozen={len(self.frozen)} parameters"


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
