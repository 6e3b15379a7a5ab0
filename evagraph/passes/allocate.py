"""Allocation pass: explained-variance ratios per layer -> a rank per layer.

Takes each target layer's explained-variance ratios (descending, one per component) and the
budget ``r`` and ``rho``, and returns ``{layer: rank}``: the first ``k = round(r * rho)``
ratios of every layer are ranked together and the top ``r * L`` are kept; a layer's rank is
how many of its own were kept (0..k). Ties break by layer order, then component index, so
the result is deterministic. With rho = 1 every layer gets r (when it has r components).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def allocate(ratios: Mapping[str, torch.Tensor], budget: int, rho: float) -> dict[str, int]:
    """Global top-(budget * L) allocation of ranks over the layers in ``ratios``."""
    k = round(budget * rho)
    names = list(ratios)
    entries = [
        (-float(v), li, ci)
        for li, name in enumerate(names)
        for ci, v in enumerate(torch.as_tensor(ratios[name]).flatten()[:k].tolist())
    ]
    entries.sort()
    ranks = dict.fromkeys(names, 0)
    for _, li, _ in entries[: budget * len(names)]:
        ranks[names[li]] += 1
    return ranks
