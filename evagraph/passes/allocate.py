"""Allocation pass: explained-variance ratios per layer -> a rank per layer.

Takes each target layer's explained-variance ratios (descending, one per component), the
budget ``r`` and ``rho``, and optionally the groups of layers that share one decomposition,
and returns ``{layer: rank}``: the first ``k = round(r * rho)`` ratios of every layer are
ranked together and the top ``r * L`` kept; a layer's rank is how many of its own were kept
(0..k). With rho = 1 every layer gets r (when it has r components). Components with zero
variance (ratio 0) are never kept, so the ranks sum to less than ``r * L`` only when fewer
than that many components carry variance.

Layers of a shared-input group carry identical ratios, so the cut can fall inside a tie.
Ties are resolved exactly as PEFT's EVA resolves them (the same ``torch.argsort`` over the
same order, group leaders first, then the leader takes the highest rank of its group), so
evagraph and PEFT give the same ranks for the same numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch


def allocate(
    ratios: Mapping[str, torch.Tensor],
    budget: int,
    rho: float,
    groups: Sequence[Sequence[str]] | None = None,
) -> dict[str, int]:
    """Global top-(budget * L) allocation of ranks over the layers in ``ratios``."""
    k = round(budget * rho)
    names = list(ratios)
    groups = [list(g) for g in groups] if groups is not None else [[n] for n in names]
    order = [g[0] for g in groups] + [m for g in groups for m in g[1:]]
    if sorted(order) != sorted(names):
        raise ValueError("groups must partition the layers in ratios")
    per_layer = [torch.as_tensor(ratios[n]).detach().flatten()[:k].float().cpu() for n in order]
    owners = [n for n, v in zip(order, per_layer) for _ in range(len(v))]
    values = torch.cat(per_layer)
    kept = torch.argsort(values, descending=True)[: budget * len(names)]
    kept = kept[values[kept] > 0]  # a zero-variance direction is no component: its rank is lost
    counts = Counter(owners[i] for i in kept.tolist())
    ranks = {n: counts.get(n, 0) for n in names}
    for g in groups:  # the group's leader takes the highest rank among its members
        for member in g[1:]:
            if ranks[member] > ranks[g[0]]:
                ranks[member], ranks[g[0]] = ranks[g[0]], ranks[member]
    return ranks
