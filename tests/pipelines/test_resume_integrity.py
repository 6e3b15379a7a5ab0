"""Issue 28, items 7 and 8a: the files a resumed run reads are the ones it wrote, one run at a
time uses a work directory, and a model directory's index cannot lead outside it.

Each test reproduces the report: without the checks, the changed file is used (exit 0, other
adapters), the second run dies with a ``FileNotFoundError``, the file outside is read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evagraph
from evagraph.errors import ConfigError, ModelLoadError
from evagraph.onload import ShardedCheckpoint
from evagraph.pipelines import blockwise as sequential_pass

pytestmark = pytest.mark.filterwarnings("ignore::evagraph.ConvergenceWarning")


def _llama(layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _tokens(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(n)]


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _interrupt(model, batches, work: Path, monkeypatch, at: int = 2) -> None:
    """A block-by-block calibration into ``work`` stopped (Ctrl-C) when block ``at`` starts:
    blocks 0 .. at-1 are saved, and block ``at``'s inputs wait in the activation files."""
    real = sequential_pass._calibrate_block

    def block(run, part, b, *args):
        if b == at:
            raise KeyboardInterrupt
        return real(run, part, b, *args)

    with monkeypatch.context() as m:
        m.setattr(sequential_pass, "_calibrate_block", block)
        with pytest.raises(KeyboardInterrupt):
            evagraph.calibrate(model, batches, sequential=True, work_dir=work, progress=False)


def _resume(model, batches, work: Path):
    return evagraph.calibrate(
        model, batches, sequential=True, work_dir=work, resume=True, progress=False
    )


def _scale(path: Path, factor: float) -> None:
    """Re-save an activation file with every tensor scaled (what the issue's report did)."""
    values = torch.load(path, weights_only=True)
    torch.save({k: v * factor if torch.is_tensor(v) else v for k, v in values.items()}, path)


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    model, batches, work = _llama(), _tokens(), tmp_path / "work"
    _interrupt(model, batches, work, monkeypatch)
    return model, batches, work


# 7. Resume files are checked against the digests recorded when they were written.


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_of_an_untouched_run_is_exact(interrupted):
    model, batches, work = interrupted
    # The resume point: the sha256 of every file the directory holds (besides the lock and
    # the manifest itself), recorded as they were written.
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["progress"] == "progress-2.pt"
    held = [p for p in work.rglob("*") if p.is_file() and p.name not in ("lock", "manifest.json")]
    assert manifest["sha256"] == {str(p.relative_to(work)): _sha256(p) for p in held}
    expected = evagraph.calibrate(model, batches, sequential=True, progress=False)
    resumed = _resume(model, batches, work)
    for g, c in expected.components.items():
        assert torch.equal(c.components, resumed.components[g].components), g


def test_scaled_activation_file_is_refused(interrupted):
    model, batches, work = interrupted
    files = sorted((work / "activations").rglob("*.pt"))
    assert [f.parent.name for f in files] == ["gen0"] * 4  # block 2's inputs
    _scale(files[1], 3.0)
    with pytest.raises(ConfigError) as err:
        _resume(model, batches, work)
    text = _one_line(err)
    assert f"{files[1]} was changed since it was written; start again without --resume" in text


def test_missing_activation_file_is_one_line(interrupted):
    model, batches, work = interrupted
    (work / "activations" / "gen0" / "2.pt").unlink()
    with pytest.raises(ConfigError, match=r"gen0/2\.pt is missing") as err:
        _resume(model, batches, work)
    _one_line(err)


def test_missing_fingerprint_is_one_line(interrupted):
    model, batches, work = interrupted
    (work / "fingerprint.json").unlink()
    with pytest.raises(ConfigError, match=r"fingerprint\.json is missing") as err:
        _resume(model, batches, work)
    _one_line(err)


def test_changed_fingerprint_is_refused(interrupted):
    model, batches, work = interrupted
    saved = json.loads((work / "fingerprint.json").read_text())
    saved["settings"]["tau"] = 0.5  # would let a resume mix settings
    (work / "fingerprint.json").write_text(json.dumps(saved, sort_keys=True))
    with pytest.raises(ConfigError, match=r"fingerprint\.json was changed since") as err:
        _resume(model, batches, work)
    _one_line(err)


def _progress(work: Path) -> Path:
    (path,) = work.glob("progress-*.pt")
    return path


def test_garbage_progress_is_one_line(interrupted):
    model, batches, work = interrupted
    progress = _progress(work)
    progress.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=f"{progress.name} was changed since it") as err:
        _resume(model, batches, work)
    _one_line(err)


def test_another_runs_progress_is_refused(interrupted, tmp_path, monkeypatch):
    model, batches, work = interrupted
    other = tmp_path / "other"
    _interrupt(model, _tokens(seed=7), other, monkeypatch)  # other data, same settings
    progress = _progress(work)
    progress.write_bytes(_progress(other).read_bytes())
    with pytest.raises(ConfigError, match=f"{progress.name} was changed since it") as err:
        _resume(model, batches, work)
    _one_line(err)


class _Runs:
    """Unpickling it runs code: what ``weights_only=True`` refuses."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_progress_is_read_weights_only(interrupted, tmp_path):
    # Even a progress file whose digest was forged in the manifest runs no code.
    model, batches, work = interrupted
    progress, marker = _progress(work), tmp_path / "ran"
    torch.save({"next_block": _Runs(marker)}, progress)
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["sha256"][progress.name] = _sha256(progress)
    (work / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"cannot read {progress}") as err:
        _resume(model, batches, work)
    _one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"progress": "../x.pt"}'])
def test_bad_manifest_is_one_line(interrupted, content):
    model, batches, work = interrupted
    (work / "manifest.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"manifest\.json is not a manifest evagraph") as err:
        _resume(model, batches, work)
    _one_line(err)


def test_work_dir_in_use_is_refused(tmp_path):
    work = tmp_path / "work"
    with sequential_pass.work_lock(work):  # another open file: flock conflicts even here
        with pytest.raises(ConfigError) as err:
            evagraph.calibrate(_llama(2), _tokens(), sequential=True, work_dir=work)
        text = _one_line(err)
        assert f"{work} is in use by another evagraph run (pid {os.getpid()} on " in text
        with pytest.raises(ConfigError, match="in use by another evagraph run"):
            sequential_pass.check_unused(work)
        # A finished run leaves a directory another run took over to that run.
        sequential_pass.remove_work_dir(work)
        assert (work / "lock").exists()
    sequential_pass.check_unused(work)
    sequential_pass.remove_work_dir(work)
    assert not work.exists()


_HOLD_LOCK = """
import sys, time
from evagraph.pipelines.blockwise import work_lock
with work_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(work)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
            sequential_pass.check_unused(work)
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own; the kernel drops the lock
        holder.wait()
    state = evagraph.calibrate(_llama(2), _tokens(), sequential=True, work_dir=work, progress=False)
    assert state.components


# The CLI: the reproductions.


def _cli(*args, cwd):
    from conftest import evagraph_cmd

    return subprocess.run(
        [*evagraph_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


# The CLI, stopped by SIGTERM (a scheduler's time limit) when block 2 starts; or, with
# EVAGRAPH_TEST_HOLD=DIR, paused there until DIR/go exists (DIR/ready tells it is there).
_CLI_STOPPED_AT_BLOCK_2 = """
import os, signal, sys, time
from pathlib import Path
import evagraph.pipelines.blockwise as s
real = s._calibrate_block
def block(run, part, b, *args):
    if b == 2:
        hold = os.environ.get("EVAGRAPH_TEST_HOLD")
        if hold is None:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            Path(hold, "ready").touch()
            while not Path(hold, "go").exists():
                time.sleep(0.05)
    return real(run, part, b, *args)
s._calibrate_block = block
from evagraph.cli import main
sys.argv = ["evagraph", *sys.argv[1:]]
main()
"""


def _model_dir(tmp_path: Path) -> list[str]:
    from safetensors.torch import save_file

    _llama(3).save_pretrained(tmp_path / "llama")
    save_file({"input_ids": torch.randint(0, 64, (16, 12))}, tmp_path / "tokens.safetensors")
    return ["llama", "--data", "tokens.safetensors", "--batch-size", "4", "--sequential", "-q"]


def _stopped(common: list[str], out: str, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CLI_STOPPED_AT_BLOCK_2, "compile", *common, "-o", out],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.slow
def test_cli_resume_with_a_scaled_activation_file_is_refused(tmp_path):
    common = _model_dir(tmp_path)
    cut = _stopped(common, "out", tmp_path)
    _, stderr = cut.communicate(timeout=600)
    assert cut.returncode == 128 + signal.SIGTERM, stderr
    work = tmp_path / ".out.evagraph-work"
    files = sorted((work / "activations").rglob("*.pt"))
    assert files
    for f in files:
        _scale(f, 3.0)
    resumed = _cli("compile", *common, "--resume", "-o", "out", cwd=tmp_path)
    assert resumed.returncode == 1, resumed.stderr
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1, resumed.stderr
    assert f"{files[0]} was changed since it was written; start again without --resume" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written to OUTDIR
    assert work.is_dir()  # and the work directory left to start again from


@pytest.mark.slow
def test_cli_two_runs_into_the_same_output(tmp_path):
    from safetensors.torch import load_file

    common = _model_dir(tmp_path)
    hold = tmp_path / "hold"
    hold.mkdir()
    first = _stopped(common, "out", tmp_path, EVAGRAPH_TEST_HOLD=str(hold))
    try:
        deadline = time.monotonic() + 300
        while not (hold / "ready").exists():  # the first run is in block 2, the lock held
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.1)
        second = _cli("compile", *common, "-o", "out", cwd=tmp_path)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "is in use by another evagraph run" in lines[0]
        assert f"(pid {first.pid} on " in lines[0]
    finally:
        (hold / "go").touch()
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    reference = _cli("compile", *common, "-o", "reference", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    a = load_file(tmp_path / "out" / "adapter.safetensors")
    b = load_file(tmp_path / "reference" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".out.evagraph-work").exists()


# 8a. A model directory's safetensors index cannot lead outside the directory.


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A Llama directory in several safetensors files, with their index."""
    _llama(2).save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    assert len(list((tmp_path / "llama").glob("*.safetensors"))) > 1
    return tmp_path / "llama"


def _index(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())


def _set_entry(directory: Path, name: str, target: str) -> None:
    index = _index(directory)
    index["weight_map"][name] = target
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _moved_out(directory: Path, name: str, copy: bool = False) -> tuple[str, Path]:
    """The file holding ``name``, moved (or copied) next to the directory (readable there)."""
    shard = directory / _index(directory)["weight_map"][name]
    outside = directory.parent / shard.name
    if copy:
        outside.write_bytes(shard.read_bytes())
    else:
        shard.rename(outside)
    return shard.name, outside


NAME = "model.layers.1.mlp.down_proj.weight"


def test_index_entry_with_dotdot_is_refused(sharded):
    shard, outside = _moved_out(sharded, NAME, copy=True)
    _set_entry(sharded, NAME, f"../{shard}")
    with pytest.raises(ModelLoadError) as err:
        ShardedCheckpoint(sharded)
    text = _one_line(err)
    assert f"weight_map entry {NAME!r} -> '../{shard}' leads outside {sharded}" in text
    # And end to end: the block-by-block calibration reads nothing of it.
    from evagraph.loading import load_model

    skeleton, _ = load_model(sharded, lazy=True)
    with pytest.raises(ModelLoadError, match="leads outside"):
        evagraph.calibrate(skeleton, _tokens(), weights=sharded, sequential=True, progress=False)


def test_index_entry_with_absolute_path_is_refused(sharded):
    _, outside = _moved_out(sharded, NAME, copy=True)
    _set_entry(sharded, NAME, str(outside))
    with pytest.raises(ModelLoadError, match=f"entry {NAME!r} -> {str(outside)!r} leads") as err:
        ShardedCheckpoint(sharded)
    _one_line(err)


def test_index_entry_linking_outside_is_refused(sharded):
    shard, outside = _moved_out(sharded, NAME)
    (sharded / shard).symlink_to(outside)
    with pytest.raises(ModelLoadError, match=f"entry '[^']+' -> {shard!r} leads outside") as err:
        ShardedCheckpoint(sharded)
    _one_line(err)


def test_links_inside_and_the_hub_cache_layout_are_read(tmp_path, sharded):
    # A link inside the directory is fine.
    shard, _ = _moved_out(sharded, NAME)
    (sharded / "real").mkdir()
    (sharded.parent / shard).rename(sharded / "real" / shard)
    (sharded / shard).symlink_to(Path("real") / shard)
    assert NAME in ShardedCheckpoint(sharded).read([NAME])
    # The hub cache: REPO/snapshots/REV/FILE -> ../../blobs/HASH.
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sharded.iterdir():
        if f.is_file() and not f.is_symlink():
            blob = repo / "blobs" / f"hash-{f.name}"
            blob.write_bytes(f.read_bytes())
            (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "blobs" / f"hash-{shard}").write_bytes((sharded / shard).read_bytes())
    (snapshot / shard).symlink_to(Path("..", "..", "blobs", f"hash-{shard}"))
    assert NAME in ShardedCheckpoint(snapshot).read([NAME])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", r"cannot read .*model\.safetensors\.index\.json: Expecting"),
        (b"[1, 2]", r"cannot read .*index\.json: not an object"),
        (b'{"metadata": {}}', r"index\.json has no weight_map"),
        (b'{"weight_map": ["a"]}', r"index\.json has no weight_map"),
        (b'{"weight_map": {"w": 3}}', r"weight_map entry 'w' is 3, not the name of a file"),
        (b'{"weight_map": {"w": "gone.safetensors"}}', r"entry 'w' -> 'gone.safetensors': no"),
    ],
)
def test_bad_index_is_one_line(sharded, content, message):
    (sharded / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as err:
        ShardedCheckpoint(sharded)
    _one_line(err)


# Data parallel: one lock (process 0's), each process's files checked, no process left waiting.


def _data_parallel_worker(rank: int, init: str, root: str) -> None:
    import shutil

    import torch.distributed as dist

    from evagraph.distributed import PeerFailed

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    root_path, out = Path(root), {}
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(4)]

    def run(work: str, resume: bool = False):
        return evagraph.calibrate(
            _llama(), batches, sequential=True, work_dir=root_path / work, resume=resume,
            progress=False,
        )  # fmt: skip

    def outcome(work: str, resume: bool = False):
        try:
            return run(work, resume)
        except (ConfigError, PeerFailed) as err:
            return f"{type(err).__name__}: {err}"

    try:
        full = run("full")
        real = sequential_pass._calibrate_block

        def stop(run_, part, b, *args):
            if b == 2:
                raise KeyboardInterrupt
            return real(run_, part, b, *args)

        sequential_pass._calibrate_block = stop
        with contextlib.suppress(KeyboardInterrupt):  # both stopped at block 2
            run("cut")
        sequential_pass._calibrate_block = real
        dist.barrier()
        if rank == 0:
            shutil.copytree(root_path / "cut", root_path / "tampered")
        dist.barrier()
        if rank == 1:
            _scale(root_path / "tampered" / "rank1" / "activations" / "gen0" / "0.pt", 3.0)
        dist.barrier()
        resumed = run("cut", resume=True)
        out["same"] = all(
            torch.equal(c.components, resumed.components[k].components)
            for k, c in full.components.items()
        )
        out["tampered"] = outcome("tampered", resume=True)
        out["held"] = outcome("held")
        out["files"] = sorted(
            str(p.relative_to(root_path / "full")) for p in (root_path / "full").rglob("*.json")
        )
    finally:
        torch.save(out, root_path / f"result{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_resume_and_lock(tmp_path):
    import torch.multiprocessing as mp

    with sequential_pass.work_lock(tmp_path / "held"):  # another run holds it throughout
        mp.spawn(
            _data_parallel_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
            nprocs=2, join=True,
        )  # fmt: skip
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["files"] == [
        "rank0/fingerprint.json", "rank0/manifest.json", "rank1/fingerprint.json",
        "rank1/manifest.json",
    ]  # fmt: skip
    assert r0["same"] and r1["same"]
    # Process 1's changed input stops both (its error, and its peer told), none waits.
    changed = tmp_path / "tampered" / "rank1" / "activations" / "gen0" / "0.pt"
    assert r1["tampered"] == (
        f"ConfigError: {changed} was changed since it was written; start again without --resume"
    )
    assert r0["tampered"].startswith("PeerFailed: process 1 failed")
    # The directory another run holds: process 0 is refused, process 1 with it.
    assert r0["held"].startswith(f"ConfigError: {tmp_path / 'held'} is in use by another")
    assert r1["held"].startswith("PeerFailed: process 0 failed")
