"""Seeded, disjoint index splits of a data set (domain-agnostic: structures, molecules, images)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["split_indices"]


def split_indices(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, sizes: Sequence[int] | None = None
) -> list[list[int]]:
    """Disjoint random index splits of ``range(n)``, fixed by ``seed``, each sorted.

    The splits take ``sizes`` items each when given, else ``fractions`` of ``n`` (rounded; the last split takes
    the remainder). One permutation is cut in order, so a split's items do not depend on the sizes after it.
    """
    perm = np.random.default_rng(seed).permutation(n).tolist()
    if sizes is None:
        sizes = [int(round(f * n)) for f in fractions]
        sizes[-1] = max(0, n - sum(sizes[:-1]))
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} ask for {sum(sizes)} items but the set has {n}")
    out, start = [], 0
    for s in sizes:
        out.append(sorted(perm[start : start + s]))
        start += s
    return out
