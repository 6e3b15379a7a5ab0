"""Block-by-block (sequential) calibration: one block of the graph at a time, with only its
weights resident.

The probed graph is cut into blocks (the partition pass). Instead of running each batch
through the whole graph, every batch runs through one block before the next: the block's
weights are loaded once by the ``Onloader`` (and released after), its input values for all
batches come from an ``ActivationCache`` (host memory, or files), its outputs go back there
for the next block, and the statistics of its layers exist only while it is calibrated.

The batches are fixed up front (all the data, or ``max_steps`` of it): a block cannot ask an
earlier, released one for more. Since the variance of later blocks is unknown when a block
finishes, a layer converges when every component with variance has (all ``k = round(budget
* rho)``, by the spec's criterion between consecutive minibatches), not only the components
its allotment needs: the conservative form of the spec's rule, which makes the statistics
valid for every budget up to ``k``. Allocation runs once, at the end (``EvaState.ranks``).

With a ``work_dir`` the cache lives in files there and the progress is saved after each
block, so that an interrupted run resumes from the last finished block with the same result.
The layout of that directory (its files, their digests, its lock) lives at the end of this
module, and so does where the command line keeps it (``work_dir_for``, ``resumable``,
``check_unused``, ``remove_work_dir``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..activation_cache import ActivationCache, load_verified, read_verified, save_hashed
from ..config import CalibrationSettings
from ..errors import ConfigError, DataError, EvagraphError, OutputError
from ..onload import Onloader, ShardedCheckpoint, execution_device
from ..passes.partition import Block, Partition, partition
from ..passes.probe import ProbedGraph
from ..runtime import batch_failed, call_model, model_device
from ..state import EvaState
from ..stats import Sync
from .base import Pipeline, Traced, register
from .calibrator import Calibrator


@register("blockwise")
@dataclass
class Blockwise(Pipeline):
    """Calibrate one block at a time (see the module docstring).

    max_bytes: bound on the weights resident at once (None: one block at a time). weights:
    the checkpoint the model's meta-device weights are read from. work_dir: where the
    activation cache and the progress live (None: host memory, spilling to a temporary
    directory if it outgrows half the machine's memory); it is locked for the whole
    calibration, so another run into it is refused. resume: continue the run saved there;
    ``fingerprint`` (JSON-able: what the caller's inputs were) must then equal the saved one.
    Data parallel, each process keeps its own cache and progress (in ``work_dir/rank<N>``).
    """

    max_bytes: int | None = None
    weights: ShardedCheckpoint | None = None
    work_dir: Path | None = None
    resume: bool = False
    fingerprint: dict | None = None
    resident: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.resume and self.work_dir is None:
            raise ConfigError("resume needs the work_dir the interrupted calibration used")

    def check(self, forward_fn: Callable | None) -> None:
        if forward_fn is not None:
            raise ConfigError(
                "forward_fn cannot be used with block-by-block calibration: the blocks are "
                "called with the graph's own inputs; pass batches the model takes as they are"
            )

    def default_device(self, model: nn.Module) -> torch.device:
        """Accelerate's execution device of an offloaded model, else where the model is."""
        return execution_device(model) or model_device(model)

    @contextlib.contextmanager
    def placed(self, model: nn.Module, device: torch.device) -> Iterator[Onloader]:
        """Placeholders for the model's weights, which each block loads for its turn."""
        onloader = Onloader(model, device, self.weights)
        with onloader.installed():
            yield onloader

    def run(
        self,
        traced: Traced,
        batches: Iterator[Any],
        settings: CalibrationSettings,
        *,
        forward: Callable[[nn.Module, Any], Any],
        device: torch.device,
        total: int | None,
        progress: bool,
        sync: Sync | None,
        onloader: Onloader | None,
    ) -> EvaState:
        """All batches through each block of ``traced``'s graph in turn (see the module
        docstring); ``onloader`` loads each block's weights."""
        assert onloader is not None  # installed by placed()
        part = partition(traced.probed, self.max_bytes)
        run = Calibrator(traced, settings, device, lazy=True, all_components=True, sync=sync)
        fingerprint = self.fingerprint
        if sync is not None:  # each process resumes its own slices, with as many peers
            fingerprint = {**(fingerprint or {}), "processes": sync.world}
        fingerprint = _full_fingerprint(part, settings, fingerprint)
        work = _WorkDir(self.work_dir, sync.rank if sync else None) if self.work_dir else None
        cache = ActivationCache(work.activations if work is not None else None)
        with contextlib.ExitStack() as held:
            held.callback(cache.close)
            start, n = self._start(work, run, fingerprint, len(part.blocks), cache, held, sync)
            if n is None:
                n = _cache_inputs(part, batches, settings, cache, sync)
            elif progress:
                blocks = len(part.blocks)
                tqdm.write(
                    f"evagraph: resuming after block {start} of {blocks} ({start * n} of "
                    f"{blocks * n} batch-steps done)",
                    file=sys.stderr,
                )
            _run_blocks(run, part, start, n, cache, onloader, device, work, progress)
        return run.finish(run.steps())

    def _start(
        self,
        work: _WorkDir | None,
        run: Calibrator,
        fingerprint: dict,
        blocks: int,
        cache: ActivationCache,
        held: contextlib.ExitStack,
        sync: Sync | None,
    ) -> tuple[int, int | None]:
        """The work directory locked, and the resume point restored (``resume``) or the
        directory started afresh; returns (the next block, the batches, if resumed)."""
        if work is None:
            return 0, None
        start, n, error = 0, None, None
        try:
            # One lock for the whole directory, held by process 0 under torchrun: the
            # settle below tells every process before any of them touches its files.
            if sync is None or sync.main:
                held.enter_context(work_lock(self.work_dir))
            if self.resume:
                start, n = work.resume(run, fingerprint, blocks, cache)
        except EvagraphError as err:
            error = err
        if sync is not None:
            sync.settle(error)  # all raise if any failed, none waits for the others
        elif error is not None:
            raise error
        if not self.resume:
            work.start(fingerprint)
        return start, n


def _run_blocks(
    run: Calibrator,
    part: Partition,
    start: int,
    n: int,
    cache: ActivationCache,
    onloader: Onloader,
    device: torch.device,
    work: _WorkDir | None,
    progress: bool,
) -> None:
    """Blocks ``start``.. of ``part``, each on all ``n`` cached batches, saving the resume
    point after each (with a work directory)."""
    homes = _homes(run.probed, part)  # group -> index of the last block feeding it
    blocks = part.blocks
    bar = tqdm(
        total=n * (len(blocks) - start),
        desc="EVA calibration (block by block)",
        unit="batch",
        disable=not progress,
    )
    try:
        for b in range(start, len(blocks)):
            _calibrate_block(run, part, b, n, homes, cache, onloader, device, bar)
            if work is not None:
                work.save(run, b + 1, n, cache)
            cache.drop(b)  # after the save: until then they are the resume point's
    finally:
        bar.close()
        run.detach()


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
    run: Calibrator,
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
    run.open_new(mine)
    onloader.load(block.weights)
    try:
        for j in range(n):
            # Groups fed by later blocks too see every batch here; theirs is the later check.
            active = run.unconverged(mine)
            run.switch_probes(active, block.probes)
            if not active and last:
                bar.update(n - j)
                break
            env, outs = _run_block(run, block, partial(cache.read, b, j, device), j)
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
            run.close(g)  # a group without variance: converged, rank 0 whatever the budget


def _run_block(
    run: Calibrator, block: Block, read: Callable[[], dict[str, Any]], step: int
) -> tuple[dict[str, Any], tuple]:
    """One batch through ``block``: its inputs from ``read()``, returned with the outputs.

    The inputs are read inside the forward: data parallel, a process that cannot read its
    file (changed on disk, missing) then fails as a failing forward does, and its peers,
    whose collectives it completes, fail with it instead of waiting for it."""
    env: dict[str, Any] = {}
    out: list[Any] = []

    def forward(gm: torch.nn.Module, _: Any) -> None:
        env.update(read())
        out.extend(gm(*[env[name] for name in block.inputs]))

    run.forward(block.gm, None, forward, step)
    return env, tuple(out)


# The work directory: what a resumed run continues from, and who may use it.
#
#   work_dir/lock                      flock'd by the run using the directory (process 0's
#                                      under torchrun); holds "pid N on HOST", to name it
#   [work_dir/rank<N>/]                each process's own files under torchrun:
#       fingerprint.json               what a resume must share with the run (settings...)
#       progress-<B>.pt                the statistics once blocks 0..B-1 finished
#       activations/gen<B % 2>/<j>.pt  batch j's inputs of block B (``ActivationCache``)
#       manifest.json                  the resume point: which progress file, and the sha256
#                                      of every file it needs (fingerprint, progress, inputs)
#
# Each file is hashed as it is written. The manifest is written last, whole or not at all,
# after each block: before it, the previous manifest still names the previous progress
# file and inputs, which are only removed after it. A resume checks every file against its
# digest as it reads it (the inputs when a block reads them), so a file changed since it
# was written is refused, never used.

_LOCK = "lock"
_FINGERPRINT = "fingerprint.json"
_MANIFEST = "manifest.json"
_PROGRESS = re.compile(r"progress-[0-9]+\.pt")

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock, the directory is used as it is
    fcntl = None  # type: ignore[assignment]


def process_dir(work_dir: str | Path, rank: int | None = None) -> Path:
    """Where one process keeps its files: ``work_dir``, or ``work_dir/rank<N>`` for process
    ``rank`` of a data-parallel run (``None``: not data parallel)."""
    return Path(work_dir) / f"rank{rank}" if rank is not None else Path(work_dir)


def resume_point(work_dir: str | Path, rank: int | None = None) -> Path:
    """The file that makes a run in ``work_dir`` resumable (process ``rank``'s): it exists
    once a block has finished."""
    return process_dir(work_dir, rank) / _MANIFEST


def work_dir_for(outdir: str | Path) -> Path:
    """Where a block-by-block calibration into ``outdir`` keeps its activations and progress
    (the command line's): ``.OUTDIR.evagraph-work`` beside it."""
    out = Path(outdir).absolute()
    return out.parent / f".{out.name}.evagraph-work"


def resumable(work_dir: str | Path) -> bool:
    """Whether ``work_dir`` holds a finished block to continue from: this process's, under
    torchrun (each keeps its own slices' activations)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return resume_point(work_dir, int(os.environ.get("RANK", "0")) if world > 1 else None).is_file()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # whole or the previous one


def _not_ours(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path} is not {what} evagraph wrote; start again without --resume")


class _WorkDir:
    """One process's files in a work directory (see the layout above)."""

    def __init__(self, work_dir: str | Path, rank: int | None) -> None:
        self.path = process_dir(work_dir, rank)
        self.activations = self.path / "activations"
        self._fingerprint_sha = ""
        self._progress: str | None = None  # the progress file the manifest names

    def start(self, fingerprint: dict) -> None:
        """A fresh run: whatever an earlier one left is removed, the manifest first (so that
        nothing is resumable while the rest goes)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / _MANIFEST).unlink(missing_ok=True)
        for old in self.path.iterdir():
            if old.name.startswith(("progress", "fingerprint", "manifest")):
                old.unlink(missing_ok=True)
        shutil.rmtree(self.activations, ignore_errors=True)
        data = json.dumps(fingerprint, sort_keys=True, default=str).encode()
        _atomic_write(self.path / _FINGERPRINT, data)
        self._fingerprint_sha = _sha256(data)

    def save(self, run: Calibrator, next_block: int, n: int, cache: ActivationCache) -> None:
        """The resume point after block ``next_block - 1``: its progress and its outputs."""
        manifest = self.path / _MANIFEST
        snapshot = run.snapshot()
        if snapshot is None:
            # A layer called from several blocks (shared weights) is still being fed: its
            # statistic is not saved, so no resume point is valid until it closes (and the
            # previous one's inputs are about to go).
            manifest.unlink(missing_ok=True)
            self._drop_progress()
            return
        name = f"progress-{next_block}.pt"
        progress = {"next_block": next_block, "batches": n, **snapshot}
        files = {
            _FINGERPRINT: self._fingerprint_sha,
            name: save_hashed(progress, self.path / name),
        }
        for j, sha in sorted(cache.digests(next_block).items()):
            files[f"activations/{cache.relative(next_block, j)}"] = sha
        _atomic_write(manifest, json.dumps({"progress": name, "sha256": files}, indent=1).encode())
        if self._progress != name:
            self._drop_progress()
        self._progress = name

    def _drop_progress(self) -> None:
        if self._progress is not None:
            (self.path / self._progress).unlink(missing_ok=True)
        self._progress = None

    def resume(
        self, run: Calibrator, fingerprint: dict, blocks: int, cache: ActivationCache
    ) -> tuple[int, int]:
        """Restore ``run`` from the resume point; returns (the next block, the batches).

        Every file is checked against the digest the manifest recorded: the fingerprint and
        the progress here, the next block's inputs by ``cache`` as the block reads them."""
        path = self.path / _MANIFEST
        if not path.is_file():
            raise ConfigError(
                f"nothing to resume: {self.path} holds no saved progress of a block-by-block "
                "calibration (no block had finished, or it was never started there)"
            )
        try:
            manifest = json.loads(path.read_bytes())
            name, files = manifest["progress"], manifest["sha256"]
            if not (
                isinstance(name, str)
                and _PROGRESS.fullmatch(name)
                and isinstance(files, dict)
                and all(isinstance(v, str) for v in files.values())
                and {_FINGERPRINT, name} <= set(files)
            ):
                raise ValueError("unexpected content")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _not_ours(path, "a manifest") from err
        saved = json.loads(read_verified(self.path / _FINGERPRINT, files[_FINGERPRINT]))
        now = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(
                f"cannot resume from {self.path}: it was started with other "
                f"{', '.join(diff)}; run again without resume to start over"
            )
        progress = self.path / name
        state = load_verified(progress, files[name])
        try:  # ConfigError is a ValueError too: the checks above stay outside
            start, n = _restore(run, state, blocks)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise _not_ours(progress, "the progress of this calibration") from err
        if start < blocks:
            expected = {}
            for j in range(n):
                key = f"activations/{cache.relative(start, j)}"
                if key not in files:
                    raise ConfigError(
                        f"{path} records no digest of {key}: it is not a manifest evagraph "
                        "wrote; start again without --resume"
                    )
                expected[j] = files[key]
            cache.expect(start, expected)
            cache.drop(start + 1)  # what the interrupted block had begun to write
        self._fingerprint_sha, self._progress = files[_FINGERPRINT], name
        return start, n


def _full_fingerprint(part: Partition, settings: CalibrationSettings, extra: dict | None) -> dict:
    return {
        "settings": settings.to_dict(),
        "blocks": [blk.key for blk in part.blocks],
        "inputs": part.head_names,
        **(extra or {}),
    }


def _restore(run: Calibrator, progress: dict, blocks: int) -> tuple[int, int]:
    start, n = progress["next_block"], progress["batches"]
    if not (isinstance(start, int) and 0 < start <= blocks and isinstance(n, int) and n > 0):
        raise ValueError("next_block or batches out of range")
    run.restore(progress)
    return start, n


# The lock. flock, not a PID file: the kernel releases it when its process ends, however it
# ends (kill -9, a crash), so a dead run never blocks the next one.


def _holder(lock: Path) -> str:
    """Who holds ``lock``, as it wrote itself there."""
    try:
        text = lock.read_text(errors="replace").strip().splitlines()
    except OSError:
        text = []
    return text[0][:200] if text else "a process"


def _in_use(work_dir: Path, lock: Path) -> ConfigError:
    return ConfigError(
        f"{work_dir} is in use by another evagraph run ({_holder(lock)}): wait for it to "
        "finish, or write to another output directory"
    )


@contextlib.contextmanager
def work_lock(work_dir: str | Path) -> Iterator[None]:
    """Hold ``work_dir``'s lock (creating the directory); refused at once, in one line naming
    the holder, if another run holds it. Released on exit, or by the kernel when the process
    dies."""
    if fcntl is None:
        yield
        return
    work = Path(work_dir)
    lock = work / _LOCK
    # A shared lock held for an instant by ``check_unused`` is waited out, not reported.
    deadline = time.monotonic() + 0.5
    while True:
        try:
            work.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot lock {work}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise _in_use(work, lock) from None
        # The run that held it may have removed the directory, lock file included, between
        # our open and flock: a lock on that removed file guards nothing, so take it again.
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a taker)


def check_unused(work_dir: str | Path) -> None:
    """Refuse now (before a model is loaded) a run into a work directory that another run
    holds. It only looks: the calibration takes the lock itself (``work_lock``)."""
    lock = Path(work_dir) / _LOCK
    if fcntl is None:
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return  # never locked (or unreadable: taking the lock will tell)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(work_dir), lock) from None
    finally:
        os.close(fd)


def remove_work_dir(work_dir: str | Path) -> None:
    """Remove a finished run's work directory, unless another run took it over since (it is
    then that run's). Removed while locked, so no run starts in it half-way."""
    if not Path(work_dir).is_dir():
        return
    with contextlib.suppress(EvagraphError), work_lock(work_dir):
        shutil.rmtree(work_dir, ignore_errors=True)
