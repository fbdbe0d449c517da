"""One intermediates contract for every backbone and every teacher, in both domains.

Every network that alignment or ``unirep-converge`` reads implements::

    forward_intermediates(inputs, indices) -> (out, list[TokenSet])

``out`` is what the network's ``forward`` returns (a velocity; energy and forces), computed by the same pass, so a
task never runs a second forward to read features. ``indices`` name the hidden states to return, with one index
convention everywhere (timm's ``feature_take_indices``, ``timm/models/_features.py``):

- ``0`` is the embedded input (patch embedding plus positions; the atoms' initial node features),
- ``1 .. L`` is the output of block / interaction / layer ``k`` (REPA's ``encoder_depth=8`` is index 8),
- a negative index counts from the end: ``-1`` is the last block ``L``.

Unlike timm, a single ``int`` means that one layer (a config's ``layer: 4``), not "the last four"; ``None`` means
all of ``0 .. L``. A network also exposes ``feature_dim(index) -> int`` so projectors are built with the right
width before the first step, and may expose ``num_layers`` (= L) and ``layer_names``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["feature_take_indices", "normalize_index"]


def normalize_index(index: int, num_layers: int, what: str = "network") -> int:
    """Map one index to ``0 .. num_layers`` (negative counts from the end); out of range raises naming both."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"layer index must be an int, got {index!r} ({type(index).__name__})")
    k = num_layers + 1 + index if index < 0 else index
    if not 0 <= k <= num_layers:
        raise ValueError(
            f"layer index {index} is outside the {what}'s layers: use 0 (embedded input), 1..{num_layers} "
            f"(output of block k) or -1..-{num_layers + 1} (from the end)"
        )
    return k


def feature_take_indices(
    num_layers: int, indices: int | Sequence[int] | None = None, what: str = "network"
) -> list[int]:
    """Normalised indices of the hidden states to return (order kept; duplicates kept for the caller's zip).

    ``num_layers`` is L, the number of blocks; valid indices are ``0 .. L`` and ``-(L + 1) .. -1``.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if indices is None:
        return list(range(num_layers + 1))
    if isinstance(indices, int) and not isinstance(indices, bool):
        return [normalize_index(indices, num_layers, what)]
    return [normalize_index(int(i) if not isinstance(i, int) else i, num_layers, what) for i in indices]
