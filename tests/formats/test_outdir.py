"""OUTDIR is written whole or not at all: races, ".", "..", symlinks, mount points, leftovers
of killed runs, and permissions that follow the user's umask."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import evagraph_cmd

from evagraph.cli import main
from evagraph.errors import OutputError
from evagraph.formats import outdir as evaio
from evagraph.formats.outdir import atomic_directory

# Runs atomic_directory(TARGET) in its own process: writes NAME into it, announces that it
# passed the start check (SYNC/NAME), then waits for SYNC/WAIT_FOR before finishing.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from evagraph.errors import OutputError
    from evagraph.formats.outdir import atomic_directory

    target, name, sync, wait_for, force = sys.argv[1:6]
    sync = Path(sync)
    try:
        with atomic_directory(target, force=force == "force") as tmp:
            (tmp / "who").write_text(name)
            (sync / name).touch()
            while not (sync / wait_for).exists():
                time.sleep(0.01)
    except OutputError as err:
        print(err)
        sys.exit(3)
    """
)


def writer(target: Path, name: str, sync: Path, wait_for: str, force: bool = False):
    args = [str(target), name, str(sync), wait_for, "force" if force else "-"]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def compile_cmd(example: Path, out: Path | str) -> list[str]:
    data, model = str(example / "calib.safetensors"), str(example / "tiny_cnn.pt2")
    return [*evagraph_cmd(), "compile", model, "--data", data, "-o", str(out), "-q"]


def test_two_processes_both_past_the_start_check_one_wins(tmp_path):
    """Both see an empty OUTDIR at the start; the second move fails and leaves the first."""
    target, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    procs = {name: writer(target, name, sync, other) for name, other in [("a", "b"), ("b", "a")]}
    results = {name: (p.wait(timeout=600), p.communicate()) for name, p in procs.items()}
    codes = sorted(code for code, _ in results.values())
    assert codes == [0, 3], results
    winner = next(name for name, (code, _) in results.items() if code == 0)
    loser_out = next(out for code, (out, _) in results.values() if code == 3).decode()
    assert "another process" in loser_out and "--force" in loser_out
    assert loser_out.count("\n") == 1
    assert [p.name for p in target.iterdir()] == ["who"]
    assert (target / "who").read_text() == winner
    assert leftovers(tmp_path) == []


def test_two_processes_with_force_one_whole_output(tmp_path):
    target, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    target.mkdir()
    (target / "old").write_text("previous run")
    pairs = [("a", "b"), ("b", "a")]
    procs = [writer(target, name, sync, other, force=True) for name, other in pairs]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [p.communicate() for p in procs]
    assert [p.name for p in target.iterdir()] == ["who"]
    assert (target / "who").read_text() in ("a", "b")
    assert leftovers(tmp_path) == []


def test_two_compiles_to_one_outdir(example, tmp_path):
    """Real runs: one writes OUTDIR, the other fails with one line and changes nothing."""
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(compile_cmd(example, out), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    error = next(err for code, err in results if code == 1)
    assert error.startswith("Error: ") and error.count("\n") == 1 and "--force" in error
    assert (out / "report.json").is_file() and (out / "model.pt2").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("outdir", [".", ".."])
def test_current_directory_or_above_is_refused(tmp_path, monkeypatch, outdir):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in tmp_path.iterdir())
    with (
        pytest.raises(OutputError, match="current directory"),
        atomic_directory(outdir, force=True),
    ):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any(work.iterdir())


def test_dot_outdir_on_the_command_line_is_one_line(example, tmp_path):
    proc = subprocess.run(
        compile_cmd(example, "."), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "current directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("force", [False, True])
def test_symlinked_outdir_is_written_where_it_points(tmp_path, force):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    if force:
        (real / "old").write_text("previous run")
    link.symlink_to(real)
    with atomic_directory(link, force=force) as tmp:
        (tmp / "new").write_text("this run")
    assert link.is_symlink() and link.resolve() == real
    assert [p.name for p in real.iterdir()] == ["new"]
    assert leftovers(tmp_path) == []


def test_file_outdir_is_replaced_only_with_force(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(FileExistsError, match="--force"), atomic_directory(target):
        pass
    with atomic_directory(target, force=True) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in target.iterdir()] == ["new"] and leftovers(tmp_path) == []


def test_mount_point_outdir_is_refused(tmp_path):
    """In a user and mount namespace (no root needed), OUTDIR is a fresh tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a user namespace: {probe.stderr.decode().strip()}")
    script = textwrap.dedent(
        f"""
        from evagraph.errors import OutputError
        from evagraph.formats.outdir import atomic_directory
        for force in (False, True):
            try:
                with atomic_directory({str(mnt)!r}, force=force) as tmp:
                    (tmp / "x").write_text("x")
            except OutputError as err:
                print(err)
        """
    )
    mount_then_run = f'mount -t tmpfs tmpfs {mnt} && exec "$0" -c "$1"'
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount_then_run, sys.executable, script],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr
    assert all("mount point" in line for line in lines)
    assert leftovers(tmp_path) == [] and not any(mnt.iterdir())


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("code", [errno.EBUSY, errno.EXDEV])
def test_move_that_the_file_system_refuses_is_one_line(tmp_path, monkeypatch, code, force):
    """A mount appearing on OUTDIR while compiling makes the final rename fail; with --force
    the previous output, already moved aside, is put back."""
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
        real_rename(src, dst)

    target = tmp_path / "o"
    target.mkdir()
    before = ["old"] if force else []  # without --force only an empty OUTDIR gets this far
    for name in before:
        (target / name).write_text("previous run")
    monkeypatch.setattr(evaio.os, "rename", rename)
    with pytest.raises(OutputError) as err, atomic_directory(target, force=force) as tmp:
        (tmp / "new").write_text("this run")
    message = str(err.value)
    assert "mount point" in message and "\n" not in message
    assert leftovers(tmp_path) == [] and [p.name for p in target.iterdir()] == before


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    host, dead = evaio._HOST, dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        names = {
            f".out.tmp-{host}-{dead}-abcd1234": False,  # removed
            f".out.old-{host}-{dead}-0123abcd": False,  # removed
            f".out.tmp-{host}-{live.pid}-efgh5678": True,  # its process still runs
            f".out.tmp-otherhost-{dead}-ijkl9012": True,  # another machine's process
            f".outer.tmp-{host}-{dead}-mnop3456": True,  # another OUTDIR's
            ".out.qrst7890": True,  # an older evagraph's, without a PID
        }
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "partial").write_text("x")
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "new").write_text("x")
        remaining = {p.name for p in tmp_path.iterdir()}
        assert remaining == {"out"} | {name for name, kept in names.items() if kept}
    finally:
        live.kill()
        live.wait()


def test_kill_9_leftover_is_removed_by_the_next_run(tmp_path):
    target, sync = tmp_path / "out", tmp_path / "sync"
    sync.mkdir()
    proc = writer(target, "killed", sync, "never")
    while not (sync / "killed").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = leftovers(tmp_path)
    assert len(left) == 1 and f"-{proc.pid}-" in left[0]
    with atomic_directory(target) as tmp:
        (tmp / "who").write_text("next")
    assert leftovers(tmp_path) == [] and (target / "who").read_text() == "next"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask(example, tmp_path, umask):
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        result = CliRunner().invoke(main, compile_cmd(example, out)[len(evagraph_cmd()) :])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert {"adapter.safetensors", "eva_state.safetensors", "report.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
