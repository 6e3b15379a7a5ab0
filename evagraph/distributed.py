"""Data-parallel calibration over ``torch.distributed``: one home for what processes share.

``current()`` returns a ``Sync`` when ``torch.distributed`` is initialised with more than one
process (by the user, or by the CLI under ``torchrun``), else None. A ``Sync`` is what the
rest of evagraph asks of the other processes:

- ``shards(batches)``: every process iterates the same global batches and keeps its slice of
  each (``torch.tensor_split`` along the first dimension), after checking that all processes
  have a batch and that it is the same one;
- ``owners(costs)``: which process owns each decomposition (its statistic's update, eigen
  work and convergence check), balancing the per-minibatch cost, the same on every process
  without communication;
- ``reduce(dst, ...)``: sums of the products of the rows to the owner only (rows never
  travel); ``sum``/``max`` all-reduce what every process needs (row counts, means, scales,
  the packed convergence flags, so that every process takes the same decisions);
- ``broadcast(tensor, src)``/``share(obj, src)``: what an owner computed that the others need
  (a sketch's basis, final components);
- ``settle(error)``: after each forward, whether any process failed, so all stop together.

A process whose forward failed half-way must still join the collectives its peers are waiting
in: the calibration loop feeds the probes it did not reach rows of weight 0 (``Probe.replay``).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .errors import DataError, EvagraphError, EvagraphWarning


class PeerFailed(EvagraphError):
    """Another process failed; its error is shown by that process (this one stays quiet)."""


class Sync:
    """Collectives over a process group for calibration (see the module docstring)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # NCCL reduces CUDA tensors only; flags and checksums travel on this device.
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self.payload_bytes = 0  # bytes handed to collectives by this process (benchmarks)
        self.collectives = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- reductions ------------------------------------------------------------------------

    def _reduce(self, flat: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        self.payload_bytes += flat.numel() * flat.element_size()
        self.collectives += 1
        dist.all_reduce(flat, op=op, group=self.group)
        return flat

    def sum(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Element-wise sums over all processes, one all-reduce per dtype (new tensors)."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = self._reduce(torch.cat([tensors[i].reshape(-1) for i in idx]), dist.ReduceOp.SUM)
            for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = part.view(tensors[i].shape)
        return out  # type: ignore[return-value]

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor.clone(), dist.ReduceOp.MAX)

    def reduce(self, dst: int, *tensors: torch.Tensor) -> list[torch.Tensor] | None:
        """Element-wise sums over all processes on process ``dst`` (new tensors, one reduce
        per dtype); None on the others. Half the traffic of ``sum`` (ring algorithms), and
        only ``dst`` holds the result."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            self.payload_bytes += flat.numel() * flat.element_size()
            self.collectives += 1
            dist.reduce(flat, self._global(dst), op=dist.ReduceOp.SUM, group=self.group)
            for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = part.view(tensors[i].shape)
        return out if self.rank == dst else None  # type: ignore[return-value]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Process ``src``'s ``tensor`` on every process (in place, returned)."""
        moved = tensor.to(self.device) if self.device is not None else tensor
        self.payload_bytes += moved.numel() * moved.element_size()
        self.collectives += 1
        dist.broadcast(moved, src=self._global(src), group=self.group)
        return moved.to(tensor.device) if moved is not tensor else tensor

    def share(self, obj: Any, src: int) -> Any:
        """Process ``src``'s picklable ``obj`` on every process (final components: once per
        decomposition, so pickling costs nothing that matters)."""
        box = [obj if self.rank == src else None]
        self.payload_bytes += len(pickle.dumps(box))  # what the collective is handed
        self.collectives += 1
        dist.broadcast_object_list(box, src=self._global(src), group=self.group, device=self.device)
        return box[0]

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def owners(self, costs: Mapping[str, float]) -> dict[str, int]:
        """An owner process for each key of ``costs`` (see ``owners``)."""
        return owners(costs, self.world)

    def _host(self, values: list[float]) -> torch.Tensor:
        """Max over processes of ``values`` and of their negatives (so min too), float64."""
        v = torch.tensor(values, dtype=torch.float64)
        both = torch.cat([v, -v]).to(self.device or "cpu")
        both = self._reduce(both, dist.ReduceOp.MAX).cpu()
        return both.view(2, -1)

    # -- batches ---------------------------------------------------------------------------

    def shards(self, batches: Iterable[Any]) -> Iterator[Any]:
        """This process's slice of each global batch (see the module docstring)."""
        it = iter(batches)
        step = 0
        while True:
            batch = next(it, None)
            n = _samples(batch) if batch is not None else 0
            mine = [1.0, float(n), _checksum(batch)] if batch is not None else [0.0, 0.0, 0.0]
            high, low = self._host(mine)
            low = -low
            if high[0] == 0:
                return
            if low[0] == 0:
                raise DataError(
                    f"the processes ran out of calibration batches at different points (batch "
                    f"{step}): under torch.distributed every process must iterate the same "
                    "global batches (evagraph gives each process its slice)"
                )
            if high[1] != low[1] or not _close(high[2], low[2]):
                raise DataError(
                    f"calibration batch {step} differs between processes: under "
                    "torch.distributed every process must pass the same global batches "
                    "(evagraph gives each process its slice; do not shard the data "
                    "yourself, e.g. with a DistributedSampler)"
                )
            if n < self.world:
                if self.main:
                    warnings.warn(
                        f"calibration batch {step} has {n} sample(s), fewer than the "
                        f"{self.world} processes: it is left out (use a batch size of at "
                        "least the number of processes)",
                        EvagraphWarning,
                        stacklevel=2,
                    )
            else:
                yield shard(batch, self.rank, self.world)
            step += 1

    # -- failures --------------------------------------------------------------------------

    def settle(self, error: BaseException | None) -> None:
        """After a forward: if any process failed, every process raises. The lowest failing
        process raises its own error; the others raise ``PeerFailed``."""
        failed = error is not None
        # Max of -rank over the failing processes: the lowest of them.
        high, _ = self._host([float(failed), -float(self.rank if failed else self.world)])
        if high[0] == 0:
            return
        first = int(-high[1])
        if error is not None and first == self.rank:
            error.evagraph_own_failure = True  # the one process that shows it (CLI)
            raise error
        raise PeerFailed(f"process {first} failed (its error is shown by that process)")


def owners(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """Each key (a decomposition, in graph order) to the process with the least cost so far
    (ties: the lowest rank). Deterministic, so every process computes the same owners; in
    graph order, so the groups of one block (block by block, only they work at once) spread
    over the processes too."""
    load = [0.0] * world
    out = {}
    for key, cost in costs.items():
        r = min(range(world), key=lambda i: (load[i], i))
        out[key] = r
        load[r] += cost
    return out


def current() -> Sync | None:
    """A ``Sync`` over the default process group when it spans more than one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Sync()
    return None


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or a launcher that sets its env)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def shows(err: BaseException | None) -> bool:
    """Whether this process shows ``err`` (None: an interruption): process 0 shows what all
    processes share (settings, model, data errors), a process whose own slice failed shows
    that error (``Sync.settle`` marks it), and the others stay quiet."""
    sync = current()
    if sync is None:
        return True
    if getattr(err, "evagraph_own_failure", False):
        return True
    return sync.main and not isinstance(err, PeerFailed)


def whose(err: BaseException) -> str:
    """``"process N: "`` for an error only process N met (its slice of the data), else ``""``."""
    if getattr(err, "evagraph_own_failure", False):
        return f"process {os.environ.get('RANK', '?')}: "
    return ""


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes: NCCL for CUDA, else gloo. Returns the
    device this process computes on (``cuda:LOCAL_RANK`` for a bare ``cuda``)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(batch: Any, rank: int, world: int) -> Any:
    """Slice ``rank`` of ``world`` of every tensor with a first (sample) dimension."""
    n = _samples(batch)

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() and value.shape[0] == n:
                return torch.tensor_split(value, world)[rank]
            return value
        if isinstance(value, Mapping):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        return value

    return cut(batch)


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _samples(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor with one."""
    return next((t.shape[0] for t in _tensors(batch) if t.dim()), 1)


def _checksum(batch: Any) -> float:
    total = 0.0
    for t in _tensors(batch):
        if t.is_floating_point() or t.is_complex():
            t = t.detach().abs()
        total += float(t.double().sum()) + t.numel()
    return total


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs() <= 1e-9 * max(abs(float(a)), abs(float(b)), 1.0))
