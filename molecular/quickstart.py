"""The MACE-REPA quick start's teacher: the project's own pre-trained "foundation" MACE, an artifact that is loaded.

No weights can be downloaded here, so the teacher is made once by a recipe on the one Trainer and saved in the
project's MACE format (``model.json`` + ``model.safetensors``, :func:`molecular.teachers.save_mace_model`):

- ``unirep-train experiment=molecular/foundation_quick``: a small MACE pre-trained on a broad GFN2-xTB set of ~300
  QM9 molecules (made first when missing) in a few CPU minutes, exported to ``data/molecular/foundation_quick``;
- ``unirep-train experiment=molecular/foundation``: the larger one, exported to ``data/molecular/foundation``.

:func:`foundation_teacher` only loads that folder; when it is missing it stops with the command that makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from molecular.teachers.mace import mace_teacher, random_mace_teacher
from unirep.encoders import FrozenEncoder

__all__ = ["foundation_teacher", "foundation_command", "FOUNDATION_RECIPES"]

# export folder -> the recipe that makes it (each recipe's task.export default)
FOUNDATION_RECIPES = {
    "data/molecular/foundation_quick": "experiment=molecular/foundation_quick",
    "data/molecular/foundation": "experiment=molecular/foundation",
}


def foundation_command(path: str | Path) -> str:
    """The exact command that makes the foundation teacher at ``path``."""
    p = Path(path)
    for folder, recipe in FOUNDATION_RECIPES.items():
        if p.resolve() == Path(folder).resolve():
            return f"unirep-train {recipe}"
    return f"unirep-train experiment=molecular/foundation task.export={p}"


def foundation_teacher(
    path: str,
    layers: Sequence[int] = (-1,),
    invariant: bool = True,
    cache_dir: str | None = "data/cache/molecular/teacher",
    z_table: Sequence[int] = (1, 6, 7, 8, 9),
    random_init: bool = False,
    features: str | None = None,
    trust_config: bool = False,
) -> FrozenEncoder:
    """The project's own pre-trained MACE as a frozen teacher (hydra target); it never trains.

    ``path`` is a saved MACE (project format folder, or a unirep checkpoint folder of a foundation run). A missing
    ``path`` stops with the command that makes it. ``layers`` are the teacher's default layers (0: node embedding,
    k: interaction k, -1: the last). ``random_init=True`` gives a tiny random teacher over ``z_table`` instead (smoke
    runs and tests).
    """
    if random_init:
        return random_mace_teacher(z_table, layers=layers, cache_dir=None)
    if not Path(path).exists():
        raise FileNotFoundError(
            f"the foundation teacher {path} does not exist. Make it once with\n    {foundation_command(path)}\n"
            "or point task.teacher.path at a trained MACE (molecular.teachers.mace_teacher takes MACE-MP/OFF files "
            "with trust_pickle=true), or set task.teacher.random_init=true for a smoke run"
        )
    return mace_teacher(
        str(path),
        layers=layers,
        invariant=invariant,
        cache_dir=cache_dir,
        features=features,
        trust_config=trust_config,
    )
