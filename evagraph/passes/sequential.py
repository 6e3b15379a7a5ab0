"""Block-by-block (sequential) calibration pass: a partitioned graph and batches -> components.

Takes the ``ProbedGraph``, its ``Partition``, the batches, the settings and an ``Onloader``,
and returns the same ``Calibration`` as the incremental-SVD pass. Instead of running each
batch through the whole graph, it runs every batch through one block before the next: the
block's weights are loaded once (and released after), its input values for all batches come
from an ``ActivationCache`` (host memory, or files), its outputs go back there for the next
block, and the statistics of its layers exist only while it is calibrated.

The batches are fixed up front (all the data, or ``max_steps`` of it): a block cannot ask an
earlier, released one for more. Since the variance of later blocks is unknown when a block
finishes, a layer converges when every component with variance has (all ``k = round(budget
* rho)``, by the spec's criterion between consecutive minibatches), not only the components
its allotment needs: the conservative form of the spec's rule, which makes the statistics
valid for every budget up to ``k``. Allocation runs once, at the end (``EvaState.ranks``).

With a ``work_dir`` the cache lives in files there and the progress is saved after each
block, so that an interrupted run resumes from the last finished block with the same result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..activation_cache import ActivationCache
from ..config import CalibrationSettings
from ..data import batch_failed, call_model
from ..errors import ConfigError, DataError
from ..onload import Onloader
from ..stats import Components, Sync
from .incremental_svd import Calibration, _Calibrator, _finish
from .partition import Partition
from .probe import ProbedGraph

_PROGRESS = "progress.pt"
_FINGERPRINT = "fingerprint.json"


def calibrate_sequential(
    probed: ProbedGraph,
    part: Partition,
    batches: Iterable[Any],
    settings: CalibrationSettings,
    onloader: Onloader,
    *,
    device: torch.device,
    work_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    progress: bool = True,
    sync: Sync | None = None,
) -> Calibration:
    """Calibrate ``part``'s blocks one at a time on ``device`` (see the module docstring).

    ``work_dir``: where the activation cache and the progress live (None: host memory,
    spilling to a temporary directory if it outgrows half the machine's memory). ``resume``:
    continue the run saved there; ``fingerprint`` (JSON-able) must then equal the saved one.
    ``sync``: data parallel (``evagraph.distributed``); ``batches`` are this process's slices,
    and each process keeps its own cache and progress (in ``work_dir/rank<N>``).
    """
    run = _Calibrator(probed, settings, device, lazy=True, all_components=True, sync=sync)
    if sync is not None:  # each process resumes its own slices, with as many peers
        fingerprint = {**(fingerprint or {}), "processes": sync.world}
        if work_dir is not None:
            work_dir = Path(work_dir) / f"rank{sync.rank}"
    cache = ActivationCache(Path(work_dir) / "activations" if work_dir else None)
    blocks = part.blocks
    homes = _homes(probed, part)  # group -> index of the last block feeding it
    start, n = 0, None
    if resume:
        start, n = _load_progress(run, work_dir, _full_fingerprint(part, settings, fingerprint))
    elif work_dir is not None:
        _start_fresh(work_dir, _full_fingerprint(part, settings, fingerprint))
    try:
        if n is None:
            n = _cache_inputs(part, batches, settings, cache, sync)
        bar = tqdm(
            total=n * (len(blocks) - start),
            desc="EVA calibration (block by block)",
            unit="batch",
            disable=not progress,
        )
        try:
            for b in range(start, len(blocks)):
                _calibrate_block(run, part, b, n, homes, cache, onloader, device, bar)
                if work_dir is not None:
                    _save_progress(run, work_dir, b + 1, n)
                cache.drop(b)
        finally:
            bar.close()
            run.detach()
    finally:
        cache.close()
    steps = max((grp.seen for grp in run.groups.values()), default=0)
    return _finish(run, steps)


def _homes(probed: ProbedGraph, part: Partition) -> dict[str, int]:
    block_of = {p: i for i, blk in enumerate(part.blocks) for p in blk.probes}
    return {g: max(block_of[p] for p in ps) for g, ps in probed.group_probes.items()}


def _cache_inputs(
    part: Partition,
    batches: Iterable[Any],
    settings: CalibrationSettings,
    cache: ActivationCache,
    sync: Sync | None,
) -> int:
    """Every calibration batch's graph inputs into generation 0; returns how many."""
    needed = {n for blk in part.blocks for n in blk.inputs}
    n = 0
    for batch in batches:
        if settings.max_steps is not None and n >= settings.max_steps:
            break
        error = None
        try:
            with torch.no_grad():
                values = call_model(part.head, batch)
        except Exception as err:
            error = batch_failed(n, err)
            error.__cause__ = err
        if sync is not None:
            sync.settle(error)
        if error is not None:
            raise error
        cache.write(0, n, {k: v for k, v in zip(part.head_names, values) if k in needed})
        n += 1
    if n == 0:
        raise DataError("the calibration data is empty: no batch was produced")
    return n


def _calibrate_block(
    run: _Calibrator,
    part: Partition,
    b: int,
    n: int,
    homes: dict[str, int],
    cache: ActivationCache,
    onloader: Onloader,
    device: torch.device,
    bar: tqdm,
) -> None:
    """All ``n`` batches through block ``b``: its groups' statistics open, then closed."""
    block = part.blocks[b]
    last = b == len(part.blocks) - 1
    mine = [g for g, ps in run.probed.group_probes.items() if any(p in block.probes for p in ps)]
    for g in mine:
        if run.groups[g].stat is None and run.groups[g].final is None:
            run.open(g)
    onloader.load(block.weights)
    try:
        for j in range(n):
            # Groups fed by later blocks too see every batch here; theirs is the later check.
            active = [g for g in mine if _unconverged(run, g)]
            for p in block.probes:
                run.probed.probes[p].active = any(g in active for g in run.probe_groups[p])
            if not active and last:
                bar.update(n - j)
                break
            env = cache.read(b, j, device)
            outs = _run_block(run, block.gm, [env[name] for name in block.inputs], j)
            env.update(zip(block.outputs, outs))
            if not last:
                cache.write(b + 1, j, {name: env[name] for name in block.live_after})
            checked = [g for g in active if homes[g] == b]
            if checked:
                run.estimate(checked, j)
                run.update_convergence(j)
            bar.update(1)
    finally:
        onloader.release(block.weights)
    for g in mine:
        if homes[g] == b:
            grp = run.groups[g]
            if grp.ratios is not None and not bool((grp.ratios > 0).any()):
                # No variance to converge on: rank 0 whatever the budget.
                for m in grp.layers:
                    run.converged_at[m] = run.converged_at[m] or grp.seen
            run.close(g)


def _unconverged(run: _Calibrator, g: str) -> bool:
    return run.groups[g].stat is not None and any(
        run.converged_at[m] is None for m in run.groups[g].layers
    )


def _run_block(run: _Calibrator, gm: torch.nn.Module, args: list[Any], step: int) -> tuple:
    out: list[Any] = []
    run.forward(gm, args, lambda m, a: out.extend(m(*a)), step)
    return tuple(out)


# Resume: the progress after each finished block, and what it must match.


def _full_fingerprint(part: Partition, settings: CalibrationSettings, extra: dict | None) -> dict:
    return {
        "settings": settings.to_dict(),
        "blocks": [blk.key for blk in part.blocks],
        "inputs": part.head_names,
        **(extra or {}),
    }


def _start_fresh(work_dir: str | Path, fingerprint: dict) -> None:
    work = Path(work_dir)
    for stale in (work / _PROGRESS, work / _FINGERPRINT):
        stale.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    _atomic_write(work / _FINGERPRINT, json.dumps(fingerprint, sort_keys=True, default=str))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_progress(run: _Calibrator, work_dir: str | Path, next_block: int, n: int) -> None:
    path = Path(work_dir) / _PROGRESS
    if any(grp.stat is not None for grp in run.groups.values()):
        # A layer called from several blocks (shared weights) is still being fed: its
        # statistic is not saved, so no resume point is valid until it closes.
        path.unlink(missing_ok=True)
        return
    groups = {}
    for g, grp in run.groups.items():
        if grp.final is None:
            continue
        groups[g] = {
            "final": vars(grp.final),
            "n_rows": grp.n_rows,
            "seen": grp.seen,
            "runs": grp.runs,
            "component_ok": grp.component_ok,
            "ratios": grp.ratios,
        }
    state = {
        "next_block": next_block,
        "batches": n,
        "groups": groups,
        "converged_at": {m: at for m, at in run.converged_at.items() if at is not None},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # the progress is whole or the previous one


def _load_progress(run: _Calibrator, work_dir: str | Path | None, fingerprint: dict) -> tuple:
    work = Path(work_dir) if work_dir is not None else None
    if work is None or not (work / _PROGRESS).is_file():
        raise ConfigError(
            f"nothing to resume: {work} holds no saved progress of a block-by-block "
            "calibration (no block had finished, or it was never started there)"
        )
    saved = json.loads((work / _FINGERPRINT).read_text())
    now = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError(
            f"cannot resume from {work}: it was started with other {', '.join(diff)}; run "
            "again without resume to start over"
        )
    state = torch.load(work / _PROGRESS, weights_only=True)
    for g, rec in state["groups"].items():
        grp = run.groups[g]
        grp.final = Components(**rec["final"])
        grp.n_rows, grp.seen, grp.runs = rec["n_rows"], rec["seen"], rec["runs"]
        grp.component_ok, grp.ratios = rec["component_ok"], rec["ratios"]
    run.converged_at.update(state["converged_at"])
    return state["next_block"], state["batches"]
