"""Whole-graph calibration: every batch through the whole probed graph, until every layer's
current allotment converged.

After each batch the allotment is computed again (the allocation pass) on the ratios seen so
far, so a layer needs only the components its allotment gives it; groups whose layers all
converged stop being probed (the graph is cut to the probes still in use, and their
statistics leave the GPU), and start again if an allotment grows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import CalibrationSettings
from ..errors import DataError
from ..onload import Onloader
from ..state import EvaState
from ..stats import Sync
from .base import Pipeline, Traced, register
from .calibrator import Calibrator


@register("whole")
class Whole(Pipeline):
    """Calibrate on the whole graph, the model's weights where they are."""

    def run(
        self,
        traced: Traced,
        batches: Iterator[Any],
        settings: CalibrationSettings,
        *,
        forward: Callable[[torch.nn.Module, Any], Any],
        device: torch.device,
        total: int | None,
        progress: bool,
        sync: Sync | None,
        onloader: Onloader | None = None,
    ) -> EvaState:
        """Stream ``batches`` through the probed graph until every target layer converges.

        Stops when all layers converged, the batches run out, or ``settings.max_steps`` is
        reached; the last two warn with ``ConvergenceWarning`` naming the unconverged layers.
        Each batch runs only the part of the graph that feeds probes still in use
        (``slice_to_probes``), so a custom ``forward`` must return nothing it relies on (the
        model's outputs are cut).
        """
        run = Calibrator(traced, settings, device, sync=sync)
        steps = 0
        if settings.max_steps is not None:
            total = settings.max_steps if total is None else min(total, settings.max_steps)
        bar = tqdm(total=total, desc="EVA calibration", unit="batch", disable=not progress)
        ever: set[str] = set()  # layers that converged at some point
        try:
            for batch in batches:
                active = run.active()
                if not active or (settings.max_steps is not None and steps >= settings.max_steps):
                    break
                run.forward(run.module_for(active), batch, forward, steps)
                run.estimate(active, steps)
                run.allocate()
                run.update_convergence(steps)
                steps += 1
                bar.update(1)
                now = {m for m, at in run.converged_at.items() if at is not None}
                ever |= now
                # A grown allotment re-opens a converged layer: the count goes down, and says why.
                again = f", {len(ever - now)} re-opened (allotment grew)" if ever - now else ""
                bar.set_postfix_str(f"{len(now)}/{len(run.converged_at)} layers converged{again}")
        finally:
            bar.close()
            run.detach()
        if steps == 0:
            raise DataError("the calibration data is empty: no batch was produced")
        return run.finish(steps)
